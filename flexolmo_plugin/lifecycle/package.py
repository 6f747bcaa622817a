"""Expert packages: what a data owner shares -- never data, never a whole model.

A package holds, per layer, the owner's FFN (gated fc1 and fc2), its router row r_i and, if trained,
its router bias b_i, in safetensors; plus ``manifest.json``: name, description, the model's shape,
the anchor it was trained against (a SHA-256 per anchor tensor and one over all of them), tokens
trained, and a SHA-256 per file.  Merge refuses packages whose anchor, shape, dtype or file hashes do
not match, so an expert trained against a different public model can never be merged silently.

Every tensor is checked to be finite on its way into the package (a diverged run must not be
shared), and again when a merge reads it.  The manifest does not sign itself: its file hashes catch
corrupt or altered weights, not an edited ``name``, which is why merge also compares packages by
content (see :attr:`ExpertPackage.content_digest`).  Who produced a package is what its optional
``signature.json`` says (``--sign KEY``, :mod:`.signing`): an Ed25519 signature of the manifest's exact
bytes, checked whenever a package is loaded and held against the coordinator's registered keys by
``merge --trusted-keys``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from flexolmo_plugin.conversion.atomic import atomic_directory, check_new_output
from flexolmo_plugin.conversion.checks import file_sha256
from flexolmo_plugin.conversion.mapping import RULES, Entry, Role, entries
from flexolmo_plugin.conversion.mcore_io import CanonicalReader, load_config
from flexolmo_plugin.conversion.safetensors_reader import (
    CheckpointFormatError,
    SafetensorsCheckpoint,
)
from flexolmo_plugin.conversion.safetensors_writer import ShardedSafetensorsWriter
from flexolmo_plugin.errors import FlexOlmoError
from flexolmo_plugin.lifecycle.anchor import anchor_hashes, check_finite, combined_digest
from flexolmo_plugin.lifecycle.signing import SIGNATURE, load_private_key, read_signature, sign_manifest
from flexolmo_plugin.model.config import FlexOlmoConfig

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps", "make_vocab_size_divisible_by")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # matched in full (no trailing newline); as the CLI's
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class PackageError(FlexOlmoError):
    """An expert package that is malformed, tampered with, or does not fit the model."""


def owner_entries(config: FlexOlmoConfig, expert: int = 1) -> list[Entry]:
    """The table's entries that hold an owner's part of the model (its FFN, router row and bias),
    layer by layer: exactly what a package carries."""
    chosen = [e for e in entries(config) if e.rule.package and e.expert in (None, expert)]
    return sorted(chosen, key=lambda e: (e.layer, RULES.index(e.rule)))


def _package_shape(entry: Entry, config: FlexOlmoConfig) -> tuple[int, ...]:
    shape = entry.shape(config)
    return shape[1:] if entry.rule.rows else shape  # one row of the router matrix / bias vector


def _plan(config: FlexOlmoConfig, dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    return [(e.package(), torch.float32 if e.rule.role is Role.ROUTER_BIAS else dtype, _package_shape(e, config))
            for e in owner_entries(config)]


def _shape_config(manifest: dict) -> FlexOlmoConfig:
    """A config of the package's model shape (two experts: public and the owner's)."""
    return FlexOlmoConfig(**{**{f: manifest["model"][f] for f in SHAPE_FIELDS}, "num_experts": 2, "top_k": 1,
                             "router_bias": bool(manifest["router_bias"])})


def _ffn_names(manifest: dict) -> set[str]:
    """The package's names of the owner's FFN tensors (not its router row or bias)."""
    return {e.package() for e in owner_entries(_shape_config(manifest)) if e.rule.role is Role.EXPERT}


def tensors_digest(tensors: SafetensorsCheckpoint, names: list[str]) -> str:
    """SHA-256 over ``names`` (sorted) of ``tensors``: per tensor its name, dtype, shape and raw bytes,
    length-prefixed so that no two different sequences of tensors hash alike.  One tensor in memory at
    a time."""
    hasher = hashlib.sha256()
    for name in sorted(names):
        tensor = tensors.get(name, check_finite=False).detach().contiguous().reshape(-1)
        header = json.dumps([name, str(tensor.dtype).removeprefix("torch."), list(tensors.shape(name)),
                             tensor.numel() * tensor.element_size()]).encode()
        hasher.update(len(header).to_bytes(8, "little") + header)
        if tensor.numel():
            hasher.update(memoryview(tensor.view(torch.uint8).numpy()))
    return hasher.hexdigest()


def _owner_tensor(reader: CanonicalReader, entry: Entry, expert: int) -> torch.Tensor:
    """The owner's tensor of ``entry``: its FFN weight, its router row, or its (fp32) bias."""
    if entry.rule.role is Role.ROUTER_ROW:
        return reader.read(entry.megatron)[expert].contiguous()
    if entry.rule.role is Role.ROUTER_BIAS:
        return reader.read(entry.megatron)[expert - 1].float().contiguous()
    return reader.read(entry.megatron)


def check_name(name: str) -> str:
    """An expert name: it appears in configurations, tables and file names of the tools, so it must be
    a short plain identifier -- 1-64 characters, no path separator, no '..', not starting with '.',
    no whitespace or newline (the same rule as the command line's ``--name``)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise PackageError(f"expert name {name!r} must be 1-64 letters, digits, '_', '.', '-' (starting alphanumeric, "
                           "no '..')")
    if name == "public":
        raise PackageError("'public' is reserved for expert 0")
    return name


def package_expert(owner_dir: str | os.PathLike, package_dir: str | os.PathLike, *, name: str,
                   description: str = "", tokens_trained: int | None = None, expert: int = 1,
                   sign_key: str | os.PathLike | None = None) -> Path:
    """Extract expert ``expert`` of an owner's checkpoint into a verified package directory, signed
    with the Ed25519 private key file ``sign_key`` if given."""
    check_name(name)
    key = None if sign_key is None else load_private_key(sign_key)  # a bad key stops before any work
    if tokens_trained is not None and (isinstance(tokens_trained, bool) or not isinstance(tokens_trained, int)
                                       or tokens_trained < 0):
        raise PackageError(f"tokens_trained must be a whole number >= 0, got {tokens_trained!r}")
    check_new_output(package_dir)
    config, dtype, _ = load_config(owner_dir)
    if not 1 <= expert < config.num_experts:
        raise PackageError(f"expert must be a non-public expert in [1, {config.num_experts - 1}], got {expert}")
    reader = CanonicalReader(owner_dir)
    anchor = anchor_hashes(config, reader.read)
    source = f"owner checkpoint {owner_dir}"
    with atomic_directory(package_dir, checksums=False) as tmp:
        with ShardedSafetensorsWriter(tmp, _plan(config, dtype)) as writer:  # stops its thread on a refusal
            for entry in owner_entries(config, expert):
                tensor = _owner_tensor(reader, entry, expert)
                writer.write(entry.package(), check_finite(tensor, entry.megatron, source))
            writer.close()
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "description": description,
            "source_expert": expert,
            "model": {f: getattr(config, f) for f in SHAPE_FIELDS},
            "dtype": str(dtype).removeprefix("torch."),
            "router_bias": config.router_bias,
            "anchor": {"sha256": combined_digest(anchor), "tensors": anchor},
            "tokens_trained": tokens_trained,
            "files": {p.name: file_sha256(p) for p in sorted(tmp.iterdir())},
        }
        manifest_bytes = (json.dumps(manifest, indent=2) + "\n").encode()
        (tmp / MANIFEST).write_bytes(manifest_bytes)
        if key is not None:
            (tmp / SIGNATURE).write_text(json.dumps(sign_manifest(key, manifest_bytes), indent=2) + "\n")
    return Path(package_dir)


@dataclass
class ExpertPackage:
    """A verified package (file hashes checked); tensors are read lazily."""

    directory: Path
    manifest: dict
    tensors: SafetensorsCheckpoint
    manifest_bytes: bytes = b""  # exactly what a signature covers
    signature: dict | None = None  # the verified signature.json record; None: unsigned

    @property
    def manifest_sha256(self) -> str:
        return hashlib.sha256(self.manifest_bytes).hexdigest()

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def has_bias(self) -> bool:
        return bool(self.manifest["router_bias"])

    @property
    def anchor_tensors(self) -> dict[str, str]:
        return self.manifest["anchor"]["tensors"]

    @functools.cached_property
    def content_digest(self) -> str:
        """One SHA-256 over the expert's FFN tensors -- each tensor's name, dtype, shape and bytes, in name
        order -- read from the (verified) weight files.  It depends on the weights alone, not on how they
        were serialized (tensor order, header layout, file names, sharding), so the same expert packaged
        twice, or a copy re-saved under another name, has the same digest; merge refuses such duplicates.
        The router row and bias are left out: two router rows competing for the same FFN are the same
        expert counted twice (the FFN is also what ``verify`` identifies an expert by)."""
        return tensors_digest(self.tensors, sorted(_ffn_names(self.manifest)))

    def get(self, tensor: str) -> torch.Tensor:
        """One tensor, refused if not finite (naming this package: a package written before the check
        existed, or by another tool, reaches merge only through here)."""
        value = self.tensors.get(tensor, check_finite=False)
        return check_finite(value, tensor, f"package {self.name!r} ({self.directory})")

    def check_fits(self, config: FlexOlmoConfig, dtype: torch.dtype | None = None) -> None:
        """Same model shape and (given ``dtype``) the same parameter dtype.  A dtype mismatch is named
        as such: the anchor digests include the dtype, so it would otherwise surface as a "different
        anchor" that no tensor-by-tensor comparison can explain."""
        model = self.manifest["model"]
        wrong = [f"{f} {model.get(f)!r} (model: {getattr(config, f)!r})" for f in SHAPE_FIELDS
                 if model.get(f) != getattr(config, f)]
        if wrong:
            raise PackageError(f"package {self.name!r} was built for a different model shape: " + ", ".join(wrong))
        if dtype is not None and self.manifest["dtype"] != str(dtype).removeprefix("torch."):
            raise PackageError(f"package {self.name!r} ({self.directory}): dtype mismatch: package dtype "
                               f"{self.manifest['dtype']}, public model dtype {str(dtype).removeprefix('torch.')} "
                               "(package the expert from an owner checkpoint saved in the public model's dtype)")

    def close(self) -> None:
        self.tensors.close()


def load_package(directory: str | os.PathLike) -> ExpertPackage:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.exists():
        raise PackageError(f"{directory}: no {MANIFEST}: not an expert package")
    try:
        manifest_bytes = path.read_bytes()
        manifest = json.loads(manifest_bytes)
        version, files = manifest["format_version"], manifest["files"]
        manifest["name"], manifest["model"], manifest["anchor"]["tensors"], manifest["dtype"]  # noqa: B018
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise PackageError(f"{path}: malformed manifest ({error})") from error
    if version != FORMAT_VERSION:
        raise PackageError(f"{path}: unsupported package format_version {version!r}")
    check_name(manifest["name"])
    if not isinstance(manifest["dtype"], str) or manifest["dtype"] not in _DTYPES:
        raise PackageError(f"{path}: unsupported dtype {manifest['dtype']!r} (expected one of {sorted(_DTYPES)})")
    signature = read_signature(directory, manifest_bytes, f"package {manifest['name']!r} ({directory})")
    present = {p.name for p in directory.iterdir() if p.name not in (MANIFEST, SIGNATURE)}
    if present != set(files):
        raise PackageError(f"{directory}: files {sorted(present)} differ from the manifest's {sorted(files)}")
    for file_name, digest in files.items():
        if file_sha256(directory / file_name) != digest:
            raise PackageError(f"{directory / file_name}: SHA-256 does not match the manifest (tampered or corrupt)")
    try:
        shape_config = _shape_config(manifest)
    except (KeyError, TypeError, AttributeError) as error:
        raise PackageError(f"{path}: malformed manifest: its \"model\" lacks or misstates a field "
                           f"({type(error).__name__}: {error})") from None
    try:
        tensors = SafetensorsCheckpoint.open(directory)
    except CheckpointFormatError as error:
        raise PackageError(str(error)) from error
    plan = {name: (dtype, tuple(shape)) for name, dtype, shape in _plan(shape_config, _DTYPES[manifest["dtype"]])}
    if set(tensors.keys()) != set(plan) or any(tuple(tensors.shape(k)) != s for k, (_, s) in plan.items()):
        tensors.close()
        raise PackageError(f"{directory}: tensors do not match the manifest's model shape")
    wrong = [k for k, (dtype, _) in plan.items() if tensors.dtype(k) != dtype]
    if wrong:  # the manifest's dtype is what merge compares: it must be the tensors' own
        tensors.close()
        raise PackageError(f"{directory}: tensor {wrong[0]} is {str(tensors.dtype(wrong[0])).removeprefix('torch.')}, "
                           f"the manifest says {manifest['dtype']}")
    return ExpertPackage(directory, manifest, tensors, manifest_bytes, signature)
