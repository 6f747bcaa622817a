"""Read an HF OLMo-2 dense checkpoint (FlexOlmo's public model) as a FlexOlmo with E identical experts.

Upcycling starts here: every expert is a copy of the dense FFN, and all other weights are the
dense model's own (OLMo-2 and FlexOlmo share attention, norms and embeddings exactly).  The dense
model has no router, so router rows are zero -- uniform routing -- until domain embeddings are set
(anchored expert training does that).  With every expert but one masked, the upcycled model
computes exactly the dense model's function.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch

from flexolmo_plugin.conversion.mapping import (
    HF_IGNORED,
    Entry,
    entries,
    to_hf,
    to_megatron,
)
from flexolmo_plugin.conversion.safetensors_reader import (
    CheckpointFormatError,
    SafetensorsCheckpoint,
    audit_reads,
)
from flexolmo_plugin.model.config import FlexOlmoConfig


def is_olmo2_config(raw: Mapping[str, Any]) -> bool:
    return raw.get("model_type") == "olmo2"


class Olmo2AsFlexOlmo:
    """Serves FlexOlmo canonical tensors from a dense OLMo-2 checkpoint (names: the table's ``dense``)."""

    def __init__(self, checkpoint: SafetensorsCheckpoint, raw: Mapping[str, Any], *, num_experts: int | None,
                 top_k: int | None = None):
        if not num_experts:
            raise CheckpointFormatError("upcycling an OLMo-2 dense model needs --num-experts (e.g. 2)")
        # Read as OLMo-2 (its defaults, not FlexOlmo's, for keys config.json omits), refusing what the
        # FlexOlmo model would not honour.
        self.config = FlexOlmoConfig.from_hf_olmo2(raw, num_experts=num_experts, top_k=top_k)
        self.checkpoint = checkpoint
        self.reads: Counter[str] = Counter()
        self._cache: dict[str, tuple[int | None, torch.Tensor]] = {}
        self._validate()

    def _validate(self) -> None:
        expected: dict[str, tuple[int, ...]] = {}
        for entry in entries(self.config):
            if entry.dense():  # the dense tensors are shaped like expert 0's HF tensors
                meta = torch.empty(entry.shape(self.config), device="meta")
                expected.update(
                    (name, tuple(t.shape)) for name, t in zip(entry.dense(), to_hf(entry, meta, self.config))
                )
        present = {k for k in self.checkpoint.keys() if not HF_IGNORED.search(k)}
        missing = sorted(set(expected) - present)
        unexpected = sorted(present - set(expected))
        misshaped = [
            f"{k} has shape {list(self.checkpoint.shape(k))}, expected {list(s)}"
            for k, s in expected.items()
            if k in present and tuple(self.checkpoint.shape(k)) != s
        ]
        problems = []
        if missing:
            problems.append(f"missing tensors: {', '.join(missing[:8])}")
        if unexpected:
            problems.append(f"unexpected tensors (not OLMo-2 with this config): {', '.join(unexpected[:8])}")
        if misshaped:
            problems.append("wrong shapes: " + "; ".join(misshaped[:8]))
        if problems:
            raise CheckpointFormatError(f"{self.checkpoint.directory}: " + " | ".join(problems))

    def _read(self, name: str, layer: int | None, reuse: bool) -> torch.Tensor:
        if name in self._cache:
            return self._cache[name][1]
        self.reads[name] += 1
        tensor = self.checkpoint.get(name)
        if reuse:
            # Every expert copy of a layer needs the same dense FFN tensors, requested layer by layer:
            # keep the current layer's (one FFN's worth of memory).
            self._cache = {k: v for k, v in self._cache.items() if v[0] == layer}
            self._cache[name] = (layer, tensor)
        return tensor

    def canonical(self, entry: Entry) -> torch.Tensor:
        """The canonical tensor of ``entry``: the dense model's own, every expert a copy of the dense
        FFN, and zero router rows (uniform routing until domain embeddings are set)."""
        names = entry.dense()
        if not names:
            dtype = self.checkpoint.dtype(next(iter(self.checkpoint.keys())))
            return torch.zeros(entry.shape(self.config), dtype=dtype)
        tensors = tuple(self._read(n, entry.layer, entry.rule.per_expert) for n in names)
        return to_megatron(entry, tensors, self.config)

    def audit(self) -> None:
        audit_reads(
            self.checkpoint.directory, [k for k in self.checkpoint.keys() if not HF_IGNORED.search(k)], self.reads
        )
