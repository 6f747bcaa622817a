"""Read-only, validating access to a Hugging Face safetensors checkpoint directory.

Conversion jobs run unattended over multi-GB downloads, so a damaged or
hostile checkpoint must fail early with a message naming the file and tensor
rather than surfacing later as a cryptic Rust panic, a silent shape bug, or
NaNs in a trained model.  Every header is parsed and cross-checked against the
file size by this module before the safetensors library is allowed to map the
file, and pickle checkpoints are never loaded because unpickling executes code.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import pathlib
import struct
from collections import Counter
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch

from flexolmo_plugin.conversion.checks import all_finite
from flexolmo_plugin.conversion.checksums import CHECKSUMS_FILE, verify_checksums
from flexolmo_plugin.errors import FlexOlmoError

__all__ = ["CheckpointFormatError", "PICKLE_SUFFIXES", "SafetensorsCheckpoint"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Real headers are a few MB even for huge models; the cap stops a corrupt
# length field from making us allocate gigabytes just to read the JSON.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Non-finite scanning works in chunks so a huge tensor needs only a bounded
# amount of extra memory on top of the tensor itself.

_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in (
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"),
        ("U8", "uint8"), ("BOOL", "bool"), ("F8_E4M3", "float8_e4m3fn"),
        ("F8_E5M2", "float8_e5m2"),
    ) if hasattr(torch, attr)
}


class CheckpointFormatError(FlexOlmoError):
    """Raised for any checkpoint that cannot be trusted as given."""


@dataclass(frozen=True)
class _Entry:
    file: pathlib.Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: int  # absolute position of the first byte in the file


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `true` is never a valid size in a header.
    return isinstance(value, int) and not isinstance(value, bool)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Plain json.loads keeps the last duplicate silently, hiding a second tensor.
    result = dict(pairs)
    if len(result) != len(pairs):
        dupes = sorted(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise ValueError(f"duplicate keys {dupes}")
    return result


def _read_header(path: pathlib.Path, label: str) -> tuple[dict[str, _Entry], dict[str, str]]:
    """Parse and check one file's header from raw bytes, before any library trusts it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointFormatError(
                    f"{label}: file is {size} bytes, too short to hold a safetensors header")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise CheckpointFormatError(
                    f"{label}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit "
                    "(not a safetensors file or corrupt)")
            if 8 + n > size:
                raise CheckpointFormatError(
                    f"{label}: header length {n} is larger than the file ({size} bytes); "
                    "truncated or corrupt file")
            raw = fh.read(n)
    except OSError as exc:
        raise CheckpointFormatError(f"{label}: cannot read file: {exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointFormatError(f"{label}: header is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{label}: header must be a JSON object")

    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointFormatError(f"{label}: __metadata__ must map strings to strings")

    data_size = size - 8 - n
    entries: dict[str, _Entry] = {}
    spans: list[tuple[int, int, str]] = []
    for key, info in header.items():
        where = f"{label}: tensor {key!r}"
        if not isinstance(info, dict):
            raise CheckpointFormatError(f"{where}: header entry must be an object")
        dtype = _DTYPES.get(info.get("dtype"))  # type: ignore[arg-type]
        if dtype is None:
            raise CheckpointFormatError(
                f"{where}: unsupported dtype {info.get('dtype')!r} "
                f"(known: {', '.join(sorted(_DTYPES))})")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointFormatError(
                f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        offsets = info.get("data_offsets")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise CheckpointFormatError(
                f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                f"got {offsets!r}")
        begin, end = offsets
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected:
            raise CheckpointFormatError(
                f"{where}: dtype {info['dtype']} with shape {shape} needs {expected} bytes "
                f"but data_offsets [{begin}, {end}) span {end - begin}")
        if end > data_size:
            raise CheckpointFormatError(
                f"{where} claims bytes [{begin}, {end}) but the file's data section has only "
                f"{data_size} bytes (truncated or corrupt file)")
        entries[key] = _Entry(path, dtype, tuple(shape), expected, 8 + n + begin)
        spans.append((begin, end, key))
    # safetensors itself insists the tensors tile the data section exactly;
    # checking here makes such files fail at open() instead of at first get().
    covered = 0
    for begin, end, key in sorted(spans):
        if begin != covered:
            what = "overlaps the previous tensor" if begin < covered else f"gap at {covered}"
            raise CheckpointFormatError(f"{label}: tensor {key!r} at [{begin}, {end}) {what}")
        covered = end
    if covered != data_size:
        raise CheckpointFormatError(
            f"{label}: tensors cover {covered} bytes but the data section has {data_size} "
            "(trailing garbage or corrupt header)")
    return entries, dict(meta)


def _index_target(directory: pathlib.Path, name: Any, key: str) -> pathlib.Path:
    """Reject index entries that would read outside the checkpoint by name.

    Only the name is judged: a symlinked shard (the HF cache layout) may point
    to a blob elsewhere, but the index itself must not steer us out.
    """
    where = f"{INDEX_NAME}: weight_map[{key!r}]"
    if not isinstance(name, str) or not name:
        raise CheckpointFormatError(f"{where} must be a non-empty file name, got {name!r}")
    rel = pathlib.PurePosixPath(name.replace("\\", "/"))
    if rel.is_absolute() or pathlib.PureWindowsPath(name).drive or ".." in rel.parts:
        raise CheckpointFormatError(
            f"{where} = {name!r} points outside the checkpoint directory {directory}")
    target = directory.joinpath(*rel.parts)
    if not target.is_file():
        raise CheckpointFormatError(f"{where} refers to missing file {name!r} in {directory}")
    return target


class SafetensorsCheckpoint:
    """A validated view of a checkpoint; tensors are loaded one at a time on demand."""

    def __init__(self, directory: pathlib.Path, files: tuple[pathlib.Path, ...],
                 entries: dict[str, _Entry], metadata: dict[str, str]) -> None:
        self.directory = directory
        self.files = files
        self._entries = entries
        self._metadata = metadata
        self._handles: dict[pathlib.Path, Any] = {}

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> SafetensorsCheckpoint:
        root = pathlib.Path(directory)
        if not root.is_dir():
            raise CheckpointFormatError(
                f"checkpoint directory {root} does not exist or is not a directory")
        index_path = root / INDEX_NAME
        weight_map: dict[str, pathlib.Path] | None = None
        if index_path.exists():
            weight_map = cls._read_index(root, index_path)
            files = tuple(sorted(set(weight_map.values())))
        elif (root / SINGLE_NAME).is_file():
            files = (root / SINGLE_NAME,)
        else:
            files = tuple(sorted(p for p in root.glob("*.safetensors") if p.is_file()))
        if not files:
            pickles = sorted(p.name for p in root.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
            if pickles:
                raise CheckpointFormatError(
                    f"{root} holds only pickle checkpoint files ({', '.join(pickles)}); they are "
                    "refused because unpickling can execute arbitrary code. In a trusted "
                    "environment convert them with AutoModelForCausalLM.from_pretrained(dir)"
                    ".save_pretrained(out, safe_serialization=True) and point at the output.")
            raise CheckpointFormatError(f"no safetensors weights in {root}")

        if (root / CHECKSUMS_FILE).is_file():  # written by our export; HF directories from elsewhere have none
            verify_checksums(root / CHECKSUMS_FILE, what=f"Hugging Face checkpoint {root}",
                             required=[p.relative_to(root).as_posix() for p in files])
        entries: dict[str, _Entry] = {}
        metadata: dict[str, str] = {}
        for i, path in enumerate(files):
            label = path.relative_to(root).as_posix()
            found, meta = _read_header(path, label)
            if i == 0:
                metadata = meta
            for key, entry in found.items():
                if key in entries:
                    raise CheckpointFormatError(
                        f"tensor {key!r} appears in both "
                        f"{entries[key].file.relative_to(root).as_posix()} and {label}")
                if weight_map is not None and weight_map.get(key) != path:
                    raise CheckpointFormatError(
                        f"{label}: tensor {key!r} is not listed in {INDEX_NAME}"
                        if key not in weight_map else f"{label}: tensor {key!r} is mapped to "
                        f"{weight_map[key].relative_to(root).as_posix()} by {INDEX_NAME}")
                entries[key] = entry
        if weight_map is not None:
            for key, path in weight_map.items():
                if key not in entries:
                    raise CheckpointFormatError(
                        f"{INDEX_NAME} maps tensor {key!r} to "
                        f"{path.relative_to(root).as_posix()}, but that file does not contain it")
        return cls(root, files, entries, metadata)

    @staticmethod
    def _read_index(root: pathlib.Path, index_path: pathlib.Path) -> dict[str, pathlib.Path]:
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointFormatError(f"{index_path}: not a readable JSON file: {exc}") from exc
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointFormatError(f"{index_path}: missing or empty 'weight_map' object")
        return {key: _index_target(root, name, key) for key, name in weight_map.items()}

    def _entry(self, key: str) -> _Entry:
        try:
            return self._entries[key]
        except KeyError:
            close = difflib.get_close_matches(key, self._entries, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise CheckpointFormatError(
                f"tensor {key!r} is not in checkpoint {self.directory}{hint}") from None

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key).shape

    def dtype(self, key: str) -> torch.dtype:
        return self._entry(key).dtype

    def nbytes(self, key: str) -> int:
        return self._entry(key).nbytes

    def file_of(self, key: str) -> pathlib.Path:
        return self._entry(key).file

    def get(self, key: str, *, check_finite: bool = True) -> torch.Tensor:
        """Read one tensor with a positioned read of its validated byte range.

        Deliberately not memory-mapped: pages of a mapped multi-GB file stay resident in this
        process while it runs, so a streaming conversion's memory would grow with the model.
        """
        entry = self._entry(key)
        tensor = torch.empty(entry.shape, dtype=entry.dtype)  # uninitialised: no zero-fill pass
        self.read_into(key, tensor, check_finite=check_finite)
        return tensor

    def read_into(self, key: str, out: torch.Tensor, *, check_finite: bool = True) -> None:
        """:meth:`get` into the caller's contiguous ``out`` (e.g. its place in a bigger tensor),
        sparing the copy a separate read and concatenation would cost."""
        entry = self._entry(key)
        label = entry.file.relative_to(self.directory).as_posix()
        if out.dtype != entry.dtype or tuple(out.shape) != tuple(entry.shape) or not out.is_contiguous():
            raise ValueError(f"{key}: cannot read {entry.dtype} {list(entry.shape)} into "
                             f"{'non-contiguous ' if not out.is_contiguous() else ''}{out.dtype} {list(out.shape)}")
        raw = out.reshape(-1).view(torch.uint8)
        try:
            handle = self._handles.get(entry.file)
            if handle is None:
                handle = self._handles[entry.file] = open(entry.file, "rb", buffering=0)
            got = os.preadv(handle.fileno(), [raw.numpy()], entry.offset) if entry.nbytes else 0
        except OSError as exc:
            raise CheckpointFormatError(f"{label}: cannot read tensor {key!r}: {exc}") from exc
        if got != entry.nbytes:
            raise CheckpointFormatError(f"{label}: tensor {key!r} is cut short ({got} of {entry.nbytes} bytes; "
                                        "the file changed or was truncated while open)")
        if check_finite and not all_finite(out):
            bad = int((~torch.isfinite(out)).sum())  # counted only when reporting
            raise CheckpointFormatError(
                f"{label}: tensor {key!r} has {bad} non-finite (NaN/Inf) values out of "
                f"{out.numel()}; refusing weights that are not finite")

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def config(self) -> dict[str, Any] | None:
        path = self.directory / "config.json"
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointFormatError(f"{path}: not a readable JSON file: {exc}") from exc
        if not isinstance(data, dict):
            raise CheckpointFormatError(f"{path}: expected a JSON object")
        return data

    def close(self) -> None:
        handles, self._handles = self._handles, {}
        for handle in handles.values():
            handle.__exit__(None, None, None)

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def audit_reads(directory, stored: list[str], reads) -> None:
    """Conversion audit: every stored tensor was read exactly once (``reads`` counts per key)."""

    unread = [k for k in stored if reads[k] == 0]
    reread = [f"{k} ({n}x)" for k, n in reads.items() if n > 1]
    if unread or reread:
        raise CheckpointFormatError(f"{directory}: conversion audit failed: "
                                    f"unused {unread[:5]}, read more than once {reread[:5]}")
