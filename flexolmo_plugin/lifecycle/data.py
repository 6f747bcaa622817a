"""A data owner's text -> Megatron indexed dataset (``.bin`` / ``.idx``), streamed line by line.

Megatron-Core and Megatron-Bridge train from ``megatron.core.datasets`` indexed datasets: token ids
in ``PREFIX.bin`` and document boundaries in ``PREFIX.idx``.  Input is JSON Lines (one document per
line, text under ``text_key``), read one line at a time so private corpora of any size fit; each
document ends with the tokenizer's end-of-document token, as Megatron's GPT datasets expect.  A bad
line (not UTF-8, not JSON, no text) stops the run with its file and line number, and nothing is left at
the output prefix.

The two output files are written without names and named only when both are complete (see
:class:`_UnnamedFile`), ``.bin`` first and ``.idx`` last, and never over an existing file: two runs
writing one prefix at the same time cannot mix their files (one wins, the other is refused and
removes only what it named itself), and a run killed while it writes -- even by SIGKILL -- leaves
nothing behind on file systems with unnamed files (Linux ``O_TMPFILE``; elsewhere a hidden
``.partial-`` file).  The one window left is a kill between the two names (microseconds): a ``.bin``
without its ``.idx``, which no reader opens and the next run refuses to write over.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType, IndexedDatasetBuilder
from tqdm import tqdm
from transformers import AutoTokenizer

from flexolmo_plugin.conversion.atomic import OutputExistsError, fsync_path, libc_function, write_file_atomically
from flexolmo_plugin.conversion.checkpoint_dir import VOCABULARY_FILES
from flexolmo_plugin.conversion.checksums import checksums_payload, sidecar, verify_checksums
from flexolmo_plugin.errors import FlexOlmoError


class DataError(FlexOlmoError):
    """Unusable input data (bad JSON, missing text, empty corpus) or tokenizer."""


@dataclass(frozen=True)
class DatasetReport:
    documents: int
    tokens: int
    prefix: Path


# A directory holds a tokenizer only if it has one of these.  ``AutoTokenizer`` does not check: given a
# model directory without tokenizer files it builds the model type's tokenizer class with an empty
# vocabulary, which turns every document into zero tokens (an empty dataset of end-of-document
# tokens, or a crash deep inside the model).
# (A tokenizer_config.json alone names a tokenizer class, whose files may come with it.)
TOKENIZER_FILES = (*VOCABULARY_FILES, "tokenizer_config.json")


def verify_dataset(prefix: str | os.PathLike) -> None:
    """Check a dataset's ``.bin``/``.idx`` against the checksums prepare-data wrote beside them
    (``PREFIX.checksums.json``); a dataset built elsewhere is used with an "unverified" warning."""
    prefix = Path(prefix)
    missing = [str(p) for p in (prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx"))
               if not p.is_file()]
    if missing:
        raise DataError(f"dataset {prefix}: {', '.join(missing)} missing (a prefix names PREFIX.bin and PREFIX.idx)")
    verify_checksums(sidecar(prefix), what=f"dataset {prefix}", required=[prefix.name + ".bin", prefix.name + ".idx"])


_HEADER_BYTES = 34  # magic (9 bytes), version (8), dtype code (1), sequence and document counts (8 + 8)
_INDEX_BLOCK = 1 << 22  # sequences checked at a time (bounded memory for any size of index)


def _rebuild(path: Path, problem: str) -> DataError:
    return DataError(f"{path}: {problem}; the dataset is damaged or incomplete: rebuild it ('flexolmo prepare-data')")


def check_indexed_dataset(prefix: str | os.PathLike) -> np.dtype:
    """The token dtype of the Megatron indexed dataset at ``prefix`` once its two files are checked to
    agree, or :class:`DataError` naming the damaged file.

    Checked without trusting either file: the ``.idx`` is a version-1 Megatron index of an integer
    token type and exactly the size its header declares; its sequences have non-negative lengths and
    lie back to back from the start of the ``.bin`` to exactly its end; its document boundaries cover
    the sequences in order.  (Megatron's reader asserts on a bad header, raises a bare ``ValueError``
    on a short index, and reads past the end of a short ``.bin`` only when it gets there.)  Cheap: the
    index is read in blocks, the ``.bin`` only for its size; the checksums are :func:`verify_dataset`'s."""
    prefix = Path(prefix)
    bin_path, idx_path = (prefix.with_name(prefix.name + suffix) for suffix in (".bin", ".idx"))
    missing = [str(p) for p in (bin_path, idx_path) if not p.is_file()]
    if missing:
        raise DataError(f"dataset {prefix}: {', '.join(missing)} missing (a prefix names PREFIX.bin and PREFIX.idx)")
    with open(idx_path, "rb") as stream:
        head = stream.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES or head[:9] != _INDEX_HEADER:
        raise _rebuild(idx_path, "not a Megatron indexed-dataset index (no MMIDIDX header)")
    version = struct.unpack("<Q", head[9:17])[0]
    if version != 1:
        raise _rebuild(idx_path, f"index format version {version}, not 1")
    try:
        dtype = np.dtype(DType.dtype_from_code(head[17]))
    except (ValueError, KeyError):
        raise _rebuild(idx_path, f"unknown token type code {head[17]}") from None
    if dtype.kind not in "iu":
        raise _rebuild(idx_path, f"token type {dtype.name} is not an integer type")
    sequences, documents = struct.unpack("<QQ", head[18:34])
    declared = _HEADER_BYTES + 12 * sequences + 8 * documents
    size = idx_path.stat().st_size
    if size != declared:
        raise _rebuild(idx_path, f"{size} bytes, but its header declares {sequences} sequences and {documents} "
                                 f"document boundaries ({declared} bytes)")
    end = 0  # byte offset in the .bin where the next sequence must start
    for start in range(0, sequences, _INDEX_BLOCK):
        count = min(_INDEX_BLOCK, sequences - start)
        lengths = np.fromfile(idx_path, dtype="<i4", count=count, offset=_HEADER_BYTES + 4 * start).astype(np.int64)
        pointers = np.fromfile(idx_path, dtype="<i8", count=count, offset=_HEADER_BYTES + 4 * sequences + 8 * start)
        if lengths.min() < 0:
            raise _rebuild(idx_path, f"sequence {start + int(lengths.argmin())} has a negative length")
        expected = end + np.concatenate(([0], np.cumsum(lengths[:-1] * dtype.itemsize)))
        if not np.array_equal(pointers, expected):
            first = start + int(np.flatnonzero(pointers != expected)[0])
            raise _rebuild(idx_path, f"sequence {first} does not start where the one before it ends")
        end = int(expected[-1] + lengths[-1] * dtype.itemsize)
    if bin_path.stat().st_size != end:
        raise _rebuild(bin_path, f"{bin_path.stat().st_size} bytes, but {idx_path.name} describes {end}")
    if documents == 0:
        raise _rebuild(idx_path, "no document boundaries")
    previous = 0
    for start in range(0, documents, _INDEX_BLOCK):
        count = min(_INDEX_BLOCK, documents - start)
        bounds = np.fromfile(idx_path, dtype="<i8", count=count, offset=_HEADER_BYTES + 12 * sequences + 8 * start)
        steps = np.diff(np.concatenate(([previous], bounds)))
        if (start == 0 and bounds[0] != 0) or steps.min() < 0:
            raise _rebuild(idx_path, "document boundaries out of order")
        previous = int(bounds[-1])
    if previous != sequences:
        raise _rebuild(idx_path, f"document boundaries end at sequence {previous}, not at the last ({sequences})")
    return dtype


def load_tokenizer(tokenizer_dir: str | os.PathLike):
    """A local ``transformers`` fast tokenizer (never downloaded)."""

    path = Path(tokenizer_dir)
    if not path.is_dir():
        raise DataError(f"tokenizer directory {path} does not exist")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise DataError(f"{path}: no tokenizer here (none of {', '.join(TOKENIZER_FILES)}); save the model's "
                        "tokenizer into it (tokenizer.save_pretrained) or point to the tokenizer's directory")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as error:  # transformers raises several types for unusable directories
        raise DataError(f"{path}: cannot load a tokenizer ({error})") from error


def iter_records(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a JSON Lines file.

    Read as bytes and decoded line by line: a text-mode file decodes in blocks, so a byte that is not
    UTF-8 would surface as a ``UnicodeDecodeError`` that names neither the file nor the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path}:{number}: not valid UTF-8 (byte 0x{raw[error.start]:02x} at byte "
                                f"{error.start + 1} of the line); JSON Lines must be UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object")
            if "\\u" in line:  # only an escape can make a lone surrogate (the bytes were valid UTF-8)
                lone = _lone_surrogate(record)
                if lone is not None:
                    raise DataError(f"{path}:{number}: a string holds the lone UTF-16 surrogate \\u{ord(lone):04x}, "
                                    "which is not text (no UTF-8 encodes it; was the JSON written from broken "
                                    "UTF-16?)")
            yield number, record


def _lone_surrogate(value) -> str | None:
    """The first lone UTF-16 surrogate in any string (key or value) of a decoded JSON value, else None.

    ``json.loads`` turns ``"\\ud800"`` into a one-character string that no codec can encode: the
    tokenizer then fails with a ``TypeError`` that names neither file nor line."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            return value[error.start]
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _lone_surrogate(key) if isinstance(key, str) else None
        if found is None:
            found = _lone_surrogate(item)
        if found is not None:
            return found
    return None


def iter_documents(path: str | os.PathLike, *, text_key: str = "text") -> Iterator[tuple[int, str]]:
    """``(line number, text)`` for each non-blank line of a JSON Lines file."""
    for number, record in iter_records(path):
        if not isinstance(record.get(text_key), str):
            raise DataError(f"{path}:{number}: expected an object with a string field {text_key!r}")
        yield number, record[text_key]


def prepare_dataset(input_path: str | os.PathLike, output_prefix: str | os.PathLike, *, tokenizer_dir,
                    text_key: str = "text", append_eod: bool = True, batch_size: int = 256,
                    progress: bool = False) -> DatasetReport:
    """Tokenize ``input_path`` into the new files ``output_prefix.bin`` / ``.idx`` (all or nothing)."""

    tokenizer = load_tokenizer(tokenizer_dir)
    eod = tokenizer.eos_token_id
    if append_eod and eod is None:
        raise DataError(f"{tokenizer_dir}: tokenizer has no end-of-document (eos) token; pass append_eod=False")
    prefix = Path(output_prefix)
    if prefix.name in ("", ".", "..") or str(output_prefix).endswith(("/", os.sep)):
        raise DataError(f"output prefix {str(output_prefix)!r} names a directory, not a dataset: give DIR/NAME "
                        "(writes DIR/NAME.bin and DIR/NAME.idx)")
    final = [prefix.with_name(prefix.name + suffix) for suffix in (".bin", ".idx")]
    existing = [str(p) for p in (*final, sidecar(prefix)) if p.exists() or p.is_symlink()]
    if existing:
        raise OutputExistsError(f"output already exists: {existing}; choose another prefix (nothing was written)")
    if not prefix.parent.is_dir():
        raise FileNotFoundError(f"output directory {prefix.parent} does not exist")
    dtype = DType.optimal_dtype(len(tokenizer))
    size = Path(input_path).stat().st_size if Path(input_path).is_file() else 0
    bar = None
    documents = tokens = 0
    files: list[_UnnamedFile] = []
    builder = None

    def flush(batch: list[str]) -> None:
        nonlocal documents, tokens
        if not batch:
            return
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            if append_eod:
                ids = ids + [eod]
            if not ids:
                continue
            builder.add_item(torch.from_numpy(np.asarray(ids, dtype=np.int64)))
            builder.end_document()
            documents += 1
            tokens += len(ids)

    try:
        for path in final:
            files.append(_UnnamedFile(path))
        builder = IndexedDatasetBuilder(files[0].path, dtype=dtype)
        if progress:
            bar = tqdm(total=size, unit="B", unit_scale=True, desc="tokenizing")
        batch: list[str] = []
        for _, text in iter_documents(input_path, text_key=text_key):
            batch.append(text)
            if bar is not None:
                bar.update(len(text.encode("utf-8")) + 1)
            if len(batch) >= batch_size:
                flush(batch)
                batch = []
        flush(batch)
        if documents == 0:
            raise DataError(f"{input_path}: no documents")
        builder.finalize(files[1].path)
        _name_together(files, prefix)
        try:  # a dataset is published with its checksums or not at all
            write_file_atomically(sidecar(prefix), checksums_payload(prefix.parent, final))
        except BaseException:
            for file in files:
                file.unpublish()
            raise
    finally:
        if builder is not None:
            builder.data_file.close()  # already closed by finalize unless the run failed
        for file in files:
            file.close()
        if bar is not None:
            bar.close()
    return DatasetReport(documents, tokens, prefix)


# ------------------------------------------------------------------ outputs named only when complete
_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400


# The C library's linkat: os.link cannot follow the /proc/self/fd link of an unnamed file (it calls
# link, which links the symbolic link itself).
_LINKAT = libc_function("linkat", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int])
_UNNAMED = _LINKAT is not None and hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")


class _UnnamedFile:
    """A new output file that has no name until :meth:`publish` gives it ``final``.

    Where the file system allows it (Linux ``O_TMPFILE``: ext4, xfs, btrfs, tmpfs...) the file is
    created with no directory entry at all, so a run killed at any moment -- even by SIGKILL, which
    runs no clean-up -- leaves nothing behind: the kernel frees the file with the process.  Elsewhere
    it is a hidden file beside ``final`` whose name is unique to this process and call (pid + random
    suffix, so concurrent runs never write into each other's file), removed on every failure but a
    kill.  Writers open :attr:`path`.  :meth:`publish` *links* the file to ``final``, which, unlike
    a rename, fails if ``final`` exists: an existing file is never replaced.
    """

    def __init__(self, final: Path):
        self.final = final
        self._fd: int | None = None
        self._tmp: Path | None = None
        if _UNNAMED:
            try:
                self._fd = os.open(final.parent, os.O_TMPFILE | os.O_RDWR, 0o666)
            except OSError as error:
                if error.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):  # not "unsupported here"
                    raise OSError(error.errno, error.strerror, str(final)) from None
        if self._fd is None:
            self._tmp = final.parent / f".{final.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            self._tmp.open("xb").close()

    @property
    def path(self) -> str:
        return f"/proc/self/fd/{self._fd}" if self._fd is not None else str(self._tmp)

    def publish(self) -> None:
        """Sync the file and give it its final name; ``FileExistsError`` if that name is taken."""
        if self._fd is not None:
            os.fsync(self._fd)
            if _LINKAT(_AT_FDCWD, os.fsencode(self.path), _AT_FDCWD, os.fsencode(self.final), _AT_SYMLINK_FOLLOW):
                code = ctypes.get_errno()
                raise (FileExistsError if code == errno.EEXIST else OSError)(code, os.strerror(code), str(self.final))
        else:
            fsync_path(self._tmp)
            os.link(self._tmp, self.final)

    def unpublish(self) -> None:
        """Remove ``final`` if it is this file (never another run's file of the same name)."""
        mine = os.fstat(self._fd) if self._fd is not None else os.stat(self._tmp)
        try:
            there = os.stat(self.final, follow_symlinks=False)
        except FileNotFoundError:
            return
        if (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
            self.final.unlink()

    def close(self) -> None:
        """Drop the unnamed file (or the hidden name); a published file keeps its final name."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        elif self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None


def _name_together(files: list[_UnnamedFile], prefix: Path) -> None:
    """Publish ``files`` in order, all or none.  The last one (the ``.idx``) is what makes a dataset
    readable, and it is named only once the ``.bin`` is.  If a name is taken -- another run writing
    the same prefix got there first -- the names this run already gave are removed again (they are
    checked to be this run's files, so the winner's are never touched) and the run is refused."""
    named: list[_UnnamedFile] = []
    try:
        for file in files:
            try:
                file.publish()
            except FileExistsError:
                raise OutputExistsError(
                    f"output {file.final} appeared while this run was writing it (another run writing the prefix "
                    f"{prefix}?); nothing was replaced and nothing of this run was left"
                ) from None
            named.append(file)
    except BaseException:
        for file in named:
            file.unpublish()
        raise
    fsync_path(prefix.parent)  # the new names themselves on disk
