"""HF ⇄ Megatron conversion of whole FlexOlmo checkpoints: streaming, audited, atomic.

* :func:`hf_to_mcore` -- HF FlexOlmo (or OLMo-2 dense, upcycled to E identical experts) → a
  ``torch_dist`` checkpoint plus ``flexolmo_config.json``; ``flexolmo_plugin.from_mcore`` loads it
  at any TP/EP layout.
* :func:`mcore_to_hf` -- back to sharded safetensors + index + ``config.json`` (released per-expert
  names), loadable by ``transformers``; works for checkpoints saved at any layout.

Both directions hold about one tensor at a time, check every tensor against the configuration
before writing anything, prove afterwards that every source tensor was used exactly once and every
target written exactly once, and write into a temporary directory renamed into place at the end.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flexolmo_plugin.config import FlexOlmoConfig

from .atomic import atomic_directory, check_new_output
from .checks import all_finite
from .dcp_io import reuse_freed_memory
from .hf_layout import HFWeights
from .mapping import RULES, entries, hf_shapes, megatron_shape, to_hf, to_megatron
from .mcore_io import (McoreCheckpointError, check_canonical_shapes, check_is_checkpoint, iter_canonical, load_config,
                       save_config, write_checkpoint)
from .olmo2 import Olmo2AsFlexOlmo, is_olmo2_config
from .safetensors_reader import CheckpointFormatError, SafetensorsCheckpoint
from .safetensors_writer import ShardedSafetensorsWriter

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json", "added_tokens.json")


@dataclass(frozen=True)
class ConversionReport:
    tensors: int
    bytes: int
    seconds: float
    output: Path

    @property
    def throughput_mb_s(self) -> float:
        return self.bytes / 2**20 / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        return (f"{self.tensors} tensors, {self.bytes / 2**20:.1f} MiB in {self.seconds:.1f} s "
                f"({self.throughput_mb_s:.1f} MiB/s) -> {self.output}")


class ProgressMeter:
    def __init__(self, total_bytes: int, enabled: bool, label: str):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=label)
        self.tensors = 0
        self.bytes = 0

    def __call__(self, name: str, nbytes: int) -> None:
        self.tensors += 1
        self.bytes += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _single_dtype(checkpoint: SafetensorsCheckpoint) -> torch.dtype:
    dtypes = {checkpoint.dtype(k) for k in checkpoint.keys()}
    if len(dtypes) != 1:
        raise CheckpointFormatError(f"{checkpoint.directory}: tensors have several dtypes {sorted(map(str, dtypes))}; "
                                    "pass an explicit dtype")
    return dtypes.pop()


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            dst.mkdir(exist_ok=True)
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def hf_to_mcore(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
                num_experts: int | None = None, top_k: int | None = None, progress: bool = False) -> ConversionReport:
    """Convert an HF FlexOlmo (or OLMo-2 dense, with ``num_experts`` copies) checkpoint to Megatron."""
    start = time.perf_counter()
    hf_dir = Path(hf_dir)
    check_new_output(out_dir)
    reuse_freed_memory()
    with SafetensorsCheckpoint.open(hf_dir) as checkpoint:
        raw_config = checkpoint.config()
        if raw_config is None:
            raise CheckpointFormatError(f"{hf_dir}: no config.json (needed to know the model's shape)")
        if is_olmo2_config(raw_config):
            weights = Olmo2AsFlexOlmo(checkpoint, raw_config, num_experts=num_experts, top_k=top_k)
            config = weights.config
        else:
            if num_experts is not None:
                raise CheckpointFormatError("--num-experts only applies to OLMo-2 dense sources")
            config = FlexOlmoConfig.from_hf(raw_config, **({"top_k": top_k} if top_k else {}))
            weights = HFWeights(checkpoint, config)
        dtype = dtype or _single_dtype(checkpoint)
        by_name = {e.megatron: e for e in entries(config)}
        itemsize = torch.empty((), dtype=dtype).element_size()
        total = sum(itemsize * _numel(megatron_shape(e, config)) for e in by_name.values())
        meter = ProgressMeter(total, progress, "hf -> mcore")

        def source(name: str) -> torch.Tensor:
            entry = by_name[name]
            if entry.rule.transform == "swiglu" and isinstance(weights, HFWeights):
                return weights.get_concat(entry.hf)  # the table's [gate; up], read in place
            return to_megatron(entry, tuple(weights.get(h) for h in entry.hf), config)

        try:
            with atomic_directory(out_dir) as tmp:
                write_checkpoint(tmp, config, source, dtype=dtype, expected=set(by_name), on_tensor=meter)
                weights.audit()
                copied = copy_tokenizer_files(hf_dir, tmp / "tokenizer")
                save_config(tmp, config, dtype=dtype,
                            extra={"source": {"format": "olmo2" if is_olmo2_config(raw_config) else "hf",
                                              "path": str(hf_dir.resolve())},
                                   "tokenizer_files": copied})
        finally:
            meter.close()
    return ConversionReport(meter.tensors, meter.bytes, time.perf_counter() - start, Path(out_dir))


def _hf_order(config: FlexOlmoConfig):
    """Entries in HF file order: embeddings, then layer by layer, then final norm and head."""
    rule_index = {rule: i for i, rule in enumerate(RULES)}

    def key(entry):
        if entry.layer is None:
            return (0 if entry.megatron.startswith("embedding") else 2, 0, 0, 0)
        return (1, entry.layer, rule_index[entry.rule], entry.expert or 0)

    return sorted(entries(config), key=key)


def router_bias_magnitude(mcore_dir: str | os.PathLike) -> float:
    """Largest |min(b, 0)| over all layers' router biases (0 when the model has none)."""
    config, _, _ = load_config(mcore_dir)
    if not config.router_bias:
        return 0.0
    from .mcore_io import CanonicalReader

    reader = CanonicalReader(mcore_dir)
    return max(reader.read(f"decoder.layers.{layer}.mlp.router.domain_bias").float().clamp(max=0).abs().max().item()
               for layer in range(config.num_layers))


def mcore_to_hf(mcore_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
                max_shard_bytes: int = 5 * 2**30, drop_router_bias: bool = False,
                progress: bool = False) -> ConversionReport:
    """Convert a FlexOlmo torch_dist checkpoint (any save layout) to an HF directory.

    HF ``flex_olmo`` has no router bias.  A model whose biases are all zero (no effect) exports as
    is; a non-zero bias is refused unless ``drop_router_bias`` -- the export then computes a
    different function (see :func:`router_bias_logit_change`).
    """
    start = time.perf_counter()
    mcore_dir = Path(mcore_dir)
    check_new_output(out_dir)
    reuse_freed_memory()
    config, stored_dtype, _ = load_config(mcore_dir)
    check_is_checkpoint(mcore_dir)
    check_canonical_shapes(mcore_dir, {e.megatron: megatron_shape(e, config) for e in entries(config)})
    bias = router_bias_magnitude(mcore_dir)
    if bias > 0 and not drop_router_bias:
        raise McoreCheckpointError(
            f"{mcore_dir}: the model has a learned router bias (largest |min(b,0)| = {bias:.4g}), which HF "
            "flex_olmo cannot represent; pass --drop-router-bias to export without it (routing changes)")
    out_dtype = dtype or stored_dtype
    ordered = _hf_order(config)
    shapes = hf_shapes(config)
    plan = [(name, out_dtype, shapes[name]) for entry in ordered for name in entry.hf]
    by_name = {e.megatron: e for e in ordered}
    written: set[str] = set()
    with atomic_directory(out_dir) as tmp:
        writer = ShardedSafetensorsWriter(tmp, plan, max_shard_bytes=max_shard_bytes)
        meter = ProgressMeter(writer.total_bytes, progress, "mcore -> hf")
        try:
            with writer:  # the writer thread writes one tensor while this one reads the next
                for name, canonical in iter_canonical(mcore_dir, [e.megatron for e in ordered]):
                    if not all_finite(canonical):
                        raise McoreCheckpointError(f"{mcore_dir}: {name} contains NaN/Inf")
                    entry = by_name[name]
                    for hf_name, tensor in zip(entry.hf, to_hf(entry, canonical, config)):
                        writer.write(hf_name, tensor.to(out_dtype).contiguous())
                        meter(hf_name, tensor.numel() * out_dtype.itemsize)
                    written.add(name)
                writer.close()
        finally:
            meter.close()
        if written != set(by_name):
            raise McoreCheckpointError(f"export audit failed: missing {sorted(set(by_name) - written)[:5]}")
        hf_config = config.to_hf_dict()
        hf_config["dtype"] = str(out_dtype).removeprefix("torch.")
        import json

        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        tokenizer = mcore_dir / "tokenizer"
        if tokenizer.is_dir():
            for item in tokenizer.iterdir():
                shutil.copy2(item, tmp / item.name)
    return ConversionReport(meter.tensors, meter.bytes, time.perf_counter() - start, Path(out_dir))


def router_bias_logit_change(mcore_dir: str | os.PathLike, *, tokens: int = 64, seed: int = 0) -> float:
    """Max |Δlogit| on random tokens between the model with its router bias and without it.

    Loads the whole model once (a report step, not part of the streaming export).
    """
    import flexolmo_plugin as fp

    model = fp.from_mcore(mcore_dir, dispatcher="allgather")
    config = model.flexolmo_config
    ids = torch.randint(0, config.vocab_size, (2, min(tokens, config.max_position_embeddings)),
                        generator=torch.Generator().manual_seed(seed))
    with_bias = fp.logits(model, ids)
    with torch.no_grad():
        for layer in model.decoder.layers:
            for bias in layer.mlp.router.domain_biases or []:
                bias.zero_()
    return (fp.logits(model, ids) - with_bias).abs().max().item()
