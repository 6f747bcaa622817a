"""Where each canonical FlexOlmo tensor lives in a Megatron torch_dist checkpoint (key layout).

Per-layer tensors are stacked on a leading layer axis (megatron-core 0.19.2's default); each expert
has its own keys, the gated fc1 as ``weight_w`` (gate) and ``weight_v`` (up) halves; each router row
and bias has its own key -- so that frozen and trained parts of the model never share a key
(:mod:`flexolmo_plugin.expert_mlp`).  These two functions are the only code that knows the layout.
"""

from __future__ import annotations

import re

_LAYERS = "decoder.layers."
_EXPERT_KEY = re.compile(r"^mlp\.experts\.experts\.(\d+)\.(linear_fc[12]\.weight)(_w|_v)?$")
_ROW_KEY = re.compile(r"^mlp\.router\.(domain_embeddings|domain_biases)\.(\d+)$")
_ROW_CANONICAL = {"domain_embeddings": "mlp.router.weight", "domain_biases": "mlp.router.domain_bias"}


class McoreLayoutError(ValueError):
    """A checkpoint chunk that does not fit the FlexOlmo key layout."""


def canonical_chunk(key: str, prepend_axes: int, offsets, sizes, global_shape) -> tuple[str, tuple]:
    """Canonical tensor name and the index of it that a checkpoint chunk covers."""
    offsets, sizes, global_shape = tuple(offsets), tuple(sizes), tuple(global_shape)
    if not (key.startswith(_LAYERS) and prepend_axes >= 1):
        return key, tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
    if sizes[0] != 1:
        raise McoreLayoutError(f"{key}: a chunk spans several layers ({sizes})")
    layer, rest = offsets[0], key[len(_LAYERS):]
    inner = tuple(slice(o, o + s) for o, s in zip(offsets[1:], sizes[1:]))
    expert = _EXPERT_KEY.match(rest)
    if expert:
        index, tensor, half = expert.groups()
        name = f"{_LAYERS}{layer}.mlp.experts.{index}.{tensor}"
        if half == "_v":  # the up half sits after the gate half in the canonical [gate; up]
            rows = global_shape[1]
            inner = (slice(inner[0].start + rows, inner[0].stop + rows), *inner[1:])
        return name, inner
    row = _ROW_KEY.match(rest)
    if row:
        return f"{_LAYERS}{layer}.{_ROW_CANONICAL[row.group(1)]}", (int(row.group(2)), *inner)
    return f"{_LAYERS}{layer}.{rest}", inner


LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT_NAME = re.compile(r"^mlp\.experts\.(\d+)\.(linear_fc[12]\.weight)$")


def canonical_parts(canonical: str, present: dict) -> list[tuple[str, tuple[int, ...], object]]:
    """``(key, layer prefix, place)`` of every checkpoint key a canonical tensor is made of.

    ``place`` is ``None`` (the key holds the whole tensor), ``"w"`` / ``"v"`` (gate / up half of a
    gated fc1) or an int (one router row / bias).  Inverse of :func:`canonical_chunk`.
    """
    match = LAYER_NAME.match(canonical)
    if not match:
        return [(canonical, (), None)]
    layer, rest = int(match.group(1)), match.group(2)
    expert = _EXPERT_NAME.match(rest)
    if expert:
        base = f"{_LAYERS}mlp.experts.experts.{expert.group(1)}.{expert.group(2)}"
        if expert.group(2) == "linear_fc1.weight":
            return [(f"{base}_w", (layer,), "w"), (f"{base}_v", (layer,), "v")]
        return [(base, (layer,), None)]
    for kind, canonical_rest in _ROW_CANONICAL.items():
        if rest == canonical_rest:
            rows = sorted(int(k.rsplit(".", 1)[1]) for k in present if k.startswith(f"{_LAYERS}mlp.router.{kind}."))
            return [(f"{_LAYERS}mlp.router.{kind}.{i}", (layer,), i) for i in rows]
    return [(f"{_LAYERS}{rest}", (layer,), None)]
