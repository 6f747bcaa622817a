"""The ``.metadata`` of a ``torch_dist`` checkpoint, read without executing anything.

torch's ``FileSystemReader.read_metadata`` is a plain ``pickle.load``: a crafted ``.metadata`` runs
arbitrary code in every tool that opens the checkpoint.  Checkpoints reach a coordinator from data
owners and back, so that is not acceptable.  The file is a pickle of a few torch dataclasses (the
DCP ``Metadata`` tree, the planner's save plans that Megatron's writer keeps beside it, ``torch.Size``,
dtypes, a path); :class:`_MetadataUnpickler` resolves exactly those globals and refuses any other
one -- the approach of ``torch.load(weights_only=True)``, for the DCP format.

Every reader in this package opens checkpoints through :func:`read_metadata` or
:class:`SafeFileSystemReader`; :func:`verify_metadata` is the gate run before code we do not own
(Megatron's and Megatron-Bridge's loaders) reads the same file.  Megatron's other pickle,
``common.pt``, is read by ``torch.load`` with torch's default ``weights_only=True``.
"""

from __future__ import annotations

import collections
import enum
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint import planner as dcp_planner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from flexolmo_plugin.errors import FlexOlmoError

METADATA_FILE = ".metadata"
COMMON_FILE = "common.pt"  # Megatron's non-tensor state

# (module, name) -> object: every global a torch_dist ``.metadata`` written by torch 2.x / Megatron /
# Megatron-Bridge refers to.  Each is a data class, an enum, or a pure constructor of a value.
_ALLOWED = {
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("pathlib", "PosixPath"): Path,
    ("pathlib", "PurePosixPath"): Path,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): dcp_filesystem._StorageInfo,
    **{("torch.distributed.checkpoint.metadata", name): getattr(dcp_metadata, name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")},
    **{("torch.distributed.checkpoint.planner", name): getattr(dcp_planner, name) for name in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadPlan", "ReadItem", "LoadItemType")},
}


class UnsafeCheckpointError(FlexOlmoError):
    """The checkpoint's metadata refers to something a checkpoint never contains (possibly code)."""


class CorruptMetadataError(FlexOlmoError):
    """The checkpoint's metadata cannot be read (truncated or not a torch_dist metadata file)."""


# The only objects BUILD (``__setstate__`` / attribute assignment) may act on: instances of the
# checkpoint's data classes, which the pickle itself created.  Never a class, function, enum member or
# dtype -- those are process-wide singletons, and setting their attributes would change every later
# use of them (e.g. ``Path._str``) without running any code of the file.
_BUILDABLE = tuple(
    value for (module, _), value in _ALLOWED.items()
    if module.startswith("torch.distributed.checkpoint") and isinstance(value, type)
    and not issubclass(value, enum.Enum))


class _MetadataUnpickler(pickle._Unpickler):
    """The pure-Python unpickler (its opcodes can be overridden) with an allow-list of globals and
    BUILD restricted to fresh instances of the checkpoint's data classes."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, path: Path):
        super().__init__(file)
        self._path = path

    def load_build(self):
        target = self.stack[-2] if len(self.stack) >= 2 else None
        if type(target) not in _BUILDABLE:
            raise UnsafeCheckpointError(
                f"{self._path}: sets the state of a {type(target).__name__}, which a torch_dist checkpoint never "
                "does; refusing to unpickle it")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self._path}: refers to {module}.{name}, which a torch_dist checkpoint never contains; "
            "refusing to unpickle it (it could run code)")

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"{self._path}: holds a persistent reference, which DCP metadata never does")


def read_metadata(directory: str | os.PathLike) -> Metadata:
    """The DCP ``Metadata`` of the checkpoint in ``directory``, unpickled with the allow-list."""
    path = Path(directory) / METADATA_FILE
    try:
        with open(path, "rb") as file:
            metadata = _MetadataUnpickler(file, path).load()
    except FlexOlmoError:
        raise
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            RecursionError, OverflowError, MemoryError, struct.error) as error:
        raise CorruptMetadataError(f"{path}: not a readable torch_dist metadata file ({error})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CorruptMetadataError(f"{path}: not a torch_dist metadata file (holds {type(metadata).__name__})")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()  # as torch's reader does for files from older writers
    return metadata


def verify_metadata(directory: str | os.PathLike) -> None:
    """Refuse the checkpoint unless its ``.metadata`` passes the allow-list, and its byte objects (in
    the ``.distcp`` files) and ``common.pt`` (if any) load with ``weights_only=True``.  Run before
    handing the directory to Megatron's or Bridge's own loaders: they unpickle ``.metadata`` without
    an allow-list and byte objects with ``weights_only=False``, and torch's refusal of a bad
    ``common.pt`` is a page of advice to turn the protection off."""
    _verify_byte_items(Path(directory), read_metadata(directory))
    common = Path(directory) / COMMON_FILE
    if common.exists():
        try:
            torch.load(common, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise UnsafeCheckpointError(
                f"{common}: holds objects a checkpoint never contains; refusing to unpickle it (it could run "
                "code)") from None
        except (RuntimeError, EOFError, ValueError) as error:
            raise CorruptMetadataError(f"{common}: not readable ({str(error).splitlines()[0]})") from None


class SafeFileSystemReader(FileSystemReader):
    """torch's DCP file reader with the allow-list unpickler; metadata is read once and cached
    (readers that load tensor by tensor otherwise unpickle it once per tensor)."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(str(path))
        self._directory = Path(path)
        self._metadata: Metadata | None = None

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if kwargs.get("rank") is not None:
            raise UnsafeCheckpointError(f"{self._directory}: per-rank metadata files are not supported")
        if self._metadata is None:
            self._metadata = read_metadata(self._directory)
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


def _numpy_globals() -> list:
    """What Megatron's RNG state (numpy's random state: arrays) needs beyond torch's weights-only set:
    numpy's array reconstruction and dtypes, which build arrays and call nothing else."""
    core = getattr(np, "_core", None) or np.core
    dtypes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


def _verify_byte_items(directory: Path, metadata: Metadata) -> None:
    """Every non-tensor object of the checkpoint (Megatron's ShardedObjects: RNG and rerun state,
    optimizer settings, TE extra state) is a ``torch.save`` pickle inside a ``.distcp`` file that
    torch's default load planner reads with ``weights_only=False``: each is checked here with
    ``weights_only=True`` first (they are small; tensors are not touched)."""
    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        relative = str(getattr(info, "relative_path", ""))
        if not relative or Path(relative).name != relative:
            raise UnsafeCheckpointError(f"{directory / METADATA_FILE}: object {index.fqn} points outside the "
                                        f"checkpoint ({relative!r})")
        path = directory / relative
        with open(path, "rb") as file:
            file.seek(info.offset)
            data = file.read(info.length)
        if len(data) != info.length:
            raise CorruptMetadataError(f"{path}: truncated (object {index.fqn} lies beyond its end)")
        try:
            with torch.serialization.safe_globals(_numpy_globals()):
                torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise UnsafeCheckpointError(f"{path}: object {index.fqn} holds objects a checkpoint never contains; "
                                        "refusing to unpickle it (it could run code)") from None
        except (RuntimeError, EOFError, ValueError, KeyError) as error:
            detail = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
            raise CorruptMetadataError(f"{path}: object {index.fqn} is not readable ({detail})") from None

