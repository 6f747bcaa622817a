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


class PerExpertSequentialMLP(SequentialMLP):
    """``SequentialMLP`` that always checkpoints each expert under its own keys."""

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        metadata = dict(ensure_metadata_has_dp_cp_group(metadata))
        metadata["singleton_local_shards"] = True
        return super().sharded_state_dict(prefix, sharded_offsets, metadata)
