"""The one HF ⇄ Megatron mapping table for FlexOlmo, and the tensor transforms it names.

Megatron names here are *canonical*: global layer and expert indices, whole (unsharded) tensors,
i.e. what a Megatron distributed checkpoint stores, with experts written per expert.  How a
canonical tensor is split over TP/EP ranks is a separate concern
(:mod:`flexolmo_plugin.parameters`), so this table is the same for every parallel layout and is
shared by import, export and merge.

HF names are those of the released FlexOlmo checkpoints (per-expert ``gate_proj``/``up_proj``/
``down_proj``), which is also what ``transformers`` 5.12 ``save_pretrained`` writes; the fused
in-memory layout of transformers 5 is translated to these names by :mod:`conversion.hf_layout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from flexolmo_plugin.config import FlexOlmoConfig

LAYER = "{layer}"
EXPERT = "{expert}"


@dataclass(frozen=True, kw_only=True)
class Rule:
    """One Megatron tensor and the HF tensors it is made of.

    ``transform`` names how the HF tensors combine: ``copy`` (same tensor), ``vocab`` (rows padded
    to the padded vocabulary), ``qkv`` (q, k, v interleaved per KV group, Megatron's fused QKV
    layout) or ``swiglu`` (gate rows then up rows: Megatron's gated fc1 applies silu to the first
    half).
    """

    megatron: str
    hf: tuple[str, ...]
    transform: str = "copy"

    @property
    def per_layer(self) -> bool:
        return LAYER in self.megatron

    @property
    def per_expert(self) -> bool:
        return EXPERT in self.megatron


_L = "decoder.layers.{layer}"
_H = "model.layers.{layer}"

RULES: tuple[Rule, ...] = (
    Rule(megatron="embedding.word_embeddings.weight", hf=("model.embed_tokens.weight",), transform="vocab"),
    Rule(megatron=f"{_L}.self_attention.linear_qkv.weight",
         hf=(f"{_H}.self_attn.q_proj.weight", f"{_H}.self_attn.k_proj.weight", f"{_H}.self_attn.v_proj.weight"),
         transform="qkv"),
    Rule(megatron=f"{_L}.self_attention.q_layernorm.weight", hf=(f"{_H}.self_attn.q_norm.weight",)),
    Rule(megatron=f"{_L}.self_attention.k_layernorm.weight", hf=(f"{_H}.self_attn.k_norm.weight",)),
    Rule(megatron=f"{_L}.self_attention.linear_proj.weight", hf=(f"{_H}.self_attn.o_proj.weight",)),
    Rule(megatron=f"{_L}.post_self_attn_layernorm.weight", hf=(f"{_H}.post_attention_layernorm.weight",)),
    Rule(megatron=f"{_L}.mlp.router.weight", hf=(f"{_H}.mlp.gate.weight",)),
    Rule(megatron=f"{_L}.mlp.experts.{{expert}}.linear_fc1.weight",
         hf=(f"{_H}.mlp.experts.{{expert}}.gate_proj.weight", f"{_H}.mlp.experts.{{expert}}.up_proj.weight"),
         transform="swiglu"),
    Rule(megatron=f"{_L}.mlp.experts.{{expert}}.linear_fc2.weight",
         hf=(f"{_H}.mlp.experts.{{expert}}.down_proj.weight",)),
    Rule(megatron=f"{_L}.post_mlp_layernorm.weight", hf=(f"{_H}.post_feedforward_layernorm.weight",)),
    Rule(megatron="decoder.final_layernorm.weight", hf=("model.norm.weight",)),
    Rule(megatron="output_layer.weight", hf=("lm_head.weight",), transform="vocab"),
)

# Megatron-only tensors: the learned router bias has no place in HF ``flex_olmo``.
ROUTER_BIAS = f"{_L}.mlp.router.domain_bias"


@dataclass(frozen=True)
class Entry:
    """A rule with its placeholders filled in."""

    rule: Rule
    megatron: str
    hf: tuple[str, ...]
    layer: int | None
    expert: int | None


def entries(config: FlexOlmoConfig) -> Iterator[Entry]:
    """Every (Megatron tensor, HF tensors) pair of a model, in checkpoint order."""
    for rule in RULES:
        layers = range(config.num_layers) if rule.per_layer else [None]
        for layer in layers:
            experts = range(config.num_experts) if rule.per_expert else [None]
            for expert in experts:
                fill = {"layer": layer, "expert": expert}
                yield Entry(rule, rule.megatron.format(**fill) if rule.per_layer else rule.megatron,
                            tuple(h.format(**fill) if rule.per_layer else h for h in rule.hf),
                            layer, expert)


# ---------------------------------------------------------------------- shapes
def hf_shapes(config: FlexOlmoConfig) -> dict[str, tuple[int, ...]]:
    """The shape every HF tensor must have for ``config``."""
    h, i, e = config.hidden_size, config.intermediate_size, config.num_experts
    q, k, v = config.query_width, config.key_width, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {}
    suffix_shape = {
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (k, h),
        "self_attn.v_proj.weight": (k, h), "self_attn.o_proj.weight": (h, q),
        "self_attn.q_norm.weight": (q,), "self_attn.k_norm.weight": (k,),
        "post_attention_layernorm.weight": (h,), "post_feedforward_layernorm.weight": (h,),
        "mlp.gate.weight": (e, h), "gate_proj.weight": (i, h), "up_proj.weight": (i, h),
        "down_proj.weight": (h, i),
    }
    globals_ = {"model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "model.norm.weight": (h,)}
    for entry in entries(config):
        for name in entry.hf:
            if name in globals_:
                shapes[name] = globals_[name]
            else:
                shapes[name] = next(s for suf, s in suffix_shape.items() if name.endswith(suf))
    return shapes


def megatron_shape(entry: Entry, config: FlexOlmoConfig) -> tuple[int, ...]:
    h, i = config.hidden_size, config.intermediate_size
    name = entry.megatron
    if entry.rule.transform == "vocab":
        return (config.padded_vocab_size, h)
    if entry.rule.transform == "qkv":
        return (config.query_width + 2 * config.key_width, h)
    if entry.rule.transform == "swiglu":
        return (2 * i, h)
    if name.endswith("linear_fc2.weight"):
        return (h, i)
    if name.endswith("linear_proj.weight"):
        return (h, config.query_width)
    if name.endswith("router.weight"):
        return (config.num_experts, h)
    if name.endswith("q_layernorm.weight"):
        return (config.query_width,)
    if name.endswith("k_layernorm.weight"):
        return (config.key_width,)
    return (h,)


# ---------------------------------------------------------------------- transforms
def _qkv_groups(config: FlexOlmoConfig) -> tuple[int, int, int]:
    groups = config.num_key_value_heads
    return groups, config.num_attention_heads // groups, config.kv_channels


def to_megatron(entry: Entry, hf_tensors: tuple[torch.Tensor, ...], config: FlexOlmoConfig) -> torch.Tensor:
    """The canonical Megatron tensor built from the entry's HF tensors."""
    kind = entry.rule.transform
    if kind == "copy":
        (t,) = hf_tensors
        return t
    if kind == "vocab":
        (t,) = hf_tensors
        pad = config.padded_vocab_size - t.shape[0]
        return torch.cat([t, t.new_zeros(pad, t.shape[1])]) if pad else t
    if kind == "swiglu":
        gate, up = hf_tensors
        return torch.cat([gate, up], dim=0)
    if kind == "qkv":
        q, k, v = hf_tensors
        groups, per_group, head_dim = _qkv_groups(config)
        hidden = q.shape[-1]
        return torch.cat([q.reshape(groups, per_group * head_dim, hidden),
                          k.reshape(groups, head_dim, hidden),
                          v.reshape(groups, head_dim, hidden)], dim=1).reshape(-1, hidden)
    raise ValueError(f"unknown transform {kind!r}")


def to_hf(entry: Entry, tensor: torch.Tensor, config: FlexOlmoConfig) -> tuple[torch.Tensor, ...]:
    """Inverse of :func:`to_megatron`: the entry's HF tensors from the canonical Megatron tensor."""
    kind = entry.rule.transform
    if kind == "copy":
        return (tensor,)
    if kind == "vocab":
        return (tensor[: config.vocab_size],)
    if kind == "swiglu":
        gate, up = tensor.chunk(2, dim=0)
        return (gate, up)
    if kind == "qkv":
        groups, per_group, head_dim = _qkv_groups(config)
        hidden = tensor.shape[-1]
        grouped = tensor.reshape(groups, (per_group + 2) * head_dim, hidden)
        q, k, v = grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)
        return (q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden))
    raise ValueError(f"unknown transform {kind!r}")
