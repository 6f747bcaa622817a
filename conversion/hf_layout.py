"""A per-expert view of an HF FlexOlmo checkpoint, whichever expert layout it was saved in.

Released FlexOlmo checkpoints (and ``transformers`` 5.12 ``save_pretrained``) store each expert's
``gate_proj`` / ``up_proj`` / ``down_proj`` separately; the ``transformers`` 5 in-memory module
(and state dicts saved straight from it) fuse them into ``mlp.experts.gate_up_proj [E, 2I, H]``
and ``mlp.experts.down_proj [E, H, I]``.  The mapping table speaks only the per-expert names, and
this adapter serves them from either layout.

Before a single tensor is read, the whole key set is checked against what the configuration
implies: missing, unexpected and misshaped tensors are reported together, by name.
"""

from __future__ import annotations

import re
from collections import Counter

import torch

from flexolmo_plugin.config import FlexOlmoConfig

from .checks import audit_reads
from .mapping import hf_shapes
from .safetensors_reader import CheckpointFormatError, SafetensorsCheckpoint

_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# Derived buffers some exporters include; recomputed by the model, never loaded.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _summarise(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")


class HFWeights:
    """Serves canonical per-expert HF tensor names from a validated checkpoint."""

    def __init__(self, checkpoint: SafetensorsCheckpoint, config: FlexOlmoConfig):
        self.checkpoint = checkpoint
        self.config = config
        self._fused_cache: dict[str, torch.Tensor] = {}
        self.expected = hf_shapes(config)
        self.fused_layers: set[int] = set()
        self.reads: Counter[str] = Counter()  # file key -> times read (the audit's evidence)
        self._validate()

    # ------------------------------------------------------------------ validation
    def _fused_shape(self, kind: str) -> tuple[int, ...]:
        c = self.config
        if kind == "gate_up_proj":
            return (c.num_experts, 2 * c.intermediate_size, c.hidden_size)
        return (c.num_experts, c.hidden_size, c.intermediate_size)

    def _validate(self) -> None:
        present = set(self.checkpoint.keys())
        unexpected, misshaped, wrong_dtype = [], [], []
        per_expert_layers: set[int] = set()
        for key in sorted(present):
            if _IGNORED.search(key):
                continue
            fused = _FUSED.match(key)
            if fused:
                self.fused_layers.add(int(fused.group(1)))
                expected = self._fused_shape(fused.group(2))
                if int(fused.group(1)) >= self.config.num_layers:
                    unexpected.append(key)
                    continue
            elif key in self.expected:
                expected = self.expected[key]
                match = _PER_EXPERT.match(key)
                if match:
                    per_expert_layers.add(int(match.group(1)))
            else:
                unexpected.append(key)
                continue
            shape = tuple(self.checkpoint.shape(key))
            if shape != expected:
                misshaped.append(f"{key} has shape {list(shape)}, expected {list(expected)}")
            if self.checkpoint.dtype(key) not in FLOAT_DTYPES:
                wrong_dtype.append(f"{key} is {self.checkpoint.dtype(key)}")
        both = sorted(self.fused_layers & per_expert_layers)
        missing = [k for k in self.expected if not self._available(k, present)]
        problems = []
        if missing:
            problems.append(f"missing tensors: {_summarise(missing)}")
        if unexpected:
            problems.append(f"unexpected tensors (not part of a FlexOlmo model with this config): "
                            f"{_summarise(unexpected)}")
        if misshaped:
            problems.append("wrong shapes: " + "; ".join(misshaped[:8]))
        if wrong_dtype:
            problems.append("non-floating tensors: " + "; ".join(wrong_dtype[:8]))
        if both:
            problems.append(f"layers {both} store experts both fused and per expert")
        if problems:
            raise CheckpointFormatError(f"{self.checkpoint.directory}: " + " | ".join(problems))

    def _available(self, name: str, present: set[str]) -> bool:
        if name in present:
            return True
        match = _PER_EXPERT.match(name)
        if not match:
            return False
        layer, _, kind = match.groups()
        fused = "down_proj" if kind == "down_proj" else "gate_up_proj"
        return f"model.layers.{layer}.mlp.experts.{fused}" in present

    # ------------------------------------------------------------------ access
    def _read(self, key: str) -> torch.Tensor:
        self.reads[key] += 1
        return self.checkpoint.get(key)

    def _fused(self, key: str) -> torch.Tensor:
        """Fused expert tensors of the current layer (gate_up and down), read once each.

        Experts are requested layer by layer, alternating between the two fused tensors, so two
        entries suffice; each is the largest tensor of such a file, which bounds memory."""
        if key not in self._fused_cache:
            layer = key.split(".")[2]
            for old in [k for k in self._fused_cache if k.split(".")[2] != layer]:
                del self._fused_cache[old]
            self._fused_cache[key] = self._read(key)
        return self._fused_cache[key]

    def audit(self) -> None:
        """Every stored tensor (derived buffers aside) was read exactly once."""
        audit_reads(self.checkpoint.directory, [k for k in self.checkpoint.keys() if not _IGNORED.search(k)],
                    self.reads)

    def get_concat(self, names: tuple[str, ...]) -> torch.Tensor:
        """``torch.cat([get(n) for n in names])``, with stored tensors read straight into their
        rows: a gated FFN's gate and up halves are most of a model's bytes, and the
        concatenation would copy each of them a second time."""
        stored = [n in self.checkpoint for n in names]
        dtypes = {self.checkpoint.dtype(n) for n, s in zip(names, stored) if s}
        if not all(stored) or len(dtypes) != 1:
            return torch.cat([self.get(n) for n in names])
        shapes = [tuple(self.checkpoint.shape(n)) for n in names]  # validated against the config already
        out = torch.empty((sum(s[0] for s in shapes), *shapes[0][1:]), dtype=dtypes.pop())
        row = 0
        for name, shape in zip(names, shapes):
            self.reads[name] += 1
            self.checkpoint.read_into(name, out[row:row + shape[0]])
            row += shape[0]
        return out

    def get(self, name: str) -> torch.Tensor:
        """The tensor stored (or derivable) under the per-expert HF name ``name``."""
        if name in self.checkpoint:
            return self._read(name)
        match = _PER_EXPERT.match(name)
        if not match:
            raise CheckpointFormatError(f"{self.checkpoint.directory}: no tensor {name!r}")
        layer, expert, kind = match.groups()
        expert = int(expert)
        if kind == "down_proj":
            return self._fused(f"model.layers.{layer}.mlp.experts.down_proj")[expert]
        gate_up = self._fused(f"model.layers.{layer}.mlp.experts.gate_up_proj")[expert]
        gate, up = gate_up.chunk(2, dim=0)
        return gate if kind == "gate_proj" else up
