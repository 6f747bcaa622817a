"""Atomic output directories: a conversion either produces a complete directory or nothing.

Everything is written into a hidden temporary directory beside the target and renamed into place
only after it is complete, so a failed or killed run never leaves a half-written checkpoint, and an
existing directory is never touched (we refuse to overwrite it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


class OutputExistsError(FileExistsError):
    """The requested output path already exists; we never overwrite or merge into it."""


def check_new_output(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise OutputExistsError(f"output {path} already exists; choose a new path (nothing was written)")
    if not path.parent.exists():
        raise FileNotFoundError(f"parent directory {path.parent} of the output does not exist")
    return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` only if the block completes."""
    final = check_new_output(path)
    tmp = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        os.rename(tmp, final)  # atomic on POSIX; fails (and we clean up) if final appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
