"""Atomic output directories: a conversion either produces a complete directory or nothing.

Everything is written into a hidden temporary directory beside the target and moved into place
only after it is complete, so a failed or killed run never leaves a half-written checkpoint, and an
existing path is never touched (we refuse to overwrite it).  Two runs writing the same output at
the same time both get as far as the final move; exactly one of them wins, the other gets
:class:`OutputExistsError` and leaves the winner's output alone (no mixing).

Temporary names carry the process id and a random suffix: two runs (or two threads) never share one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flexolmo_plugin.conversion.checksums import write_directory_checksums
from flexolmo_plugin.errors import FlexOlmoError


class OutputExistsError(FlexOlmoError, FileExistsError):
    """The requested output path already exists; we never overwrite or merge into it."""


def check_new_output(path: str | os.PathLike, *, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """``path`` as a ``Path`` if it is free to be written: it does not exist, its parent does, and it is
    not inside one of the command's ``inputs`` (a merge written into a package directory would add a file
    its manifest does not list and spoil that package for every later merge)."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise OutputExistsError(f"output {path} already exists; choose a new path (nothing was written)")
    if not path.parent.exists():
        raise FileNotFoundError(f"parent directory {path.parent} of the output does not exist")
    final = path.parent.resolve() / path.name
    for source in inputs:
        if Path(source).is_dir() and Path(source).resolve() in final.parents:
            raise OutputExistsError(f"output {path} is inside the input {source}; writing there would change "
                                    "that input: choose a path outside it (nothing was written)")
    return path


def temporary_name(final: Path) -> Path:
    """The hidden temporary beside ``final``: unique per process *and* per call (pid + random
    suffix), so concurrent runs on one output never write into each other's files."""
    return final.parent / f".{final.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def write_file_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to the new file ``path`` all-or-nothing: a uniquely named temporary file beside
    it, synced, then linked into place, which fails (and leaves nothing) if ``path`` appeared meanwhile."""
    final = check_new_output(path)
    tmp = temporary_name(final)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, final)  # unlike rename, never replaces an existing file
        except FileExistsError:
            raise OutputExistsError(f"output {final} appeared while writing; nothing was replaced") from None
        fsync_path(final.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return final


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, checksums: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` only if the block completes, with a
    ``checksums.json`` of every file in it (:mod:`conversion.checksums`) unless the output keeps
    digests of its own (``checksums=False``: expert packages, whose manifest has SHA-256s).

    The final move never replaces anything (see :func:`move_into_place`): if ``path`` appeared while
    the block ran (another run writing the same output, or a user's empty directory), this run
    raises :class:`OutputExistsError` and removes its own temporary directory.  Any other failure
    (disk full, read-only file system, a refusal, a bug, Ctrl-C) removes it too.
    """
    final = check_new_output(path)
    tmp = temporary_name(final)
    try:
        tmp.mkdir()
    except OSError as error:  # name what the user asked for, not our hidden temporary
        raise OSError(error.errno, error.strerror, str(final)) from None
    try:
        yield tmp
        if checksums:
            write_directory_checksums(tmp)  # the digests its readers verify
        _fsync_tree(tmp)
        move_into_place(tmp, final)
        fsync_path(final.parent)  # the rename itself on disk
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------ the final move, never replacing
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def libc_function(name: str, argtypes: list):
    """A C library function returning ``int`` with errno kept (``ctypes.get_errno``), or None where
    the C library lacks it: for the Linux calls ``os`` does not expose (renameat2, linkat)."""
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (AttributeError, OSError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


# glibc's renameat2 (Linux >= 3.15, glibc >= 2.28)
_RENAMEAT2 = libc_function("renameat2", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint])


def move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished directory ``tmp`` to ``final`` only if ``final`` does not exist.

    A plain ``os.rename`` is not enough: on POSIX it silently *replaces* an empty directory at
    ``final`` and fails with a bare ENOTEMPTY against a non-empty one (the loser of two concurrent
    runs saw a traceback).  ``renameat2(RENAME_NOREPLACE)`` does the check and the move as one
    atomic step.  Where the file system or C library lacks it, ``final`` is first created with
    ``os.mkdir`` (atomic, fails if anything is there: whoever creates it owns it) and then replaced
    by the rename, which only ever replaces that empty directory of our own; a kill between the two
    calls (microseconds) would leave an empty directory behind, the one cost of the fallback.
    """
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(final), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code in (errno.EEXIST, errno.ENOTEMPTY):
            raise _appeared(final)
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # anything but "not supported here"
            raise OSError(code, os.strerror(code), str(final))
    try:
        os.mkdir(final)
    except FileExistsError:
        raise _appeared(final) from None
    try:
        os.rename(tmp, final)
    except OSError as error:
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY):  # something was put into our reservation
            raise _appeared(final) from None
        with contextlib.suppress(OSError):
            os.rmdir(final)  # our own empty reservation
        raise


def _appeared(final: Path) -> OutputExistsError:
    return OutputExistsError(f"output {final} appeared while this run was writing it (another run writing "
                             "the same output?); it was left as it is and nothing was written")


def _fsync_tree(root: Path) -> None:
    """Every file and directory under ``root`` (and ``root``) on disk.  Files that a writer already
    synced while the conversion ran (see :class:`BackgroundSync`) cost almost nothing here."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fsync_path(path)
    for path in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
        fsync_path(path)
    fsync_path(root)


def fsync_path(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BackgroundSync:
    """fsyncs finished (or growing) output files on a helper thread while the conversion goes on,
    so the disk writes back while the CPU converts, instead of all at the end before the rename.
    ``wait()`` re-raises the first failure; the final :func:`_fsync_tree` still covers every file."""

    def __init__(self):

        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fsync")
        self._pending: list = []

    def submit(self, path: str | os.PathLike) -> None:
        """fsync the finished file ``path`` soon.  (Not for a file still being written: syncing a
        growing file slowed its writes down ~1.6x here.)"""
        self._pending = [f for f in self._pending if not f.done() or f.exception()]
        self._pending.append(self._pool.submit(fsync_path, path))

    def wait(self) -> None:
        try:
            for future in self._pending:
                future.result()
        finally:
            self._pending = []
            self._pool.shutdown(wait=True)
