"""Opt-out: exclude a data owner's expert without retraining (paper §3.3.2, §5.2).

Physically (:func:`opt_out`): a new checkpoint without the expert's FFNs, router rows and bias --
its parameters are provably absent.  At run time (:func:`exclude_experts`): the router masks the
experts by name; the softmax then runs over the remaining experts, which computes exactly what the
physically opted-out model computes (top-k permitting).

Every tensor the new checkpoint receives must be finite (checked as it streams, on the read the copy
needs anyway); the dropped experts' weights are not checked, since removing an expert whose training
diverged is a legitimate use of opt-out.  The provenance record (:mod:`.provenance`), if the checkpoint
has one, moves the dropped experts to its ``removed`` list with the time of removal.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from flexolmo_plugin.conversion.atomic import atomic_directory, check_new_output
from flexolmo_plugin.conversion.convert import carry_checkpoint_files
from flexolmo_plugin.conversion.mapping import Role, entries_by_name, expert_entry
from flexolmo_plugin.conversion.mcore_io import (
    CanonicalReader,
    load_config,
    save_config,
    write_checkpoint,
)
from flexolmo_plugin.conversion.progress import ConversionReport, ProgressMeter
from flexolmo_plugin.lifecycle.anchor import check_finite
from flexolmo_plugin.lifecycle.package import PackageError
from flexolmo_plugin.lifecycle.provenance import opt_out_record, read_record, write_record
from flexolmo_plugin.model.build import unwrap


def _indices(expert_names: tuple[str, ...] | None, drop: list[str]) -> list[int]:
    if not expert_names:
        raise PackageError("the checkpoint records no expert names; experts can only be opted out by name")
    repeated = sorted({name for name in drop if list(drop).count(name) > 1})
    if repeated:
        raise PackageError(f"expert {repeated[0]!r} is named twice in the opt-out list {list(drop)}")
    unknown = sorted(set(drop) - set(expert_names))
    if unknown:
        raise PackageError(f"no experts named {unknown}; the model has {list(expert_names)}")
    if expert_names[0] in drop:
        raise PackageError("the public expert (expert 0) anchors the model and cannot be opted out")
    return [expert_names.index(name) for name in drop]


def opt_out(mcore_dir: str | os.PathLike, out_dir: str | os.PathLike, *, drop: list[str],
            progress: bool = False) -> ConversionReport:
    """Write a copy of the checkpoint without the experts named in ``drop``."""
    start = time.perf_counter()
    check_new_output(out_dir, inputs=(mcore_dir,))
    config, dtype, payload = load_config(mcore_dir)
    dropped = _indices(config.expert_names, drop)
    keep = [i for i in range(config.num_experts) if i not in dropped]
    top_k = config.top_k
    if top_k > len(keep):
        warnings.warn(f"top-k {top_k} exceeds the {len(keep)} remaining experts; reduced to {len(keep)}",
                      stacklevel=2)
        top_k = len(keep)
    # Without an owner expert left there is no owner bias either (the public expert has none).
    new = config.replace(num_experts=len(keep), top_k=top_k, router_bias=config.router_bias and len(keep) > 1,
                         expert_names=tuple(config.expert_names[i] for i in keep))
    record = read_record(mcore_dir, required=False)
    reader = CanonicalReader(mcore_dir)
    keep_bias = [i - 1 for i in keep[1:]]

    by_name = entries_by_name(new)
    label = f"checkpoint {mcore_dir}"

    def source(name: str) -> torch.Tensor:
        entry = by_name[name]
        role = entry.rule.role
        if role is Role.EXPERT:  # named as in the source checkpoint, where the user can find it
            old = expert_entry(entry, keep[entry.expert])
            return check_finite(reader.read(old), old, label)
        if role is Role.ROUTER_ROW:
            tensor = reader.read(name)[keep]
        elif role is Role.ROUTER_BIAS:
            tensor = reader.read(name)[keep_bias]
        else:
            tensor = reader.read(name)
        return check_finite(tensor, name, label)

    meter = ProgressMeter(0, progress, "opt-out")
    try:
        with atomic_directory(out_dir) as tmp:
            write_checkpoint(tmp, new, source, dtype=dtype, expected=set(by_name), on_tensor=meter)
            history = list(payload.get("opted_out", [])) + list(drop)
            if record is not None:
                write_record(tmp, opt_out_record(record, list(drop)))
            carry_checkpoint_files(mcore_dir, tmp, provenance=False)  # the tokenizer; the record is new
            save_config(
                tmp,
                new,
                dtype=dtype,
                extra={"source": {"format": "opt-out", "from": str(Path(mcore_dir).resolve())}, "opted_out": history},
            )
    finally:
        meter.close()
    return ConversionReport(meter.tensors, meter.bytes, time.perf_counter() - start, Path(out_dir))


def exclude_experts(model: nn.Module, names: list[str] | None) -> list[int]:
    """Mask experts by name in every layer's router (``None``/``[]`` clears); returns their indices."""
    inner = unwrap(model)
    indices = _indices(inner.flexolmo_config.expert_names, list(names)) if names else []
    for layer in inner.decoder.layers:
        layer.mlp.router.set_excluded_experts(indices)
    return indices
