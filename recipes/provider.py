"""Megatron-Bridge model provider for FlexOlmo.

Bridge recipes describe the model as a ``GPTModelProvider`` (a ``TransformerConfig`` that can
``provide()`` the model).  :class:`FlexOlmoModelProvider` is that provider with FlexOlmo's
architecture as defaults and our block spec as ``transformer_layer_spec``, so a recipe's
``ConfigContainer`` builds exactly the model that :func:`flexolmo_plugin.build_model` builds and
everything downstream (parameter slots, logits, export) keeps working on bridge-trained models.

Importing this module imports ``megatron.bridge``: call
:func:`flexolmo_plugin.compat.enable_bridge_compat` first on machines without Transformer Engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from megatron.bridge.models.gpt_provider import GPTModelProvider

from flexolmo_plugin.model.config import (
    ConfigError,
    FlexOlmoConfig,
    ParallelLayout,
    check_layout,
)
from flexolmo_plugin.model.spec import flexolmo_block_spec


def flexolmo_transformer_layer_spec(config: "FlexOlmoModelProvider", vp_stage: int | None = None):
    """``transformer_layer_spec`` callable: FlexOlmo's decoder block for this provider.

    Module level (not a lambda) so that bridge can serialise the config to ``run_config.yaml``.
    """
    return flexolmo_block_spec(config, backend=config.flexolmo_backend, domain_bias=config.router_bias,
                               vp_stage=vp_stage)


# Settings that change the function the model computes; a recipe override of any of them would
# silently train something that is not FlexOlmo (and that HF export would mislabel).
_INVARIANTS = {
    "qk_layernorm": False,  # FlexOlmoSelfAttention installs the full-width q/k norm itself
    "add_bias_linear": False,
    "add_qkv_bias": False,
    "gated_linear_unit": True,
    "normalization": "RMSNorm",
    "position_embedding_type": "rope",
    "rotary_percent": 1.0,
    "share_embeddings_and_output_weights": False,
    "moe_router_score_function": "softmax",
    "moe_router_pre_softmax": True,  # softmax over all experts, then top-k ...
    "moe_router_topk_scaling_factor": None,  # ... with no renormalisation or scaling
    "moe_shared_expert_intermediate_size": None,
}


@dataclass
class FlexOlmoModelProvider(GPTModelProvider):
    """``GPTModelProvider`` whose defaults are FlexOlmo's (mirrors ``config.to_transformer_config``).

    Sizes default to zero/None like bridge's own providers: set them, or use
    :meth:`from_flexolmo_config`.  ``vocab_size`` is the *unpadded* vocabulary; the model's
    embedding rows are padded to a multiple of ``make_vocab_size_divisible_by`` independently of
    TP (as in :class:`FlexOlmoConfig`), so checkpoints do not depend on the parallel layout.
    """

    # FlexOlmo-specific
    router_bias: bool = False
    # Training setup applied to the model before it is wrapped for distributed training:
    # load this FlexOlmo checkpoint (e.g. from ``flexolmo upcycle``), then freeze per ``trainable``:
    # "all", "anchored" (only expert ``owner_expert``'s FFN, router row and bias) or "router".
    init_from: str | None = None
    trainable: str = "all"
    owner_expert: int = 1
    flexolmo_backend: Literal["local", "te", "auto"] = "auto"  # "auto": TE when importable
    max_position_embeddings: int | None = None  # None: seq_length (HF export metadata)
    expert_names: tuple[str, ...] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    transformer_layer_spec: Any = flexolmo_transformer_layer_spec

    # Architecture (see flexolmo_plugin/config.py for why each one is what it is)
    normalization: str = "RMSNorm"
    layernorm_epsilon: float = 1e-6
    position_embedding_type: Literal["learned_absolute", "rope", "yarn"] = "rope"
    rotary_base: float = 500000.0
    rotary_percent: float = 1.0
    share_embeddings_and_output_weights: bool = False
    qk_layernorm: bool = False
    gated_linear_unit: bool = True
    activation_func: Any = F.silu
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    attention_softmax_in_fp32: bool = True  # megatron-core's default; bridge's GPT provider says False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128

    # Router and experts
    moe_router_score_function: str = "softmax"
    moe_router_pre_softmax: bool = True
    moe_router_topk_scaling_factor: float | None = None
    moe_router_dtype: str | None = "fp32"
    moe_router_load_balancing_type: str = "none"
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: float | None = None
    moe_token_dispatcher_type: str = "alltoall"
    moe_grouped_gemm: bool = False  # experts are SequentialMLP: one module per expert
    moe_permute_fusion: bool = False

    # Numerics / fusions exactly as the parity-tested to_transformer_config
    params_dtype: torch.dtype = torch.float32
    bf16: bool = False
    fp16: bool = False
    use_cpu_initialization: bool = True
    bias_activation_fusion: bool = False
    bias_dropout_fusion: bool = False
    apply_rope_fusion: bool = False
    masked_softmax_fusion: bool = False
    gradient_accumulation_fusion: bool = False
    persist_layer_norm: bool = False
    cross_entropy_loss_fusion: bool = False

    @classmethod
    def from_flexolmo_config(cls, cfg: FlexOlmoConfig, **overrides: Any) -> "FlexOlmoModelProvider":
        """A provider for ``cfg``; ``overrides`` set any other provider field (parallelism, seq...)."""
        lb = cfg.load_balancing_coeff
        fields: dict[str, Any] = dict(
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            num_attention_heads=cfg.num_attention_heads,
            num_query_groups=cfg.num_key_value_heads,
            kv_channels=cfg.kv_channels,
            ffn_hidden_size=cfg.intermediate_size,
            moe_ffn_hidden_size=cfg.intermediate_size,
            num_moe_experts=cfg.num_experts,
            moe_router_topk=cfg.top_k,
            vocab_size=cfg.vocab_size,
            make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by,
            rotary_base=cfg.rope_theta,
            layernorm_epsilon=cfg.rms_norm_eps,
            seq_length=cfg.max_position_embeddings,
            max_position_embeddings=cfg.max_position_embeddings,
            router_bias=cfg.router_bias,
            moe_router_load_balancing_type="aux_loss" if lb > 0 else "none",
            moe_aux_loss_coeff=lb,
            moe_z_loss_coeff=cfg.router_z_loss_coeff,
            expert_names=cfg.expert_names,
            pad_token_id=cfg.pad_token_id,
            bos_token_id=cfg.bos_token_id,
            eos_token_id=cfg.eos_token_id,
        )
        fields.update(overrides)
        return cls(**fields)

    def to_flexolmo_config(self) -> FlexOlmoConfig:
        """The :class:`FlexOlmoConfig` this provider describes (inverse of ``from_flexolmo_config``)."""
        if self.vocab_size is None or not self.num_moe_experts:
            raise ConfigError("FlexOlmoModelProvider needs vocab_size and num_moe_experts")
        heads = self.num_attention_heads
        default_head_dim = self.hidden_size // heads if heads and self.hidden_size % heads == 0 else None
        head_dim = None if self.kv_channels in (None, default_head_dim) else self.kv_channels
        lb = self.moe_aux_loss_coeff if self.moe_router_load_balancing_type != "none" else 0.0
        if not isinstance(lb, (int, float)):
            raise ConfigError(f"per-layer moe_aux_loss_coeff {lb!r} is not supported by FlexOlmoConfig")
        return FlexOlmoConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.moe_ffn_hidden_size or self.ffn_hidden_size,
            num_layers=self.num_layers,
            num_attention_heads=heads,
            num_key_value_heads=self.num_query_groups or heads,
            num_experts=self.num_moe_experts,
            top_k=self.moe_router_topk,
            head_dim=head_dim,
            rope_theta=float(self.rotary_base),
            rms_norm_eps=self.layernorm_epsilon,
            max_position_embeddings=self.max_position_embeddings or self.seq_length,
            router_bias=self.router_bias,
            router_z_loss_coeff=self.moe_z_loss_coeff,
            load_balancing_coeff=float(lb),
            make_vocab_size_divisible_by=self.make_vocab_size_divisible_by,
            expert_names=self.expert_names,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )

    def check_flexolmo(self) -> FlexOlmoConfig:
        """Reject overrides that would build something other than FlexOlmo; returns its config."""
        problems = [f"{name}={getattr(self, name)!r} (FlexOlmo needs {want!r})"
                    for name, want in _INVARIANTS.items() if getattr(self, name) != want]
        if self.activation_func is not F.silu:
            problems.append(f"activation_func={self.activation_func!r} (FlexOlmo experts are SwiGLU: silu)")
        if getattr(self, "mtp_num_layers", None):
            problems.append("multi-token prediction layers are not part of FlexOlmo")
        if problems:
            raise ConfigError("not a FlexOlmo configuration: " + "; ".join(problems))
        config = self.to_flexolmo_config()
        check_layout(config, ParallelLayout(
            tensor_parallel=self.tensor_model_parallel_size,
            expert_parallel=self.expert_model_parallel_size,
            expert_tensor_parallel=self.expert_tensor_parallel_size,
            pipeline_parallel=self.pipeline_model_parallel_size,
            sequence_parallel=self.sequence_parallel))
        return config

    def _get_num_floating_point_operations(self, batch_size: int) -> float:
        """Bridge's own TFLOPS log asks the provider for the FLOPs of ``batch_size`` sequences when it
        can.  Its generic formula counts every weight-gradient GEMM; anchored and router-only training
        skip those of frozen weights, so the count comes from :mod:`flexolmo_plugin.recipes.flops` instead."""
        from flexolmo_plugin.recipes.flops import Trainable, step_flops

        config = self.to_flexolmo_config()
        trainable = Trainable.policy(self.trainable, config.num_experts, self.owner_expert)
        return step_flops(config, seq_length=self.seq_length, global_batch_size=batch_size, trainable=trainable).total

    def provide_distributed_model(self, *args, **kwargs):
        """Bridge's builder, with FlexOlmo's initialisation and freezing run before DDP wrapping
        (frozen tensors then get no gradient buffer and never reach the optimizer)."""
        user_hook = kwargs.pop("pre_wrap_hook", None) or self.pre_wrap_hook

        def hook(chunks):
            chunks = prepare_for_training(chunks, init_from=self.init_from, trainable=self.trainable,
                                          owner_expert=self.owner_expert)
            return user_hook(chunks) if user_hook else chunks

        return super().provide_distributed_model(*args, pre_wrap_hook=hook, **kwargs)

    def provide(self, pre_process=None, post_process=None, vp_stage=None):
        """Bridge's ``GPTModel`` construction, with FlexOlmo's vocabulary padding and metadata.

        Bridge pads the vocabulary to a multiple of ``make_vocab_size_divisible_by × TP`` (and only
        when it took the size from the tokenizer); FlexOlmo pads to the multiple alone, always.  The
        padded size is handed to bridge for the duration of the call.  The built model gets
        ``model.flexolmo_config`` so that ``flexolmo_plugin.conversion.slots`` / ``logits`` and
        exports work on bridge-trained models.
        """
        config = self.check_flexolmo()
        saved = (self.vocab_size, self.should_pad_vocab)
        self.vocab_size, self.should_pad_vocab = config.padded_vocab_size, False
        try:
            model = super().provide(pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)
        finally:
            self.vocab_size, self.should_pad_vocab = saved
        model.flexolmo_config = config
        return model


TRAINABLE_POLICIES = ("all", "anchored", "router")


def prepare_for_training(chunks, *, init_from: str | None, trainable: str, owner_expert: int = 1):
    """Load ``init_from`` into each model chunk and apply the freezing policy."""
    from pathlib import Path

    from flexolmo_plugin.lifecycle import freezing
    from flexolmo_plugin.model.build import unwrap

    if trainable not in TRAINABLE_POLICIES:
        raise ConfigError(f"trainable={trainable!r}; expected one of {TRAINABLE_POLICIES}")
    for chunk in chunks:
        model = unwrap(chunk)
        if init_from:
            from flexolmo_plugin.conversion.mcore_io import load_model_weights

            load_model_weights(model, Path(init_from))
        if trainable == "anchored":
            freezing.anchor(model, owner_expert=owner_expert)
        elif trainable == "router":
            freezing.router_only(model)
    return chunks
