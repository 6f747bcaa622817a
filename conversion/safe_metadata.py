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
import os
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint import planner as dcp_planner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

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


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self._path = path

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
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise CorruptMetadataError(f"{path}: not a readable torch_dist metadata file ({error})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CorruptMetadataError(f"{path}: not a torch_dist metadata file (holds {type(metadata).__name__})")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()  # as torch's reader does for files from older writers
    return metadata


def verify_metadata(directory: str | os.PathLike) -> None:
    """Refuse the checkpoint unless its ``.metadata`` passes the allow-list and its ``common.pt`` (if
    any) loads with ``weights_only=True``.  Run before handing the directory to Megatron's or Bridge's
    own loaders: the first unpickles ``.metadata`` without an allow-list, and torch's refusal of a
    bad ``common.pt`` is a page of advice to turn the protection off."""
    read_metadata(directory)
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
