"""A per-expert view of an HF FlexOlmo checkpoint, whichever expert layout it was saved in.

Released FlexOlmo checkpoints (and ``transformers`` 5.12 ``save_pretrained``) store each expert's
gate / up / down projections separately; the ``transformers`` 5 in-memory module (and state dicts
saved straight from it) fuse them into one tensor per layer with the experts on a leading axis.
Which fused tensor holds an expert's weights is part of the mapping table (``Rule.hf_fused``), and
this adapter serves canonical tensors from either layout.

Before a single tensor is read, the whole key set is checked against what the configuration
implies: missing, unexpected and misshaped tensors are reported together, by name.
"""

from __future__ import annotations

from collections import Counter

import torch

from flexolmo_plugin.conversion.mapping import (
    HF_IGNORED,
    Entry,
    hf_fused_shapes,
    hf_shapes,
    parse_hf_expert_name,
    parse_hf_fused_name,
    to_megatron,
)
from flexolmo_plugin.conversion.safetensors_reader import (
    CheckpointFormatError,
    SafetensorsCheckpoint,
    audit_reads,
)
from flexolmo_plugin.model.config import FlexOlmoConfig

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _summarise(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")


class HFWeights:
    """Serves canonical Megatron tensors (and per-expert HF tensors) from a validated checkpoint."""

    def __init__(self, checkpoint: SafetensorsCheckpoint, config: FlexOlmoConfig):
        self.checkpoint = checkpoint
        self.config = config
        self._fused_cache: dict[str, torch.Tensor] = {}
        self.expected = hf_shapes(config)
        self.fused_expected = hf_fused_shapes(config)
        self.fused_layers: set[int] = set()
        self.reads: Counter[str] = Counter()  # file key -> times read (the audit's evidence)
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        present = set(self.checkpoint.keys())
        unexpected, misshaped, wrong_dtype = [], [], []
        per_expert_layers: set[int] = set()
        for key in sorted(present):
            if HF_IGNORED.search(key):
                continue
            fused = parse_hf_fused_name(key)
            if fused:
                self.fused_layers.add(fused[1])
                if key not in self.fused_expected:
                    unexpected.append(key)
                    continue
                expected = self.fused_expected[key]
            elif key in self.expected:
                expected = self.expected[key]
                parsed = parse_hf_expert_name(key)
                if parsed:
                    per_expert_layers.add(parsed[2])
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
        parsed = parse_hf_expert_name(name)
        return parsed is not None and parsed[0].hf_fused.format(layer=parsed[2]) in present

    # ------------------------------------------------------------------ access
    def _read(self, key: str) -> torch.Tensor:
        self.reads[key] += 1
        return self.checkpoint.get(key)

    def _fused(self, key: str, layer: int) -> torch.Tensor:
        """Fused expert tensors of the current layer, read once each.

        Experts are requested layer by layer, alternating between a layer's fused tensors, so the
        current layer's suffice; each is the largest tensor of such a file, which bounds memory."""
        if key not in self._fused_cache:
            for old in [k for k, (cached_layer, _) in self._fused_cache.items() if cached_layer != layer]:
                del self._fused_cache[old]
            self._fused_cache[key] = (layer, self._read(key))
        return self._fused_cache[key][1]

    def audit(self) -> None:
        """Every stored tensor (derived buffers aside) was read exactly once."""
        audit_reads(self.checkpoint.directory, [k for k in self.checkpoint.keys() if not HF_IGNORED.search(k)],
                    self.reads)

    def canonical(self, entry: Entry) -> torch.Tensor:
        """The canonical Megatron tensor of ``entry``, from per-expert tensors or a fused one."""
        fused = entry.hf_fused()
        if fused is not None and fused in self.checkpoint:
            return self._fused(fused, entry.layer)[entry.expert]
        return self._read_into_canonical(entry)

    def _read_into_canonical(self, entry: Entry) -> torch.Tensor:
        """``to_megatron`` of the stored tensors; a gated FFN's gate and up halves (most of a
        model's bytes) are read straight into their rows instead of being concatenated afterwards."""
        names = entry.hf
        dtypes = {self.checkpoint.dtype(n) for n in names}
        if entry.rule.transform != "swiglu" or len(dtypes) != 1:
            return to_megatron(entry, tuple(self._read(n) for n in names), self.config)
        shapes = [tuple(self.checkpoint.shape(n)) for n in names]  # validated against the config already
        out = torch.empty((sum(s[0] for s in shapes), *shapes[0][1:]), dtype=dtypes.pop())
        row = 0
        for name, shape in zip(names, shapes):
            self.reads[name] += 1
            self.checkpoint.read_into(name, out[row:row + shape[0]])
            row += shape[0]
        return out
