"""Merge: a coordinator stacks data owners' expert packages onto the public model.

Expert 0 and every shared weight come from the public model; expert i and router row r_i from
package i; the router becomes ``[r_pub; r_1; ...; r_n]`` in every layer (paper §3.3.2).  Nothing is
trained or averaged.  Before anything is written, each package is verified (file hashes, model
shape, dtype) and its anchor compared tensor by tensor with the public model's: an expert trained
against another public model stops the merge, naming the first tensor that differs.  Packages must
differ by content, not only by name (a copied package with a new name is the same expert twice), and
every weight written must be finite: the public model's while its anchor is hashed, before anything
is written, each package's as it streams into the output.

Given the coordinator's registry of owners' keys (``trusted_keys``, :mod:`.signing`), every package must
carry a valid signature by the key registered for its name; without one, a warning says that
authenticity was not checked.  The output carries a provenance record (:mod:`.provenance`).
"""

from __future__ import annotations

import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from flexolmo_plugin.conversion.atomic import atomic_directory, check_new_output
from flexolmo_plugin.conversion.convert import carry_checkpoint_files
from flexolmo_plugin.conversion.mapping import Role, entries_by_name
from flexolmo_plugin.conversion.mcore_io import (
    CanonicalReader,
    load_config,
    save_config,
    write_checkpoint,
)
from flexolmo_plugin.conversion.progress import ConversionReport, ProgressMeter
from flexolmo_plugin.errors import ConfigError, FlexOlmoWarning
from flexolmo_plugin.lifecycle.anchor import (
    anchor_hashes,
    combined_digest,
    describe_difference,
)
from flexolmo_plugin.lifecycle.package import ExpertPackage, PackageError, load_package
from flexolmo_plugin.lifecycle.provenance import ExpertDigests, merge_record, write_record
from flexolmo_plugin.lifecycle.signing import check_trusted, load_trusted_keys

DEFAULT_MAX_ACTIVE = 4  # paper §4.4 / Fig. 3: quality rises up to 4 active experts, then plateaus


def default_top_k(num_experts: int) -> int:
    return min(num_experts, DEFAULT_MAX_ACTIVE)


def resolve_top_k(top_k: int | None, num_experts: int) -> int:
    """``None`` means the default; anything else must be a possible top-k.  (``top_k or default``
    would silently turn an explicit 0 into the default.)"""
    if top_k is None:
        return default_top_k(num_experts)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ConfigError(f"top-k must be in [1, {num_experts}] (the number of experts after the merge), got {top_k!r}")
    return top_k


def check_distinct(packages: list[ExpertPackage]) -> None:
    """Unique names, and unique contents: the same weights under two names would be one expert
    counted twice (two router rows competing for the same FFN)."""
    names = [p.name for p in packages]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PackageError(f"two packages are named {duplicates}; expert names must be unique")
    seen: dict[str, ExpertPackage] = {}
    for package in packages:
        first = seen.setdefault(package.content_digest, package)
        if first is not package:
            raise PackageError(f"packages {first.name!r} ({first.directory}) and {package.name!r} "
                               f"({package.directory}) hold identical weights (content digest "
                               f"{package.content_digest[:12]}…): the same expert twice; merge it once")


def merge_experts(public_dir: str | os.PathLike, package_dirs: list[str | os.PathLike], out_dir: str | os.PathLike,
                  *, top_k: int | None = None, progress: bool = False,
                  trusted_keys: str | os.PathLike | dict[str, str] | None = None) -> ConversionReport:
    """Write the (N+1)-expert FlexOlmo checkpoint: public expert 0 plus one expert per package.
    ``trusted_keys``: the registry file (or its loaded form, name -> fingerprint) every package's
    signature is checked against."""
    start = time.perf_counter()
    check_new_output(out_dir, inputs=(public_dir, *package_dirs))
    if not package_dirs:
        raise PackageError("merge needs at least one expert package")
    registry = trusted_keys if isinstance(trusted_keys, dict) or trusted_keys is None else \
        load_trusted_keys(trusted_keys)
    num_experts = 1 + len(package_dirs)
    top_k = resolve_top_k(top_k, num_experts)
    public_config, dtype, _ = load_config(public_dir)
    public = CanonicalReader(public_dir)
    packages = []
    try:
        # Packages' file hashes are checked on helper threads while the public anchor is hashed here.
        with ThreadPoolExecutor(min(len(package_dirs), 4), thread_name_prefix="verify-package") as pool:
            loading = [pool.submit(load_package, directory) for directory in package_dirs]
            try:
                public_anchor = anchor_hashes(public_config, public.read, source=f"public model {public_dir}")
            finally:
                for job in loading:  # every package that did load is closed below, even on errors
                    if job.exception() is None:
                        packages.append(job.result())
            for job in loading:
                if job.exception() is not None:
                    raise job.exception()
        check_distinct(packages)
        if registry is not None:
            for package in packages:
                check_trusted(package.name, package.signature, registry,
                              f"package {package.name!r} ({package.directory})")
        else:
            warnings.warn("the expert packages' authenticity was not checked (no trusted keys given: "
                          "--trusted-keys KEYS.json); their signatures, if any, only prove they are intact",
                          FlexOlmoWarning, stacklevel=2)
        for package in packages:
            package.check_fits(public_config, dtype)
        for package in packages:
            differing = describe_difference(public_anchor, package.anchor_tensors)
            if differing is not None:
                raise PackageError(f"package {package.name!r} was trained against a different anchor: first differing "
                                   f"tensor {differing}")
        names = [p.name for p in packages]
        with_bias = any(p.has_bias for p in packages)
        config = public_config.replace(num_experts=num_experts, top_k=top_k, router_bias=with_bias,
                                       expert_names=("public", *names))

        by_name = entries_by_name(config)

        def source(name: str) -> torch.Tensor:
            entry = by_name[name]
            role = entry.rule.role
            if role is Role.EXPERT:
                if entry.expert == 0:
                    return public.read(name)
                return packages[entry.expert - 1].get(entry.package())
            if role is Role.ROUTER_ROW:
                r_pub = public.read(name)[0].to(dtype)
                return torch.stack([r_pub] + [p.get(entry.package()).to(dtype) for p in packages])
            if role is Role.ROUTER_BIAS:
                return torch.stack([p.get(entry.package()) if p.has_bias else torch.zeros(1)
                                    for p in packages]).float()
            return public.read(name)

        meter = ProgressMeter(0, progress, "merge")
        digests = ExpertDigests(config, dtype)
        try:
            with atomic_directory(out_dir) as tmp:
                write_checkpoint(tmp, config, digests.wrap(source), dtype=dtype, expected=set(by_name),
                                 on_tensor=meter)
                write_record(tmp, merge_record(packages, digests, combined_digest(public_anchor)))
                carry_checkpoint_files(public_dir, tmp, provenance=False)  # the public model's tokenizer
                save_config(tmp, config, dtype=dtype, extra={
                    "source": {"format": "merge", "public": str(Path(public_dir).resolve())},
                    "anchor_sha256": combined_digest(public_anchor),
                    "experts": [{"name": p.name, "description": p.manifest.get("description", ""),
                                 "tokens_trained": p.manifest.get("tokens_trained"),
                                 "files": p.manifest["files"]} for p in packages]})
        finally:
            meter.close()
    finally:
        for package in packages:
            package.close()
    return ConversionReport(meter.tensors, meter.bytes, time.perf_counter() - start, Path(out_dir))
