"""The FlexOlmo architecture as one typed record, and the Megatron ``TransformerConfig`` it implies.

Every entry point (HF import, Megatron-Bridge provider, merge, export) goes through
:class:`FlexOlmoConfig` so that the choices that make our model compute exactly what
``transformers``' ``FlexOlmoForCausalLM`` computes are made in one place:

* router: softmax over *all* experts in fp32, then top-k, no renormalisation
  (``moe_router_pre_softmax=True``, no top-k scaling);
* no biases anywhere, SwiGLU experts, RoPE θ=500000 in rotate-half form, untied output layer;
* Megatron's own per-head ``qk_layernorm`` stays *off*: FlexOlmo normalises q and k over the
  full projection width, which :class:`~flexolmo_plugin.attention.FlexOlmoSelfAttention` does.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from flexolmo_plugin.compat import cpu_model_settings
from flexolmo_plugin.errors import ConfigError
from flexolmo_plugin.model.hf_fields import (  # noqa: F401 -- re-exported: the config's HF reading
    HF_DEFAULTS,
    HF_MODEL_TYPE,
    ExportCompatibilityWarning,
    check_hf_settings,
    check_token_ids,
    config_getter,
    hf_rope_parameters,
    read_hf_fields,
    runtime_compatibility_notes,
)
from flexolmo_plugin.model.layout import ParallelLayout

# An expert name ends up in configurations, tables, package manifests and file names: one plain path
# component (the command line's --name and package names follow the same rule).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_expert_names(names: tuple[str, ...]) -> tuple[str, ...]:
    """``names`` if every one is a safe identifier (1-64 letters, digits, '_', '.', '-', starting with
    a letter or digit, no '..') and none repeats; an owner named like the public expert would make
    every later step (package, merge, opt-out by name) ambiguous."""
    names = tuple(names)
    for name in names:
        if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
            raise ConfigError(f"expert name {name!r} is not a safe identifier: use 1-64 letters, digits, '_', '.' "
                              "or '-', starting with a letter or digit, without '..'")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"expert names must differ, {repeated[0]!r} is given twice ({list(names)}): the owner's "
                          "expert needs a name of its own")
    return names



@dataclass(kw_only=True, frozen=True)
class FlexOlmoConfig:
    """Architecture and routing hyper-parameters of a FlexOlmo model (expert 0 is the public one).

    Attributes:
        vocab_size: tokenizer vocabulary (embedding rows are padded to ``make_vocab_size_divisible_by``).
        hidden_size / intermediate_size / num_layers: model width, each expert's SwiGLU width, depth.
        num_attention_heads / num_key_value_heads / head_dim: attention shape (GQA when fewer KV heads).
        num_experts / top_k: experts (public + owners) and how many each token is routed to.
        rope_theta / rms_norm_eps / max_position_embeddings: as in HF ``flex_olmo``.
        router_bias: the learned bias ``min(b_i, 0)`` of non-public experts (not an HF tensor).
        router_z_loss_coeff / load_balancing_coeff: router losses used in training.
        expert_names: one name per expert, ``expert_names[0]`` the public expert (merge / opt-out).
        pad_token_id / bos_token_id / eos_token_id: kept for HF export.
        hf_settings: transformers-only settings of a source config.json (``HF_SETTINGS``: initialisation,
            KV cache, HF's router outputs and aux-loss weight), written back on export.

    Raises:
        ConfigError: a value FlexOlmo (or this implementation) cannot represent.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # width of each expert's SwiGLU FFN
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_experts: int
    top_k: int
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (as in HF)
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    # Learned router bias min(b_i, 0) on non-public experts (paper §3.4; absent in HF checkpoints).
    router_bias: bool = False
    router_z_loss_coeff: float | None = None
    load_balancing_coeff: float = 0.0
    # Embedding/output rows are padded to a multiple of this so that checkpoints do not depend on
    # the tensor-parallel size; logits are always cut back to ``vocab_size``.
    make_vocab_size_divisible_by: int = 128
    # Names of the experts in order (expert 0 = public); recorded by merge / opt-out.
    expert_names: tuple[str, ...] | None = None
    # HF token ids, kept only so that exports can write them back.
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    hf_settings: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        ints = ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                "num_attention_heads", "num_key_value_heads", "num_experts", "top_k",
                "max_position_embeddings", "make_vocab_size_divisible_by")
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim is not None and (type(self.head_dim) is not int or self.head_dim < 1):
            raise ConfigError(f"head_dim must be a positive integer or None, got {self.head_dim!r}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads}); set head_dim explicitly")
        if self.kv_channels % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.kv_channels}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        for name, low in (("rope_theta", 0), ("rms_norm_eps", 0), ("load_balancing_coeff", None),
                          ("router_z_loss_coeff", None)):
            value = getattr(self, name)
            if value is None and name == "router_z_loss_coeff":
                continue
            # bool is an int, and inf / NaN pass "> 0" / ">= 0" comparisons the wrong way
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                    value <= 0 if low == 0 else value < 0):
                raise ConfigError(f"{name} must be a finite number {'> 0' if low == 0 else '>= 0'}, got {value!r}")
        if not isinstance(self.router_bias, bool):
            raise ConfigError(f"router_bias must be true or false, got {self.router_bias!r}")
        check_token_ids(self.pad_token_id, self.bos_token_id, self.eos_token_id, self.vocab_size)
        object.__setattr__(self, "hf_settings", check_hf_settings(self.hf_settings))
        if self.expert_names is not None:
            if isinstance(self.expert_names, (str, bytes)) or not isinstance(self.expert_names, (list, tuple)):
                raise ConfigError(f"expert_names must be a list of names, got {self.expert_names!r}")
            names = tuple(self.expert_names)
            if len(names) != self.num_experts:
                raise ConfigError(
                    f"expert_names has {len(names)} entries for {self.num_experts} experts")
            object.__setattr__(self, "expert_names", check_expert_names(names))

    # ------------------------------------------------------------------ derived sizes
    @property
    def kv_channels(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def query_width(self) -> int:
        return self.num_attention_heads * self.kv_channels

    @property
    def key_width(self) -> int:
        return self.num_key_value_heads * self.kv_channels

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return ((self.vocab_size + m - 1) // m) * m

    def replace(self, **changes: Any) -> FlexOlmoConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF <-> ours
    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> FlexOlmoConfig:
        """Build from a ``transformers`` ``FlexOlmoConfig`` (or its ``config.json`` dict).

        Values are read as ``transformers`` reads them (:func:`read_hf_fields`), and every value our
        model would compute differently is refused with a :class:`ConfigError` naming the field."""
        model_type = config_getter(hf_config)("model_type")
        if model_type != HF_MODEL_TYPE:
            raise ConfigError(f"expected an HF config with model_type '{HF_MODEL_TYPE}', got {model_type!r}")
        return cls(**{**read_hf_fields(hf_config, HF_MODEL_TYPE), **overrides})

    @classmethod
    def from_hf_olmo2(cls, hf_config: Any, *, num_experts: int, top_k: int | None = None,
                      **overrides: Any) -> FlexOlmoConfig:
        """An HF OLMo-2 dense config read as FlexOlmo with ``num_experts`` copies of its FFN (upcycling;
        ``top_k`` defaults to all of them).  OLMo-2's own defaults apply to keys its config.json omits
        (RoPE base 10000, RMSNorm epsilon 1e-5): they are not FlexOlmo's."""
        fields = read_hf_fields(hf_config, "olmo2")
        fields.update(num_experts=num_experts, top_k=num_experts if top_k is None else top_k, **overrides)
        return cls(**fields)

    def to_hf_dict(self) -> dict[str, Any]:
        """``config.json`` content for ``transformers``' ``FlexOlmoConfig``.

        ``rope_theta`` is written at the top level too: ``transformers`` before 5 and vLLM read it there
        (and ``transformers`` 5 prefers the one in ``rope_parameters``, which is the same value).  Warns
        (:class:`ExportCompatibilityWarning`) about what other runtimes would load differently."""
        for message in runtime_compatibility_notes(self):
            warnings.warn(message, ExportCompatibilityWarning, stacklevel=2)
        out = {
            "architectures": ["FlexOlmoForCausalLM"],
            "model_type": HF_MODEL_TYPE,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.top_k,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rope_theta": self.rope_theta,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "norm_topk_prob": False,
            "tie_word_embeddings": False,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.head_dim is not None:
            out["head_dim"] = self.head_dim
        if self.expert_names is not None:  # kept by transformers as an extra key; read back by our import
            out["expert_names"] = list(self.expert_names)
        out.update(self.hf_settings)
        return out


def megatron_fields(config: FlexOlmoConfig, layout: ParallelLayout | None = None, *,
                    dispatcher: str = "alltoall") -> dict[str, Any]:
    """The ``TransformerConfig`` fields that make Megatron compute FlexOlmo at ``layout``.

    The one translation from :class:`FlexOlmoConfig` to Megatron: :func:`to_transformer_config`
    (hence ``build_model``) and the Megatron-Bridge provider both take their fields from here.
    Everything not set here keeps Megatron's (or Bridge's) own default; on a machine without CUDA
    :func:`flexolmo_plugin.compat.cpu_model_settings` adds the CPU-only settings.
    """
    layout = layout or ParallelLayout()
    layout.check(config)
    lb_coeff = config.load_balancing_coeff
    fields: dict[str, Any] = dict(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_key_value_heads,
        kv_channels=config.kv_channels,
        ffn_hidden_size=config.intermediate_size,
        moe_ffn_hidden_size=config.intermediate_size,
        num_moe_experts=config.num_experts,
        moe_router_topk=config.top_k,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=True,  # softmax over all experts, then top-k ...
        moe_router_topk_scaling_factor=None,  # ... with no renormalisation or scaling
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss" if lb_coeff > 0 else "none",
        moe_aux_loss_coeff=lb_coeff,
        moe_z_loss_coeff=config.router_z_loss_coeff,
        moe_token_dispatcher_type=dispatcher,
        moe_grouped_gemm=False,  # SequentialMLP: one module per expert, so experts freeze one by one
        moe_shared_expert_intermediate_size=None,
        normalization="RMSNorm",
        layernorm_epsilon=config.rms_norm_eps,
        qk_layernorm=False,  # FlexOlmo's full-width q/k norm is installed by FlexOlmoSelfAttention
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        init_method_std=0.02,
        **layout.megatron_fields(),
        **cpu_model_settings(),
    )
    return fields


def gpt_model_fields(config: FlexOlmoConfig) -> dict[str, Any]:
    """The ``GPTModel`` arguments (besides config and spec) of a FlexOlmo model."""
    return dict(vocab_size=config.padded_vocab_size, max_sequence_length=config.max_position_embeddings,
                position_embedding_type="rope", rotary_percent=1.0, rotary_base=config.rope_theta,
                share_embeddings_and_output_weights=False)


def to_transformer_config(
    config: FlexOlmoConfig,
    layout: ParallelLayout | None = None,
    *,
    params_dtype: torch.dtype = torch.float32,
    dispatcher: str = "alltoall",
    **overrides: Any,
):
    """The Megatron ``TransformerConfig`` for ``config`` at ``layout`` (``overrides`` win)."""

    fields = megatron_fields(config, layout, dispatcher=dispatcher)
    fields.update(params_dtype=params_dtype, pipeline_dtype=params_dtype, bf16=params_dtype == torch.bfloat16,
                  fp16=params_dtype == torch.float16)
    fields.update(overrides)
    return TransformerConfig(**fields)


def from_megatron_fields(fields: Any, **flexolmo_fields: Any) -> FlexOlmoConfig:
    """Inverse of :func:`megatron_fields`: the :class:`FlexOlmoConfig` an object with Megatron's field
    names describes (a ``TransformerConfig`` or a Bridge provider).  ``flexolmo_fields`` supply what
    Megatron does not store (vocabulary, positions, expert names, token ids, router bias)."""
    heads, hidden = fields.num_attention_heads, fields.hidden_size
    default_head_dim = hidden // heads if heads and hidden % heads == 0 else None
    head_dim = None if fields.kv_channels in (None, default_head_dim) else fields.kv_channels
    lb = fields.moe_aux_loss_coeff if fields.moe_router_load_balancing_type != "none" else 0.0
    if not isinstance(lb, (int, float)):
        raise ConfigError(f"per-layer moe_aux_loss_coeff {lb!r} is not supported by FlexOlmoConfig")
    return FlexOlmoConfig(
        hidden_size=hidden,
        intermediate_size=fields.moe_ffn_hidden_size or fields.ffn_hidden_size,
        num_layers=fields.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=fields.num_query_groups or heads,
        num_experts=fields.num_moe_experts,
        top_k=fields.moe_router_topk,
        head_dim=head_dim,
        rms_norm_eps=fields.layernorm_epsilon,
        router_z_loss_coeff=fields.moe_z_loss_coeff,
        load_balancing_coeff=float(lb),
        **flexolmo_fields,
    )


def from_provider_fields(provider: Any) -> FlexOlmoConfig:
    """The :class:`FlexOlmoConfig` a Megatron-Bridge ``FlexOlmoModelProvider`` describes -- the provider
    itself or the ``model`` section of a Bridge ``run_config.yaml`` (as attributes): Megatron's fields
    plus the ones only our provider carries.  The one inverse of the provider's construction, used by
    ``FlexOlmoModelProvider.to_flexolmo_config`` and by the tools that read plain-Bridge checkpoints."""
    names = getattr(provider, "expert_names", None)
    return from_megatron_fields(
        provider,
        vocab_size=provider.vocab_size,
        rope_theta=float(provider.rotary_base),
        max_position_embeddings=getattr(provider, "max_position_embeddings", None) or provider.seq_length,
        router_bias=provider.router_bias,
        make_vocab_size_divisible_by=provider.make_vocab_size_divisible_by,
        expert_names=None if names is None else tuple(names),
        pad_token_id=getattr(provider, "pad_token_id", None),
        bos_token_id=getattr(provider, "bos_token_id", None),
        eos_token_id=getattr(provider, "eos_token_id", None),
        hf_settings=getattr(provider, "hf_settings", None) or (),
    )
