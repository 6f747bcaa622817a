"""Module specs that assemble FlexOlmo from Megatron-Core parts (the whole "diff" is injected here).

A FlexOlmo layer is Megatron's ``TransformerLayer`` with: no pre-norms, two post-sub-layer
RMSNorms (:mod:`.layer`), full-width q/k norms (:mod:`.attention`) and the domain-embedding router
(:mod:`.router`) plugged into Megatron's ``MoELayer`` through ``MoESubmodules(router=...)``.
Experts are Megatron's ``SequentialMLP`` -- one module per expert, so each expert's parameters can
be frozen or trained on their own (anchoring needs exactly that) -- checkpointed per expert
(:mod:`.experts`).  The MoE layer is Megatron's ``MoELayer`` with the dense mixture path
(:mod:`.dense_mixture`): with top-k = E every expert runs on every token and no token is dispatched.

``backend="local"`` uses only Megatron-Core modules (runs on CPU); ``backend="te"`` swaps in
Transformer Engine linears and attention and needs transformer-engine (imported lazily).
"""

from __future__ import annotations

import importlib
from functools import partial
from typing import Literal

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.tensor_parallel import layers as megatron_tp_layers
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from flexolmo_plugin.errors import ConfigError
from flexolmo_plugin.model.attention import FlexOlmoSelfAttention
from flexolmo_plugin.model.dense_mixture import FlexOlmoMoELayer, select_expert_path
from flexolmo_plugin.model.experts import PerExpertSequentialMLP
from flexolmo_plugin.model.layer import (
    FlexOlmoLayerSubmodules,
    FlexOlmoTransformerLayer,
)
from flexolmo_plugin.model.norms import FlexOlmoRMSNorm
from flexolmo_plugin.model.router import DomainEmbeddingRouter

Backend = Literal["local", "te", "auto"]


def transformer_engine_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install raising at import
        return False
    return True


def gradient_accumulation_fusion_available() -> bool:
    """Whether Megatron-Core's own linears can fuse weight-gradient accumulation here.

    ``megatron.core.tensor_parallel.layers`` imports APEX's ``fused_weight_gradient_mlp_cuda`` at
    module level and records the outcome in ``_grad_accum_fusion_available``; its
    ``ColumnParallelLinear`` -- GPTModel's output layer, a plain Megatron linear even when every
    other linear is Transformer Engine's -- raises ``RuntimeError`` at construction when
    ``gradient_accumulation_fusion`` is set without it.  This reads that same flag (and, for a
    Megatron without the flag, makes the same import).
    """
    flag = getattr(megatron_tp_layers, "_grad_accum_fusion_available", None)
    if flag is not None:
        return bool(flag)
    try:
        importlib.import_module("fused_weight_gradient_mlp_cuda")
    except ImportError:
        return False
    return True


def _backend_modules(backend: Backend):
    if backend == "auto":
        backend = "te" if transformer_engine_available() else "local"
    if backend == "local":
        return LocalSpecProvider()
    if backend == "te":
        if not transformer_engine_available():
            raise RuntimeError("backend='te' needs transformer-engine, which is not importable here; "
                               "use backend='local' or run inside an NGC container")
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider  # needs TE

        return TESpecProvider()
    raise ConfigError(f"unknown backend {backend!r}; expected 'local', 'te' or 'auto'")


def flexolmo_layer_spec(*, backend: Backend = "local", domain_bias: bool = False,
                        expert_path: str = "auto") -> ModuleSpec:
    """Spec of one FlexOlmo transformer layer.

    Args:
        backend: ``"local"`` (Megatron-Core modules), ``"te"`` (Transformer Engine) or ``"auto"``.
        domain_bias: give the router the learned bias of the non-public experts.
        expert_path: ``"auto"`` (the dense mixture when top-k = E, else the token dispatcher),
            ``"dense"`` or ``"dispatcher"`` (:func:`~.dense_mixture.select_expert_path`).

    Returns:
        A ``ModuleSpec`` for Megatron's ``TransformerBlock``.
    """
    provider = _backend_modules(backend)
    experts = partial(
        PerExpertSequentialMLP,
        submodules=MLPSubmodules(
            linear_fc1=provider.column_parallel_linear(),
            linear_fc2=provider.row_parallel_linear(),
            # Used by Megatron's MLP only with use_te_activation_func=True: TE's gated op (SwiGLU for
            # silu + gated_linear_unit) from the TE backend; the local backend has none, and
            # PerExpertSequentialMLP refuses use_te_activation_func there (Megatron would apply a
            # plain silu to [gate | up]).
            activation_func=provider.activation_func(),
        ),
    )
    moe = partial(
        FlexOlmoMoELayer,
        submodules=MoESubmodules(
            experts=experts,
            shared_experts=None,
            router=partial(DomainEmbeddingRouter, domain_bias=domain_bias),
        ),
        expert_path=expert_path,
    )
    attention = ModuleSpec(
        module=FlexOlmoSelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=provider.column_parallel_linear(),
            core_attention=provider.core_attention(),
            linear_proj=provider.row_parallel_linear(),
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        ),
    )
    return ModuleSpec(
        module=FlexOlmoTransformerLayer,
        submodules=FlexOlmoLayerSubmodules(
            input_layernorm=IdentityOp,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp,
            mlp=moe,
            mlp_bda=get_bias_dropout_add,
            post_self_attn_layernorm=FlexOlmoRMSNorm,
            post_mlp_layernorm=FlexOlmoRMSNorm,
        ),
    )


def flexolmo_block_spec(transformer_config, *, backend: Backend = "local", domain_bias: bool = False,
                        expert_path: str = "auto", vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """Spec of the decoder: FlexOlmo layers plus FlexOlmo's fp32 final RMSNorm.

    Passed as ``transformer_layer_spec`` to ``GPTModel`` (a bare layer spec would make Megatron
    pick its own final norm, which computes in the input dtype).

    Args:
        transformer_config: the Megatron config (its layer count and pipeline split).
        backend / domain_bias / expert_path: as in :func:`flexolmo_layer_spec`.
        vp_stage: virtual pipeline stage (pipeline parallelism is not supported yet).

    Returns:
        ``TransformerBlockSubmodules`` with one layer spec per local layer.
    """
    select_expert_path(transformer_config, expert_path)  # refuse a forced path that does not apply, here
    layer = flexolmo_layer_spec(backend=backend, domain_bias=domain_bias, expert_path=expert_path)
    num_layers = get_num_layers_to_build(transformer_config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=FlexOlmoRMSNorm)
