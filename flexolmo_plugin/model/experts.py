"""Experts whose checkpoint keys are per expert, so frozen and trained experts never share a key.

Megatron's default ``SequentialMLP`` checkpoint layout stores all experts of a layer stack in one
tensor with an expert axis.  In anchored training expert 0 (public) is frozen while the owner's
expert trains; the optimizer then holds state for only part of that tensor, and Megatron's
checkpoint integrity check (every key fully covered) rejects the save.  With one key per expert --
Megatron's own "singleton" expert layout (gate and up halves as ``linear_fc1.weight_w/_v``), with
the layer axis kept -- every key is wholly frozen or wholly trained.  The layout is the same under
any TP/EP split, so checkpoints still reshard freely.
"""

from __future__ import annotations

from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from flexolmo_plugin.errors import ConfigError


class PerExpertSequentialMLP(SequentialMLP):
    """``SequentialMLP`` that always checkpoints each expert under its own keys.

    Raises:
        ConfigError: ``use_te_activation_func=True`` without a TE activation module in the spec.
            Megatron's ``MLP`` then falls back to ``config.activation_func`` yet still skips its
            gated-linear-unit path, i.e. applies ``silu`` to the whole ``[gate | up]`` projection
            instead of ``silu(gate) * up``: a different function, silently.
    """

    def __init__(self, num_local_experts, config, submodules, *args, **kwargs):
        if config.use_te_activation_func and submodules.activation_func is None:
            raise ConfigError(
                "use_te_activation_func=True needs Transformer Engine's activation module in the expert spec "
                "(backend='te'); this spec has none, and Megatron would apply silu to [gate | up] instead of "
                "SwiGLU. Set use_te_activation_func=False (Megatron's own SwiGLU, bias_activation_fusion) or "
                "build with backend='te'.")
        super().__init__(num_local_experts, config, submodules, *args, **kwargs)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        metadata = dict(ensure_metadata_has_dp_cp_group(metadata))
        metadata["singleton_local_shards"] = True
        return super().sharded_state_dict(prefix, sharded_offsets, metadata)
