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

import json
import os
import shutil
import time
from pathlib import Path

import torch

from flexolmo_plugin.conversion.atomic import atomic_directory, check_new_output
from flexolmo_plugin.conversion.checkpoint_dir import TOKENIZER_FILES, TOKENIZER_FOLDERS, tokenizer_dir
from flexolmo_plugin.conversion.checks import all_finite
from flexolmo_plugin.conversion.dcp_io import reuse_freed_memory
from flexolmo_plugin.conversion.hf_layout import HFWeights
from flexolmo_plugin.conversion.mapping import (
    Role,
    entries,
    hf_shapes,
    megatron_shape,
    to_hf,
    with_role,
)
from flexolmo_plugin.conversion.mcore_io import (
    CanonicalReader,
    McoreCheckpointError,
    check_canonical_shapes,
    check_is_checkpoint,
    iter_canonical,
    load_config,
    save_config,
    write_checkpoint,
)
from flexolmo_plugin.conversion.olmo2 import Olmo2AsFlexOlmo, is_olmo2_config
from flexolmo_plugin.conversion.progress import ConversionReport, ProgressMeter
from flexolmo_plugin.conversion.safetensors_reader import (
    CheckpointFormatError,
    SafetensorsCheckpoint,
)
from flexolmo_plugin.conversion.safetensors_writer import ShardedSafetensorsWriter
from flexolmo_plugin.errors import ConfigError
from flexolmo_plugin.model.config import FlexOlmoConfig

PROVENANCE_FILE = "provenance.json"  # side file of merged models, carried into HF exports


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


def _check_count(name: str, value: int | None) -> None:
    """``None`` means "the default"; anything else must be a real count.  (``top_k or default``
    used to turn an explicit 0 into the default without a word.)"""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1 (or None for the default), got {value!r}")


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files of ``src`` (an HF directory or a checkpoint's ``tokenizer/``) into ``dst``
    (created if needed); returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES + TOKENIZER_FOLDERS:
        item = Path(src) / name
        if item.is_file() or (name in TOKENIZER_FOLDERS and item.is_dir()):
            Path(dst).mkdir(exist_ok=True)
            if item.is_dir():
                shutil.copytree(item, Path(dst) / name)
            else:
                shutil.copy2(item, Path(dst) / name)
            copied.append(name)
    return copied


def carry_checkpoint_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, *,
                           provenance: bool = True) -> list[str]:
    """Copy into a new checkpoint ``dst_dir`` (still its temporary directory, so that the files land
    atomically and under its checksums) what a checkpoint made from ``src_dir`` keeps: the tokenizer
    (beside the tensors or in a save directory's latest ``iter_*``) and, unless ``provenance`` is False,
    the merge's provenance record (router steps change router rows, which ``flexolmo verify`` reports,
    not the experts it vouches for).  Returns what was copied, as paths relative to ``dst_dir``."""
    carried = []
    tokenizer = tokenizer_dir(src_dir)
    if tokenizer is not None:
        carried += [f"tokenizer/{name}" for name in copy_tokenizer_files(tokenizer, Path(dst_dir) / "tokenizer")]
    if provenance and (Path(src_dir) / PROVENANCE_FILE).is_file():
        shutil.copy2(Path(src_dir) / PROVENANCE_FILE, Path(dst_dir) / PROVENANCE_FILE)
        carried.append(PROVENANCE_FILE)
    return carried


def hf_to_mcore(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
                num_experts: int | None = None, top_k: int | None = None, progress: bool = False) -> ConversionReport:
    """Convert an HF FlexOlmo (or OLMo-2 dense, with ``num_experts`` copies) checkpoint to Megatron."""
    start = time.perf_counter()
    hf_dir = Path(hf_dir)
    _check_count("top_k", top_k)
    _check_count("num_experts", num_experts)
    check_new_output(out_dir, inputs=(hf_dir,))
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
            config = FlexOlmoConfig.from_hf(raw_config, **({"top_k": top_k} if top_k is not None else {}))
            weights = HFWeights(checkpoint, config)
        dtype = dtype or _single_dtype(checkpoint)
        by_name = {e.megatron: e for e in entries(config)}
        itemsize = torch.empty((), dtype=dtype).element_size()
        total = sum(itemsize * _numel(megatron_shape(e, config)) for e in by_name.values())
        meter = ProgressMeter(total, progress, "hf -> mcore")

        def source(name: str) -> torch.Tensor:
            return weights.canonical(by_name[name])

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


def router_bias_magnitude(mcore_dir: str | os.PathLike) -> float:
    """Largest |min(b, 0)| over all layers' router biases (0 when the model has none)."""
    config, _, _ = load_config(mcore_dir)
    if not config.router_bias:
        return 0.0

    reader = CanonicalReader(mcore_dir)
    return max(reader.read(entry.megatron).float().clamp(max=0).abs().max().item()
               for entry in with_role(config, Role.ROUTER_BIAS))


def mcore_to_hf(mcore_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
                max_shard_bytes: int = 5 * 2**30, drop_router_bias: bool = False,
                progress: bool = False) -> ConversionReport:
    """Convert a FlexOlmo torch_dist checkpoint (any save layout) to an HF directory.

    HF ``flex_olmo`` has no router bias.  A model whose biases are all zero (no effect) exports as
    is; a non-zero bias is refused unless ``drop_router_bias`` -- the export then computes a
    different function (``flexolmo_plugin.lifecycle.evaluation.router_bias_logit_change`` measures how much).
    """
    start = time.perf_counter()
    mcore_dir = Path(mcore_dir)
    _check_count("max_shard_bytes", max_shard_bytes)
    check_new_output(out_dir, inputs=(mcore_dir,))
    reuse_freed_memory()
    config, stored_dtype, _ = load_config(mcore_dir)
    check_is_checkpoint(mcore_dir)
    check_canonical_shapes(mcore_dir, {e.megatron: megatron_shape(e, config) for e in entries(config)}, config)
    bias = router_bias_magnitude(mcore_dir)
    if bias > 0 and not drop_router_bias:
        raise McoreCheckpointError(
            f"{mcore_dir}: the model has a learned router bias (largest |min(b,0)| = {bias:.4g}), which HF "
            "flex_olmo cannot represent; pass --drop-router-bias to export without it (routing changes)")
    out_dtype = dtype or stored_dtype
    ordered = sorted(entries(config), key=lambda entry: entry.hf_order())
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

        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        tokenizer = tokenizer_dir(mcore_dir)  # beside the tensors, or in a save directory's latest iter_*
        if tokenizer is not None:
            copy_tokenizer_files(tokenizer, tmp)
        if (mcore_dir / PROVENANCE_FILE).is_file():  # the merge's provenance record (lifecycle/provenance.py)
            shutil.copy2(mcore_dir / PROVENANCE_FILE, tmp / PROVENANCE_FILE)
    return ConversionReport(meter.tensors, meter.bytes, time.perf_counter() - start, Path(out_dir))
