"""Write (sharded) safetensors one tensor at a time, so memory holds one tensor, not the model.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once.  Since all names,
dtypes and shapes are known before conversion starts, we can write each file's header first and then
stream the tensors' bytes in order; the result is a standard safetensors file (plus the usual
``model.safetensors.index.json`` when sharded), readable by ``transformers``.

The bytes are written by a helper thread (file writes release the GIL) so that the caller can read
and transform the next tensor meanwhile; at most ``inflight_bytes`` wait in between, and every shard
is fsynced as soon as it is complete.  Errors surface at the next ``write`` or at ``close``.
Shards are written past the page cache where the file system allows it (:mod:`.direct_io`).
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flexolmo_plugin.conversion.atomic import BackgroundSync
from flexolmo_plugin.conversion.direct_io import DirectFile, Staging

INDEX_NAME = "model.safetensors.index.json"

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass
class _Planned:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class _Shard:
    file_name: str
    tensors: list[_Planned] = field(default_factory=list)
    nbytes: int = 0

    def add(self, item: _Planned) -> None:
        self.tensors.append(item)
        self.nbytes += item.nbytes


class ShardedSafetensorsWriter:
    """Streams tensors, in a fixed planned order, into safetensors shards of bounded size."""

    def __init__(self, directory: str | os.PathLike, plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 *, max_shard_bytes: int = 5 * 2**30, metadata: dict[str, str] | None = None,
                 inflight_bytes: int = 128 * 2**20):
        self.directory = Path(directory)
        self.metadata = {"format": "pt", **(metadata or {})}
        planned = [_Planned(n, d, tuple(s)) for n, d, s in plan]
        names = [p.name for p in planned]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the output plan")
        shards: list[_Shard] = []
        for item in planned:
            if item.dtype not in _DTYPE_NAMES:
                raise ValueError(f"{item.name}: dtype {item.dtype} cannot be stored in safetensors")
            if not shards or (shards[-1].tensors and shards[-1].nbytes + item.nbytes > max_shard_bytes):
                shards.append(_Shard(""))
            shards[-1].add(item)
        for i, shard in enumerate(shards, 1):
            shard.file_name = ("model.safetensors" if len(shards) == 1
                               else f"model-{i:05d}-of-{len(shards):05d}.safetensors")
        self.shards = shards
        self._order = [(s, t) for s in shards for t in s.tensors]
        self._next = 0
        self._file = None
        self.bytes_written = 0
        self._inflight_limit, self._inflight = inflight_bytes, 0
        self._budget = threading.Condition()
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._sync = BackgroundSync()
        self._staging = Staging()
        self._thread = threading.Thread(target=self._drain, name="safetensors-writer", daemon=True)
        self._thread.start()

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def _open(self, shard: _Shard) -> None:
        header, offset = {}, 0
        for t in shard.tensors:
            header[t.name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        header["__metadata__"] = self.metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned
        self._file = DirectFile(self.directory / shard.file_name, self._staging)
        self._file.write(len(raw).to_bytes(8, "little"))
        self._file.write(raw)

    def _drain(self) -> None:
        """The writer thread: tensors in plan order; a shard is closed and fsynced once complete."""
        try:
            while (job := self._queue.get()) is not None:
                shard, data, last = job
                if self._file is None:
                    self._open(shard)
                self._file.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
                nbytes = data.numel() * data.element_size()
                del data, job
                if last:
                    self._file.close()
                    self._file = None
                    self._sync.submit(self.directory / shard.file_name)
                with self._budget:
                    self._inflight -= nbytes
                    self._budget.notify_all()
        except BaseException as error:  # noqa: BLE001 -- re-raised on the caller's thread
            with self._budget:
                self._error = error
                self._budget.notify_all()

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self.abort()
            raise error

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Queue the next planned tensor; it must not be modified afterwards (it is written later)."""
        self._raise_pending()
        if self._next >= len(self._order):
            raise ValueError(f"{name}: every planned tensor was already written")
        shard, planned = self._order[self._next]
        if name != planned.name:
            raise ValueError(f"expected tensor {planned.name!r} next, got {name!r}")
        if tensor.dtype != planned.dtype or tuple(tensor.shape) != planned.shape:
            raise ValueError(f"{name}: got {tensor.dtype} {list(tensor.shape)}, planned "
                             f"{planned.dtype} {list(planned.shape)}")
        data = tensor.detach().cpu().contiguous()
        with self._budget:
            self._budget.wait_for(lambda: self._error is not None or self._inflight == 0
                                  or self._inflight + planned.nbytes <= self._inflight_limit)
            self._inflight += planned.nbytes
        self._raise_pending()
        self.bytes_written += planned.nbytes
        self._next += 1
        last = self._next == len(self._order) or self._order[self._next][0] is not shard
        self._queue.put((shard, data, last))

    def abort(self) -> None:
        """Stop the writer thread without finishing (the caller discards the directory)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        try:
            self._sync.wait()
        except OSError:
            pass
        self._staging.close()

    def close(self) -> None:
        """Finish: every planned tensor must have been written; writes the index when sharded."""
        self._queue.put(None)
        self._thread.join()
        self._raise_pending()
        try:
            if self._file is not None:
                self._file.close()
                self._file = None
            self._sync.wait()
        finally:
            self._staging.close()
        if self._next != len(self._order):
            missing = [t.name for _, t in self._order[self._next:]]
            raise ValueError(f"{len(missing)} planned tensors were never written, first: {missing[0]}")
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {t.name: s.file_name for s, t in self._order}}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
