"""Output files written past the page cache (``O_DIRECT``), for checkpoint-sized writes.

Why: a conversion writes the whole model once and never reads it back, yet a buffered write first
copies every byte into freshly allocated page-cache pages and ``fsync`` then writes them out.  On
the virtual machines we measured, allocating those pages is what varies: writing 1 GiB into new
page-cache pages took 0.3 s or 3.4 s depending on whether the guest's memory was already backed by
the host, plus ~0.3 s of ``fsync``; the same 1 GiB with ``O_DIRECT`` took 0.31–0.49 s, durable
except for metadata (docs/benchmark_notes/bench_conversion.md).  Large training jobs on cluster
file systems also prefer checkpoints not to evict their page cache.

``O_DIRECT`` needs the buffer address, the file offset and the length aligned to the device's
block size, which tensors' bytes are not; so :class:`DirectFile` copies what it is given into
page-aligned staging buffers, and I/O threads write full buffers at their offsets while the next
one fills (two writes in flight were faster than one on the disks we measured).  The last, partial
block is written padded and the file truncated back to its true length.  Where the file system
refuses ``O_DIRECT`` (at open or at the first write) the same code writes through the page cache:
same bytes, same API.  ``FLEXOLMO_DIRECT_IO=0`` turns direct writes off.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import queue
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

ALIGN = 4096  # covers 512- and 4096-byte logical blocks
_REFUSED = {errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}  # "no O_DIRECT here"


def direct_io_enabled() -> bool:
    return hasattr(os, "O_DIRECT") and os.environ.get("FLEXOLMO_DIRECT_IO", "1") not in ("0", "false", "no")


class Staging:
    """Page-aligned buffers and the threads that write them out, reused by every file one writer
    produces in turn (so the buffers' pages are touched once, not once per file).  Numpy copies
    into them release the GIL, letting the converter's reading thread run meanwhile."""

    def __init__(self, *, buffer_bytes: int = 4 * 2**20, buffers: int = 8, io_threads: int = 4):
        if buffer_bytes <= 0 or buffer_bytes % ALIGN or buffers < 2 or io_threads < 1:
            raise ValueError(f"staging buffers must be positive multiples of {ALIGN} bytes, at least two")
        self.buffer_bytes = buffer_bytes
        self._map = mmap.mmap(-1, buffer_bytes * buffers)
        whole = np.frombuffer(self._map, dtype=np.uint8)
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(buffers):
            self.free.put(whole[i * buffer_bytes:(i + 1) * buffer_bytes])
        del whole
        self.pool = ThreadPoolExecutor(io_threads, thread_name_prefix="direct-io")
        self.closed = False

    def close(self) -> None:
        """After every file using these buffers is closed."""
        if not self.closed:
            self.closed = True
            self.pool.shutdown(wait=True)
            while not self.free.empty():
                self.free.get()
            try:
                self._map.close()
            except BufferError:  # a view is still alive somewhere (an aborted file): let GC unmap it
                pass


class DirectFile:
    """A new, write-only, sequential binary file: ``write``/``tell``/``flush``/``close`` like ``open(p, "xb")``.

    One thread owns it.  ``close`` waits for every write and raises the first I/O error, but does
    not fsync (callers sync finished files their own way; after ``O_DIRECT`` writes that is only
    metadata and the device cache).
    """

    def __init__(self, path: str | os.PathLike, staging: Staging, *, direct: bool | None = None):
        self.path = os.fspath(path)
        self._staging = staging
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        self.direct = direct_io_enabled() if direct is None else direct and hasattr(os, "O_DIRECT")
        self._fd = -1
        if self.direct:
            try:
                self._fd = os.open(self.path, flags | os.O_DIRECT, 0o644)
            except OSError as error:
                if error.errno not in _REFUSED:  # file systems without O_DIRECT refuse it at open
                    raise
                self.direct = False
        if self._fd < 0:
            self._fd = os.open(self.path, flags, 0o644)
        self._buffer: np.ndarray | None = None
        self._fill = 0  # bytes in the current buffer
        self._submitted = 0  # bytes handed to the I/O threads (the current buffer's file offset)
        self._pending: list[Future] = []

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def tell(self) -> int:
        return self._submitted + self._fill

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        """Nothing to do: full buffers are already on their way, the tail goes at ``close``."""

    def write(self, data) -> int:
        if self._fd < 0:
            raise ValueError(f"{self.path}: write to a closed file")
        source = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
        done, total = 0, len(source)
        while done < total:
            if self._buffer is None:
                self._check_errors()
                self._buffer = self._staging.free.get()
            take = min(len(self._buffer) - self._fill, total - done)
            self._buffer[self._fill:self._fill + take] = source[done:done + take]
            self._fill += take
            done += take
            if self._fill == len(self._buffer):
                self._submit(self._fill)
        return total

    def _submit(self, nbytes: int) -> None:
        buffer, offset = self._buffer, self._submitted
        self._buffer, self._fill = None, 0
        self._submitted += nbytes
        future = self._staging.pool.submit(self._pwrite_all, buffer[:nbytes], offset)
        future.add_done_callback(lambda _: self._staging.free.put(buffer))
        self._pending.append(future)

    def _pwrite_all(self, view: np.ndarray, offset: int) -> None:
        done = 0
        while done < len(view):
            try:
                n = os.pwrite(self._fd, view[done:], offset + done)
            except OSError as error:
                flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
                if error.errno not in _REFUSED or not flags & getattr(os, "O_DIRECT", 0):
                    raise
                # the device wants another alignment: write through the page cache instead
                fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
                self.direct = False
                continue
            if n <= 0:
                raise OSError(errno.EIO, f"{self.path}: short write at offset {offset + done}")
            done += n

    def _check_errors(self, wait: bool = False) -> None:
        if wait:
            for future in self._pending:
                future.exception()
        still = []
        for future in self._pending:
            if future.done():
                if future.exception() is not None:
                    raise future.exception()
            else:
                still.append(future)
        self._pending = still

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            length = self.tell()
            if self._fill:
                padded = self._fill if not self.direct else -(-self._fill // ALIGN) * ALIGN
                self._buffer[self._fill:padded] = 0
                self._submit(padded)
            elif self._buffer is not None:
                self._staging.free.put(self._buffer)
                self._buffer = None
            self._check_errors(wait=True)
            if self._submitted != length:
                os.ftruncate(self._fd, length)
        finally:
            for future in self._pending:  # on error: no write may still target this descriptor
                future.exception()
            self._pending = []
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
