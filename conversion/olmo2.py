"""Read an HF OLMo-2 dense checkpoint (FlexOlmo's public model) as a FlexOlmo with E identical experts.

Upcycling starts here: every expert is a copy of the dense FFN, and all other weights are the
dense model's own (OLMo-2 and FlexOlmo share attention, norms and embeddings exactly).  The dense
model has no router, so router rows are zero -- uniform routing -- until domain embeddings are set
(anchored expert training does that).  With every expert but one masked, the upcycled model
computes exactly the dense model's function.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Mapping

import torch

from flexolmo_plugin.config import FlexOlmoConfig

from .checks import audit_reads
from .mapping import hf_shapes
from .safetensors_reader import CheckpointFormatError, SafetensorsCheckpoint

_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight$")
_ROUTER = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.weight$")
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def is_olmo2_config(raw: Mapping[str, Any]) -> bool:
    return raw.get("model_type") == "olmo2"


class Olmo2AsFlexOlmo:
    """Serves FlexOlmo per-expert HF names from a dense OLMo-2 checkpoint."""

    def __init__(self, checkpoint: SafetensorsCheckpoint, raw: Mapping[str, Any], *, num_experts: int | None,
                 top_k: int | None = None):
        if not num_experts:
            raise CheckpointFormatError("upcycling an OLMo-2 dense model needs --num-experts (e.g. 2)")
        flex_like = dict(raw, model_type="flex_olmo", num_experts=num_experts,
                         num_experts_per_tok=top_k or num_experts, norm_topk_prob=False)
        self.config = FlexOlmoConfig.from_hf(flex_like)
        self.checkpoint = checkpoint
        self.reads: Counter[str] = Counter()
        self._cache: dict[str, torch.Tensor] = {}
        self._validate()

    def _dense_name(self, flex_name: str) -> str | None:
        match = _EXPERT.match(flex_name)
        if match:
            return f"model.layers.{match.group(1)}.mlp.{match.group(2)}.weight"
        if _ROUTER.match(flex_name):
            return None  # no router in a dense model
        return flex_name

    def _validate(self) -> None:
        expected: dict[str, tuple[int, ...]] = {}
        for name, shape in hf_shapes(self.config).items():
            dense = self._dense_name(name)
            if dense is not None:
                expected[dense] = shape
        present = {k for k in self.checkpoint.keys() if not _IGNORED.search(k)}
        missing = sorted(set(expected) - present)
        unexpected = sorted(present - set(expected))
        misshaped = [f"{k} has shape {list(self.checkpoint.shape(k))}, expected {list(s)}"
                     for k, s in expected.items() if k in present and tuple(self.checkpoint.shape(k)) != s]
        problems = []
        if missing:
            problems.append(f"missing tensors: {', '.join(missing[:8])}")
        if unexpected:
            problems.append(f"unexpected tensors (not OLMo-2 with this config): {', '.join(unexpected[:8])}")
        if misshaped:
            problems.append("wrong shapes: " + "; ".join(misshaped[:8]))
        if problems:
            raise CheckpointFormatError(f"{self.checkpoint.directory}: " + " | ".join(problems))

    def get(self, name: str) -> torch.Tensor:
        dense = self._dense_name(name)
        if dense is None:
            layer_router = (self.config.num_experts, self.config.hidden_size)
            dtype = self.checkpoint.dtype("model.norm.weight")
            return torch.zeros(layer_router, dtype=dtype)
        if dense in self._cache:
            return self._cache[dense]
        self.reads[dense] += 1
        tensor = self.checkpoint.get(dense)
        if _EXPERT.match(name):
            # Every expert copy of a layer needs the same three dense FFN tensors, requested layer by
            # layer: keep the current layer's (one FFN's worth of memory).
            layer = dense.split(".")[2]
            for old in [k for k in self._cache if k.split(".")[2] != layer]:
                del self._cache[old]
            self._cache[dense] = tensor
        return tensor

    def audit(self) -> None:
        audit_reads(self.checkpoint.directory, [k for k in self.checkpoint.keys() if not _IGNORED.search(k)],
                    self.reads)
