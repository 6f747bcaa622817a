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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from megatron.bridge.models.gpt_provider import GPTModelProvider

from flexolmo_plugin.conversion.mcore_io import load_model_weights
from flexolmo_plugin.errors import ConfigError
from flexolmo_plugin.lifecycle import freezing
from flexolmo_plugin.model.build import unwrap
from flexolmo_plugin.model.config import FlexOlmoConfig, from_provider_fields, gpt_model_fields, megatron_fields
from flexolmo_plugin.model.layout import ParallelLayout
from flexolmo_plugin.model.spec import (
    flexolmo_block_spec,
    gradient_accumulation_fusion_available,
    transformer_engine_available,
)


def flexolmo_transformer_layer_spec(config: FlexOlmoModelProvider, vp_stage: int | None = None):
    """``transformer_layer_spec`` callable: FlexOlmo's decoder block for this provider.

    Module level (not a lambda) so that bridge can serialise the config to ``run_config.yaml``.
    """
    return flexolmo_block_spec(config, backend=config.flexolmo_backend, domain_bias=config.router_bias,
                               expert_path=config.expert_path, vp_stage=vp_stage)


# Fields that change the function the model computes: a recipe override of any of them would
# silently train something that is not FlexOlmo (and that HF export would mislabel).  Their values
# come from the one translation, megatron_fields / gpt_model_fields.
_INVARIANT_FIELDS = ("qk_layernorm", "add_bias_linear", "add_qkv_bias", "gated_linear_unit", "normalization",
                     "activation_func", "position_embedding_type", "rotary_percent",
                     "share_embeddings_and_output_weights", "moe_router_score_function", "moe_router_pre_softmax",
                     "moe_router_topk_scaling_factor", "moe_shared_expert_intermediate_size")


@dataclass
class FlexOlmoModelProvider(GPTModelProvider):
    """Bridge's ``GPTModelProvider`` for FlexOlmo: build it with :meth:`from_flexolmo_config`.

    Its Megatron fields come from the same translation as ``build_model``
    (:func:`~flexolmo_plugin.model.config.megatron_fields`); a provider whose fields would compute
    something other than FlexOlmo is refused by :meth:`check_flexolmo` before the model is built.
    ``vocab_size`` is the *unpadded* vocabulary; the model's
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
    # "auto": the dense mixture path when top-k = number of experts (model/dense_mixture.py), else the dispatcher
    expert_path: Literal["auto", "dense", "dispatcher"] = "auto"
    max_position_embeddings: int | None = None  # None: seq_length (HF export metadata)
    expert_names: tuple[str, ...] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    hf_settings: tuple[tuple[str, Any], ...] = ()  # transformers-only settings, kept for export

    transformer_layer_spec: Any = flexolmo_transformer_layer_spec
    # Bridge's default turns this on whenever Transformer Engine imports, but GPTModel's output layer
    # is Megatron's own ColumnParallelLinear, which refuses it without APEX's extension.
    gradient_accumulation_fusion: bool = field(default_factory=gradient_accumulation_fusion_available)

    @classmethod
    def from_flexolmo_config(cls, cfg: FlexOlmoConfig, layout: ParallelLayout | None = None,
                             **overrides: Any) -> FlexOlmoModelProvider:
        """A provider for ``cfg`` at ``layout``; ``overrides`` set any other provider field.

        Its Megatron fields are :func:`~flexolmo_plugin.model.config.megatron_fields` (the same
        translation ``build_model`` uses); every other field keeps Bridge's default.
        """
        gpt = gpt_model_fields(cfg)
        fields: dict[str, Any] = dict(
            megatron_fields(cfg, layout),
            position_embedding_type=gpt["position_embedding_type"],
            rotary_percent=gpt["rotary_percent"],
            rotary_base=gpt["rotary_base"],
            share_embeddings_and_output_weights=gpt["share_embeddings_and_output_weights"],
            vocab_size=cfg.vocab_size,
            make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by,
            seq_length=cfg.max_position_embeddings,
            max_position_embeddings=cfg.max_position_embeddings,
            router_bias=cfg.router_bias,
            expert_names=cfg.expert_names,
            pad_token_id=cfg.pad_token_id,
            bos_token_id=cfg.bos_token_id,
            eos_token_id=cfg.eos_token_id,
            hf_settings=cfg.hf_settings,
        )
        fields.update(overrides)
        return cls(**fields)

    def to_flexolmo_config(self) -> FlexOlmoConfig:
        """The :class:`FlexOlmoConfig` this provider describes (inverse of ``from_flexolmo_config``)."""
        if self.vocab_size is None or not self.num_moe_experts:
            raise ConfigError("FlexOlmoModelProvider needs vocab_size and num_moe_experts")
        return from_provider_fields(self)

    @property
    def layout(self) -> ParallelLayout:
        return ParallelLayout(
            tensor_parallel=self.tensor_model_parallel_size,
            expert_parallel=self.expert_model_parallel_size,
            expert_tensor_parallel=self.expert_tensor_parallel_size,
            pipeline_parallel=self.pipeline_model_parallel_size,
            sequence_parallel=self.sequence_parallel,
        )

    def check_flexolmo(self) -> FlexOlmoConfig:
        """Reject overrides that would build something other than FlexOlmo; returns its config."""
        config = self.to_flexolmo_config()
        want = {**megatron_fields(config, self.layout), **gpt_model_fields(config)}
        problems = [
            f"{name}={getattr(self, name)!r} (FlexOlmo needs {want[name]!r})"
            for name in _INVARIANT_FIELDS
            if getattr(self, name) != want[name]
        ]
        if getattr(self, "mtp_num_layers", None):
            problems.append("multi-token prediction layers are not part of FlexOlmo")
        te = self.flexolmo_backend == "te" or (self.flexolmo_backend == "auto" and transformer_engine_available())
        if self.use_te_activation_func and not te:
            problems.append(f"use_te_activation_func=True with flexolmo_backend={self.flexolmo_backend!r} resolving "
                            "to Megatron's local modules, which have no TE activation: the experts would apply silu "
                            "to [gate | up] instead of SwiGLU (set it False, or use the 'te' backend)")
        if problems:
            raise ConfigError("not a FlexOlmo configuration: " + "; ".join(problems))
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
            chunks = prepare_for_training(
                chunks, init_from=self.init_from, trainable=self.trainable, owner_expert=self.owner_expert
            )
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


    if trainable not in TRAINABLE_POLICIES:
        raise ConfigError(f"trainable={trainable!r}; expected one of {TRAINABLE_POLICIES}")
    for chunk in chunks:
        model = unwrap(chunk)
        if init_from:

            load_model_weights(model, Path(init_from))
        if trainable == "anchored":
            freezing.anchor(model, owner_expert=owner_expert)
        elif trainable == "router":
            freezing.router_only(model)
    return chunks
