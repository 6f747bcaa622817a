"""Per-file checksums of what our tools write, verified by everything that reads it.

torch_dist files carry no checksum of their own (torch does not check the zip CRCs when it loads), so
one flipped bit in a ``.distcp`` file used to convert without complaint into a weight of 9.6e36.  Each
output we write therefore gets a ``checksums.json`` (or, for a group of files beside others such as a
dataset's ``.bin``/``.idx``, a named sidecar) listing every file's size and XXH3-128 digest; readers
verify before they use anything and name the corrupt file.

XXH3-128 (the ``xxhash`` package) rather than SHA-256 because this is about corruption, not forgery:
it hashes at ~2.7 GB/s here against ~0.5 GB/s for SHA-256, so verifying a checkpoint costs little
next to reading it.  Authenticity (who produced an expert) is the job of the package manifest's
SHA-256 digests and signatures.

Verification can be skipped (``--no-verify``) with a warning.  Files written by other tools (e.g. a
checkpoint saved by Megatron-Bridge's own ``pretrain()``) have no checksums: they are read with a
warning that they are unverified, and everything our tools write from them has checksums again.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import uuid
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import xxhash

from flexolmo_plugin.errors import FlexOlmoError, FlexOlmoWarning

CHECKSUMS_FILE = "checksums.json"
ALGORITHM = "xxh3_128"
FORMAT_VERSION = 1
_BLOCK = 8 << 20

_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar("flexolmo_verify_checksums", default=True)
_verified: dict[tuple, bool] = {}  # (manifest, its files' sizes and mtimes) -> already verified in this process


class CorruptFileError(FlexOlmoError):
    """A file does not match the checksum recorded when it was written."""


class UnverifiedWarning(FlexOlmoWarning):
    """What was read carries no checksums (or verification was switched off)."""


@contextlib.contextmanager
def verification(enabled: bool) -> Iterator[None]:
    """Switch checksum verification on or off for the code inside (the CLI's ``--no-verify``)."""
    token = _enabled.set(enabled)
    try:
        yield
    finally:
        _enabled.reset(token)


def file_digest(path: str | os.PathLike) -> str:
    hasher = xxhash.xxh3_128()
    with open(path, "rb") as file:
        while block := file.read(_BLOCK):
            hasher.update(block)
    return hasher.hexdigest()


def sidecar(path: str | os.PathLike) -> Path:
    """The checksum file of a file or a file group that lives among other files: ``PATH.checksums.json``
    (a dataset prefix's ``.bin``/``.idx``, an embedding)."""
    path = Path(path)
    return path.with_name(path.name + "." + CHECKSUMS_FILE)


def checksums_payload(root: str | os.PathLike, files: Iterable[str | os.PathLike]) -> bytes:
    """The manifest listing ``files`` by their paths relative to ``root`` (where the manifest lives)."""
    entries = {}
    for file in sorted(Path(f) for f in files):
        entries[file.relative_to(root).as_posix()] = {"bytes": file.stat().st_size, ALGORITHM: file_digest(file)}
    payload = {"format_version": FORMAT_VERSION, "algorithm": ALGORITHM, "files": entries}
    return (json.dumps(payload, indent=1) + "\n").encode()


def write_checksums(manifest: str | os.PathLike, files: Iterable[str | os.PathLike]) -> Path:
    """Write ``manifest`` for ``files`` inside an output that is still private (not yet in place):
    a sidecar beside published files goes through ``atomic.write_file_atomically`` instead."""
    manifest = Path(manifest)
    tmp = manifest.with_name(f".{manifest.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(checksums_payload(manifest.parent, files))
    os.replace(tmp, manifest)
    return manifest


def write_directory_checksums(directory: str | os.PathLike) -> Path:
    """``checksums.json`` for every file under ``directory`` (an output about to be published)."""
    directory = Path(directory)
    files = [p for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUMS_FILE]
    return write_checksums(directory / CHECKSUMS_FILE, files)


def verify_checksums(manifest: str | os.PathLike, *, what: str, required: Iterable[str] = ()) -> bool:
    """Check every file ``manifest`` lists (and that each of ``required``, relative names, is listed).
    Returns True when verified, False (with a warning) when there is no manifest or verification is
    off; raises :class:`CorruptFileError` naming the first file that differs."""
    manifest = Path(manifest)
    if not _enabled.get():
        warnings.warn(f"{what}: checksums not verified (--no-verify)", UnverifiedWarning, stacklevel=2)
        return False
    if not manifest.is_file():
        warnings.warn(f"{what}: no {manifest.name} (not written by flexolmo, e.g. by Megatron-Bridge's "
                      "pretrain()): its files are unverified", UnverifiedWarning, stacklevel=2)
        return False
    try:
        payload = json.loads(manifest.read_text())
        if payload.get("algorithm") != ALGORITHM or payload.get("format_version") != FORMAT_VERSION:
            raise CorruptFileError(f"{manifest}: unsupported checksum format {payload.get('algorithm')!r}")
        entries = {name: (int(e["bytes"]), str(e[ALGORITHM])) for name, e in payload["files"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
        raise CorruptFileError(f"{manifest}: malformed ({error})") from None
    unlisted = sorted(set(required) - set(entries))
    if unlisted:
        raise CorruptFileError(f"{manifest.parent / unlisted[0]}: not listed in {manifest} (added after the output "
                               "was written)")
    root = manifest.parent
    state = (str(manifest.resolve()), manifest.stat().st_mtime_ns,
             *((name, *_stat(root / name)) for name in sorted(entries)))
    if _verified.get(state):
        return True
    for name, (size, digest) in sorted(entries.items()):
        path = root / name
        if not path.is_file():
            raise CorruptFileError(f"{path}: missing (listed in {manifest})")
        if path.stat().st_size != size:
            raise CorruptFileError(f"{path}: {path.stat().st_size} bytes, {size} when written: the file is corrupt "
                                   "or was modified")
        if file_digest(path) != digest:
            raise CorruptFileError(f"{path}: checksum mismatch: the file is corrupt or was modified after it was "
                                   "written")
    _verified[state] = True
    return True


def _stat(path: Path) -> tuple[int, int]:
    try:
        info = path.stat()
    except FileNotFoundError:
        return -1, -1
    return info.st_size, info.st_mtime_ns
