"""The one table of FlexOlmo's tensors: every name, shape and split, in one place.

Each :class:`Rule` describes one Megatron tensor of the model (per layer and per expert where it
says so) and everything the tools need to know about it:

* ``megatron`` -- its *canonical* name: global layer and expert indices, the whole (unsharded)
  tensor, i.e. what a Megatron distributed checkpoint stores;
* ``shape`` -- its canonical shape in terms of the :class:`FlexOlmoConfig`;
* ``split`` -- how tensor parallelism cuts it (expert tensors over the expert-TP group, the others
  over the TP group); ``role`` -- what it is to FlexOlmo (shared anchor weight, one expert's FFN, the
  router's domain-embedding rows, the learned router bias), which decides freezing, the anchor,
  package contents, merge and opt-out;
* ``hf`` / ``transform`` -- the HF ``flex_olmo`` tensors it is made of (released per-expert names,
  also what ``transformers`` 5.12 ``save_pretrained`` writes) and how they combine; ``hf_fused`` --
  the transformers-5 in-memory tensor holding all experts of a layer; ``dense`` -- the HF OLMo-2
  tensors of FlexOlmo's dense public model;
* ``param`` -- the parameter in a (possibly sharded) Megatron model; ``checkpoint`` -- its key(s) in
  a torch_dist checkpoint; ``package`` -- its name inside an expert package.

Nothing else in the package spells a tensor name (``tests/test_architecture.py`` checks that):
adding a tensor means adding a rule here.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from flexolmo_plugin.errors import FlexOlmoError
from flexolmo_plugin.model.config import FlexOlmoConfig


class Role(enum.Enum):
    SHARED = "shared"  # embeddings, attention, norms, output layer: part of the anchor
    EXPERT = "expert"  # one expert's FFN tensor (expert 0, the public one, is part of the anchor)
    ROUTER_ROW = "router_row"  # the [E, H] router, stored and trained one domain-embedding row per expert
    ROUTER_BIAS = "router_bias"  # [E-1, 1] learned bias of the non-public experts; not an HF tensor


class Split(enum.Enum):
    """How tensor parallelism cuts a canonical tensor."""

    NONE = "replicated"
    COLUMN = "rows"  # column-parallel layers: output rows over the group
    ROW = "columns"  # row-parallel layers: input columns over the group
    SWIGLU = "halves"  # gated fc1 [gate; up]: each half cut by rows, a rank holds [gate_r; up_r]


@dataclass(frozen=True, kw_only=True)
class Rule:
    megatron: str
    shape: Callable[[FlexOlmoConfig], tuple[int, ...]]
    split: Split
    role: Role = Role.SHARED
    hf: tuple[str, ...] = ()
    transform: str = "copy"  # copy | vocab (rows padded) | qkv (per-KV-group interleave) | swiglu ([gate; up])
    hf_fused: str | None = None  # transformers 5: all experts of a layer stacked on a leading axis
    dense: tuple[str, ...] | None = None  # OLMo-2 dense names (None: same as ``hf``; (): no dense tensor)
    param: str = ""  # "" : same as ``megatron`` with the *local* layer index
    checkpoint: tuple[str, ...] = ()  # keys under the layer axis; () : ``megatron`` without the layer index
    package: str | None = None  # name inside an expert package (the owner's part of the model)

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.megatron

    @property
    def per_expert(self) -> bool:
        return self.role is Role.EXPERT

    @property
    def rows(self) -> bool:
        """Stored and trained one Parameter (and one checkpoint key) per row."""
        return self.role in (Role.ROUTER_ROW, Role.ROUTER_BIAS)

    def present(self, config: FlexOlmoConfig) -> bool:
        return self.role is not Role.ROUTER_BIAS or config.router_bias

    def name(self, *, layer: int | None = None, expert: int | None = None) -> str:
        return self.megatron.format(layer=layer, expert=expert)

    def dense_names(self) -> tuple[str, ...]:
        return self.hf if self.dense is None else self.dense


_L, _H, _K = "decoder.layers.{layer}", "model.layers.{layer}", "decoder.layers"


def _qkv_rows(c: FlexOlmoConfig) -> int:
    return c.query_width + 2 * c.key_width


RULES: tuple[Rule, ...] = (
    Rule(megatron="embedding.word_embeddings.weight", hf=("model.embed_tokens.weight",), transform="vocab",
         shape=lambda c: (c.padded_vocab_size, c.hidden_size), split=Split.COLUMN),
    Rule(megatron=f"{_L}.self_attention.linear_qkv.weight",
         hf=(f"{_H}.self_attn.q_proj.weight", f"{_H}.self_attn.k_proj.weight", f"{_H}.self_attn.v_proj.weight"),
         transform="qkv", shape=lambda c: (_qkv_rows(c), c.hidden_size), split=Split.COLUMN),
    Rule(megatron=f"{_L}.self_attention.q_layernorm.weight", hf=(f"{_H}.self_attn.q_norm.weight",),
         shape=lambda c: (c.query_width,), split=Split.COLUMN),
    Rule(megatron=f"{_L}.self_attention.k_layernorm.weight", hf=(f"{_H}.self_attn.k_norm.weight",),
         shape=lambda c: (c.key_width,), split=Split.COLUMN),
    Rule(megatron=f"{_L}.self_attention.linear_proj.weight", hf=(f"{_H}.self_attn.o_proj.weight",),
         shape=lambda c: (c.hidden_size, c.query_width), split=Split.ROW),
    Rule(megatron=f"{_L}.post_self_attn_layernorm.weight", hf=(f"{_H}.post_attention_layernorm.weight",),
         shape=lambda c: (c.hidden_size,), split=Split.NONE),
    Rule(megatron=f"{_L}.mlp.router.weight", hf=(f"{_H}.mlp.gate.weight",), dense=(),
         shape=lambda c: (c.num_experts, c.hidden_size), split=Split.NONE, role=Role.ROUTER_ROW,
         param=f"{_L}.mlp.router.domain_embeddings.{{row}}",
         checkpoint=(f"{_K}.mlp.router.domain_embeddings.{{row}}",), package="layers.{layer}.router_row"),
    Rule(megatron=f"{_L}.mlp.router.domain_bias", dense=(),
         shape=lambda c: (c.num_experts - 1, 1), split=Split.NONE, role=Role.ROUTER_BIAS,
         param=f"{_L}.mlp.router.domain_biases.{{row}}",
         checkpoint=(f"{_K}.mlp.router.domain_biases.{{row}}",), package="layers.{layer}.router_bias"),
    Rule(megatron=f"{_L}.mlp.experts.{{expert}}.linear_fc1.weight",
         hf=(f"{_H}.mlp.experts.{{expert}}.gate_proj.weight", f"{_H}.mlp.experts.{{expert}}.up_proj.weight"),
         transform="swiglu", hf_fused=f"{_H}.mlp.experts.gate_up_proj",
         dense=(f"{_H}.mlp.gate_proj.weight", f"{_H}.mlp.up_proj.weight"),
         shape=lambda c: (2 * c.intermediate_size, c.hidden_size), split=Split.SWIGLU, role=Role.EXPERT,
         param=f"{_L}.mlp.experts.local_experts.{{local_expert}}.linear_fc1.weight",
         checkpoint=(f"{_K}.mlp.experts.experts.{{expert}}.linear_fc1.weight_w",
                     f"{_K}.mlp.experts.experts.{{expert}}.linear_fc1.weight_v"),
         package="layers.{layer}.linear_fc1.weight"),
    Rule(megatron=f"{_L}.mlp.experts.{{expert}}.linear_fc2.weight",
         hf=(f"{_H}.mlp.experts.{{expert}}.down_proj.weight",), hf_fused=f"{_H}.mlp.experts.down_proj",
         dense=(f"{_H}.mlp.down_proj.weight",),
         shape=lambda c: (c.hidden_size, c.intermediate_size), split=Split.ROW, role=Role.EXPERT,
         param=f"{_L}.mlp.experts.local_experts.{{local_expert}}.linear_fc2.weight",
         checkpoint=(f"{_K}.mlp.experts.experts.{{expert}}.linear_fc2.weight",),
         package="layers.{layer}.linear_fc2.weight"),
    Rule(megatron=f"{_L}.post_mlp_layernorm.weight", hf=(f"{_H}.post_feedforward_layernorm.weight",),
         shape=lambda c: (c.hidden_size,), split=Split.NONE),
    Rule(megatron="decoder.final_layernorm.weight", hf=("model.norm.weight",),
         shape=lambda c: (c.hidden_size,), split=Split.NONE),
    Rule(megatron="output_layer.weight", hf=("lm_head.weight",), transform="vocab",
         shape=lambda c: (c.padded_vocab_size, c.hidden_size), split=Split.COLUMN),
)

# Derived buffers some HF exporters include; recomputed by the model, never loaded.
HF_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# Rule order is checkpoint order; HF files put the tensors before the layers first, then the layers.
_FIRST_LAYER_RULE = next(i for i, rule in enumerate(RULES) if rule.per_layer)


@dataclass(frozen=True)
class Entry:
    """A rule with its placeholders filled in: one canonical tensor of one model."""

    rule: Rule
    megatron: str
    hf: tuple[str, ...]
    layer: int | None
    expert: int | None

    def shape(self, config: FlexOlmoConfig) -> tuple[int, ...]:
        return self.rule.shape(config)

    def dense(self) -> tuple[str, ...]:
        return tuple(name.format(layer=self.layer) for name in self.rule.dense_names())

    def hf_fused(self) -> str | None:
        return self.rule.hf_fused.format(layer=self.layer) if self.rule.hf_fused else None

    def package(self) -> str:
        return self.rule.package.format(layer=self.layer)

    def hf_order(self) -> tuple[int, int, int, int]:
        """Position in HF files: global tensors before the layers, then layer by layer, then the rest."""
        index = RULES.index(self.rule)
        if self.layer is None:
            return (0 if index < _FIRST_LAYER_RULE else 2, 0, index, 0)
        return (1, self.layer, index, self.expert or 0)


def entries(config: FlexOlmoConfig) -> Iterator[Entry]:
    """Every canonical tensor of a model with ``config``, in checkpoint order (the learned router
    bias only when the model has one)."""
    for rule in RULES:
        if not rule.present(config):
            continue
        for layer in (range(config.num_layers) if rule.per_layer else [None]):
            for expert in (range(config.num_experts) if rule.per_expert else [None]):
                fill = {"layer": layer, "expert": expert}
                yield Entry(rule, rule.megatron.format(**fill), tuple(h.format(**fill) for h in rule.hf), layer, expert)


def entries_by_name(config: FlexOlmoConfig) -> dict[str, Entry]:
    return {entry.megatron: entry for entry in entries(config)}


def with_role(config: FlexOlmoConfig, *roles: Role) -> Iterator[Entry]:
    return (entry for entry in entries(config) if entry.rule.role in roles)


def expert_entry(entry: Entry, expert: int) -> str:
    """Canonical name of the same FFN tensor of another expert (same layer)."""
    return entry.rule.name(layer=entry.layer, expert=expert)


# ---------------------------------------------------------------------- HF shapes and transforms
def megatron_shape(entry: Entry, config: FlexOlmoConfig) -> tuple[int, ...]:
    return entry.rule.shape(config)


def hf_shapes(config: FlexOlmoConfig) -> dict[str, tuple[int, ...]]:
    """The shape every HF tensor must have for ``config`` (derived from the canonical shapes through
    :func:`to_hf`, on storage-free tensors)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for entry in entries(config):
        if entry.hf:
            meta = torch.empty(entry.shape(config), device="meta")
            shapes.update((name, tuple(t.shape)) for name, t in zip(entry.hf, to_hf(entry, meta, config)))
    return shapes


def hf_fused_shapes(config: FlexOlmoConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the transformers-5 fused expert tensors (experts on a leading axis)."""
    return {entry.hf_fused(): (config.num_experts, *entry.shape(config))
            for entry in entries(config) if entry.rule.hf_fused}


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


# ---------------------------------------------------------------------- HF name parsing
def _pattern(template: str) -> re.Pattern:
    escaped = re.escape(template)
    for field in ("layer", "expert", "row"):
        escaped = escaped.replace(re.escape("{" + field + "}"), rf"(?P<{field}>\d+)")
    return re.compile(f"^{escaped}$")


_HF_EXPERT = [(rule, i, _pattern(name)) for rule in RULES if rule.per_expert for i, name in enumerate(rule.hf)]
_HF_FUSED = [(rule, _pattern(rule.hf_fused)) for rule in RULES if rule.hf_fused]


def parse_hf_expert_name(name: str) -> tuple[Rule, int, int, int] | None:
    """``(rule, part, layer, expert)`` for a per-expert HF name (``part``: index in ``rule.hf``)."""
    for rule, part, pattern in _HF_EXPERT:
        match = pattern.match(name)
        if match:
            return rule, part, int(match["layer"]), int(match["expert"])
    return None


def parse_hf_fused_name(name: str) -> tuple[Rule, int] | None:
    """``(rule, layer)`` for a transformers-5 fused expert tensor name."""
    for rule, pattern in _HF_FUSED:
        match = pattern.match(name)
        if match:
            return rule, int(match["layer"])
    return None


# ---------------------------------------------------------------------- torch_dist checkpoint keys
# Per-layer tensors are stacked on a leading layer axis (megatron-core 0.19.2's default); each expert
# has its own keys (the gated fc1 as gate / up halves) and each router row and bias its own key, so
# that frozen and trained parts never share a key (:mod:`flexolmo_plugin.model.experts`).
_LAYERED = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


class CheckpointKeyError(FlexOlmoError):
    """A checkpoint chunk that does not fit the FlexOlmo key layout."""


def _checkpoint_templates(rule: Rule) -> tuple[str, ...]:
    if rule.checkpoint:
        return rule.checkpoint
    return (rule.megatron.replace("{layer}.", ""),)


_KEYS = [(rule, part, _pattern(key)) for rule in RULES if rule.per_layer
         for part, key in enumerate(_checkpoint_templates(rule))]


def layer_of(canonical: str) -> int | None:
    match = _LAYERED.match(canonical)
    return int(match.group(1)) if match else None


def canonical_chunk(key: str, prepend_axes: int, offsets, sizes, global_shape) -> tuple[str, tuple]:
    """Canonical tensor name and the index of it that a checkpoint chunk covers."""
    offsets, sizes, global_shape = tuple(offsets), tuple(sizes), tuple(global_shape)
    if prepend_axes < 1:
        return key, tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
    if sizes[0] != 1:
        raise CheckpointKeyError(f"{key}: a chunk spans several layers ({sizes})")
    layer = offsets[0]
    inner = tuple(slice(o, o + s) for o, s in zip(offsets[1:], sizes[1:]))
    for rule, part, pattern in _KEYS:
        match = pattern.match(key)
        if not match:
            continue
        fields = match.groupdict()
        name = rule.name(layer=layer, expert=int(fields["expert"]) if "expert" in fields else None)
        if rule.rows:
            return name, (int(fields["row"]), *inner)
        if part:  # the second half of a gated fc1 sits after the first in the canonical [gate; up]
            rows = global_shape[1]
            inner = (slice(inner[0].start + part * rows, inner[0].stop + part * rows), *inner[1:])
        return name, inner
    rest = key.removeprefix("decoder.layers.")  # a per-layer key the table does not know: kept by name
    return f"decoder.layers.{layer}.{rest}", inner


def canonical_parts(canonical: str, present: dict) -> list[tuple[str, tuple[int, ...], object]]:
    """``(key, layer prefix, place)`` of every checkpoint key a canonical tensor is made of.

    ``place`` is ``None`` (the key holds the whole tensor), ``"w"`` / ``"v"`` (gate / up half of a
    gated fc1) or an int (one router row / bias, keys found in ``present``).  Inverse of
    :func:`canonical_chunk`.
    """
    layer = layer_of(canonical)
    if layer is None:
        return [(canonical, (), None)]
    for rule in RULES:
        match = _pattern(rule.megatron).match(canonical) if rule.per_layer else None
        if not match:
            continue
        expert = match.groupdict().get("expert")
        keys = [t.format(expert=expert, row="{row}") for t in _checkpoint_templates(rule)]
        if rule.rows:
            row_key = _pattern(keys[0])
            rows = sorted(int(m["row"]) for m in map(row_key.match, present) if m)
            return [(keys[0].format(row=row), (layer,), row) for row in rows]
        if len(keys) == 2:
            return [(keys[0], (layer,), "w"), (keys[1], (layer,), "v")]
        return [(keys[0], (layer,), None)]
    raise CheckpointKeyError(f"{canonical}: not a FlexOlmo tensor")


def split_keys(key: str) -> tuple[str, str]:
    """The two keys under which Megatron stores the halves of a gated fc1 saved per expert."""
    return f"{key}_w", f"{key}_v"
