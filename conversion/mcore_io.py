"""Megatron ``torch_dist`` checkpoints of FlexOlmo, written and read one tensor at a time.

Writing: the *layout* of the checkpoint (keys, global shapes, how each tensor is chunked, the small
byte objects Megatron stores beside them) is taken from Megatron itself -- the ``sharded_state_dict``
of a FlexOlmo model built on the ``meta`` device, which costs no memory.  The *data* is produced
lazily: Megatron's save runs with :class:`StreamingSaveStrategy`, whose DCP planner asks a ``source``
for each chunk only when the writer reaches it, and writes one file per chunk (torch's writer keeps
every tensor of a file alive until the file is closed).  Peak memory is therefore a few tensors,
whatever the model size, and the result is an ordinary checkpoint that
``megatron.core.dist_checkpointing.load`` reads at any TP/EP layout.

Reading: each canonical tensor is loaded on its own through ``dist_checkpointing.load`` with the
matching part of the meta model's sharded state dict, so exports are bounded the same way.

Canonical names are those of :mod:`conversion.mapping` (global layer/expert indices, whole tensors).
The checkpoint key layout (layer axis, per-expert and per-row keys) is part of the mapping table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.planner import WriteItemType

from flexolmo_plugin.conversion.checkpoint_dir import (  # noqa: F401  (re-exported: the checkpoint API)
    CONFIG_FILE,
    FORMAT_VERSION,
    OPTIMIZER_PREFIX,
    PARAMETER_DTYPES,
    TRACKER_FILE,
    McoreCheckpointError,
    check_is_checkpoint,
    checkpoint_tensor_metadata,
    load_config,
    resolve_checkpoint,
    save_config,
)
from flexolmo_plugin.conversion.dcp_io import ChunkReader, PipelinedWriter, chunk_planner
from flexolmo_plugin.conversion.mapping import (
    canonical_chunk,
    canonical_parts,
    entries,
    layer_of,
    split_keys,
)
from flexolmo_plugin.conversion.safe_metadata import SafeFileSystemReader
from flexolmo_plugin.model.build import build_model
from flexolmo_plugin.model.config import FlexOlmoConfig
from flexolmo_plugin.model.parallel import ensure_model_parallel


# ---------------------------------------------------------------------- meta model = the layout
@contextlib.contextmanager
def meta_model(config: FlexOlmoConfig, dtype: torch.dtype):
    """A FlexOlmo model with no storage, for its checkpoint layout (needs TP=EP=1 groups)."""

    ensure_model_parallel()
    with torch.device("meta"):
        model = build_model(config, params_dtype=dtype, perform_initialization=False)  # no storage to fill
    yield model


# ---------------------------------------------------------------------- streaming save
Source = Callable[[str], torch.Tensor]


def _streaming_classes():


    class LazyChunkPlanner(MCoreSavePlanner):
        """Materialises each chunk from the source when the writer asks for it."""

        def __init__(self, owner, **kwargs):
            super().__init__(**kwargs)
            self.owner = owner

        def create_local_plan(self):
            """Megatron's plan, reordered layer by layer with all chunks of one canonical tensor
            adjacent: the writer then builds each canonical tensor once, holding one at a time, and
            sources read their files roughly in order (one layer's fused experts at a time)."""
            plan = super().create_local_plan()
            order: dict[str, int] = {}

            def rank(item):
                if item.type == WriteItemType.BYTE_IO:
                    return (-2, -1)
                name = self.owner.canonical_of(item)
                layer = layer_of(name)
                return (-1 if layer is None else layer, order.setdefault(name, len(order)))

            items = sorted(plan.items, key=rank)  # stable: chunks keep their relative order
            self.plan = dataclasses.replace(plan, items=items)
            return self.plan

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            return self.owner.chunk(write_item)

    class StreamingSaveStrategy(TorchDistSaveShardedStrategy):
        """Megatron's torch_dist save, synchronous, with data pulled lazily from ``source``."""

        def __init__(self, source: Source, dtype: torch.dtype, on_tensor: Callable[[str, int], None] | None = None):
            super().__init__("torch_dist", 1)
            self.source, self.dtype, self.on_tensor = source, dtype, on_tensor
            self.prepend: dict[str, int] = {}
            self._cached: tuple[str, torch.Tensor] | None = None
            self.canonical_done: set[str] = set()
            self.chunks_written = 0

        def _canonical(self, name: str) -> torch.Tensor:
            if self._cached is None or self._cached[0] != name:
                if name in self.canonical_done:
                    raise McoreCheckpointError(f"{name} requested again after it was written (unordered plan)")
                if self._cached is not None:
                    self.canonical_done.add(self._cached[0])
                tensor = self.source(name)
                self._cached = (name, tensor.to(self.dtype))
                if self.on_tensor:
                    self.on_tensor(name, tensor.numel() * tensor.element_size())
            return self._cached[1]

        def _locate(self, write_item):
            key = write_item.index.fqn
            chunk = write_item.tensor_data.chunk
            return canonical_chunk(key, self.prepend[key], chunk.offsets, chunk.sizes, write_item.tensor_data.size)

        def canonical_of(self, write_item) -> str:
            return self._locate(write_item)[0]

        def chunk(self, write_item) -> torch.Tensor:
            chunk = write_item.tensor_data.chunk
            name, index = self._locate(write_item)
            data = self._canonical(name)[index].reshape(tuple(chunk.sizes)).contiguous()
            self.chunks_written += 1
            return data

        def save(self, sharded_state_dict, checkpoint_dir):
            self.prepend = {
                t.key: t.prepend_axis_num for t in nested_values(sharded_state_dict) if isinstance(t, ShardedTensor)
            }
            state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            # Chunks are produced on this thread while another writes them (bounded bytes in flight).
            dcp_save(
                mcore_to_pyt_state_dict(state, False),
                storage_writer=PipelinedWriter(checkpoint_dir),
                planner=LazyChunkPlanner(
                    self, dedup_replicated_tensors=False, flatten_state_dict=False, flatten_sharded_tensors=False
                ),
            )
            if self._cached is not None:
                self.canonical_done.add(self._cached[0])
                self._cached = None

    return StreamingSaveStrategy


@contextlib.contextmanager
def _unwrapped_checkpoint_errors():
    """DCP wraps exceptions raised while writing; re-raise our own validation errors as they are,
    so that users see which tensor was bad rather than a writer traceback."""

    try:
        yield
    except CheckpointException as error:
        for failure in error.failures.values():
            original = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(original, ValueError):
                raise original from None
        raise


def write_checkpoint(
    directory: Path,
    config: FlexOlmoConfig,
    source: Source,
    *,
    dtype: torch.dtype,
    expected: set[str],
    on_tensor: Callable[[str, int], None] | None = None,
) -> int:
    """Write a torch_dist checkpoint into the existing empty ``directory``; returns chunks written.

    ``expected`` is the set of canonical names the source provides; the save must consume exactly
    that set (the audit that no tensor is dropped or invented).  ``dtype`` must be one every reader takes
    (:data:`PARAMETER_DTYPES`): a float64 source converted as is would make a checkpoint nothing can load.
    """
    if dtype not in PARAMETER_DTYPES:
        raise McoreCheckpointError(
            f"cannot write {str(dtype).removeprefix('torch.')} parameters: a checkpoint holds "
            f"{', '.join(str(d).removeprefix('torch.') for d in PARAMETER_DTYPES)}; choose one with --dtype")
    strategy = _streaming_classes()(source, dtype, on_tensor)
    with meta_model(config, dtype) as model, _unwrapped_checkpoint_errors():
        dist_checkpointing.save(
            model.sharded_state_dict(), str(directory), sharded_strategy=strategy, async_sharded_save=False
        )
    done = strategy.canonical_done
    if done != expected:
        raise McoreCheckpointError(
            f"checkpoint audit failed: not written {sorted(expected - done)[:5]}, "
            f"unexpected {sorted(done - expected)[:5]}"
        )
    return strategy.chunks_written


# ---------------------------------------------------------------------- per-tensor reading
class CanonicalReader:
    """Random access to whole canonical tensors of a torch_dist checkpoint saved at any TP/EP
    layout (global tensors do not depend on the layout they were saved from).  Each read loads
    one chunk of one key: memory holds one tensor."""

    def __init__(self, directory: str | os.PathLike):

        self.directory = resolve_checkpoint(directory)
        check_is_checkpoint(self.directory)
        self.present = checkpoint_tensor_metadata(self.directory)
        check_accounted_for(Path(directory), self.present, load_config(directory)[0])
        self._reader = SafeFileSystemReader(self.directory)
        self._chunks = ChunkReader(self.directory, self._reader.read_metadata())

    def _read_key_into(self, key: str, prefix: tuple[int, ...], out: torch.Tensor) -> None:
        """Read layer ``prefix`` of ``key`` into ``out``: straight from the file when the chunk is
        a plain record (one copy), else through ``dcp.load``.  A data file that cannot be read
        (truncated or damaged: torch raises EOFError, a zip error or its CheckpointException) is
        named; the checksums normally catch this first, but a checkpoint from another tool has none."""
        shape = self.present[key][0]
        view = out.view((1,) * len(prefix) + shape[len(prefix) :])
        offsets = prefix + (0,) * (len(shape) - len(prefix))
        try:
            if not self._chunks.read_into(key, offsets, view):
                dcp_load({key: view}, storage_reader=self._reader, planner=chunk_planner({key: (offsets, view)}),
                         no_dist=True)
        except (EOFError, RuntimeError, ValueError, zipfile.BadZipFile, CheckpointException) as error:
            detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise McoreCheckpointError(f"{self.directory}: tensor {key} cannot be read ({detail}); a data file is "
                                       "truncated or damaged") from None

    def read(self, name: str) -> torch.Tensor:
        """The whole canonical tensor; split keys (gate / up halves, router rows) are read straight
        into their place in it, never concatenated afterwards."""
        parts = canonical_parts(name, self.present)
        missing = [key for key, _, _ in parts if key not in self.present]
        if missing or not parts:
            raise McoreCheckpointError(
                f"{self.directory}: no tensor {missing[0] if missing else name} (needed for {name})"
            )
        shapes = [self.present[key][0][len(prefix) :] for key, prefix, _ in parts]
        places = [place for _, _, place in parts]
        dtype = self.present[parts[0][0]][1]
        if places == ["w", "v"]:
            out = torch.empty((shapes[0][0] + shapes[1][0], *shapes[0][1:]), dtype=dtype)
            targets = [out[: shapes[0][0]], out[shapes[0][0] :]]
        elif places == [None]:
            out = torch.empty(shapes[0], dtype=dtype)
            targets = [out]
        else:
            if len(set(shapes)) != 1:
                raise McoreCheckpointError(f"{self.directory}: the rows of {name} have different shapes")
            out = torch.empty((len(parts), *shapes[0]), dtype=dtype)
            targets = list(out)
        for (key, prefix, _), target in zip(parts, targets):
            self._read_key_into(key, prefix, target)
        return out


def iter_canonical(directory: str | os.PathLike, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(canonical name, whole tensor)`` one at a time, in the order given."""
    reader = CanonicalReader(directory)
    for name in names:
        yield name, reader.read(name)


def check_accounted_for(directory: Path, present: dict, config: FlexOlmoConfig) -> None:
    """Every model tensor stored is one ``config`` (the checkpoint's own) describes, optimizer state aside:
    a config that names fewer experts than the checkpoint holds, or no router bias where one is stored,
    would otherwise drop those tensors without a word (an expert gone from a merge, routing changed in an
    export).  Global: the same at every TP/EP layout a model is loaded at."""
    used = set()
    for entry in entries(config):
        used |= {key for key, _, _ in canonical_parts(entry.megatron, present)}
    extra = sorted(key for key in present if key not in used and not key.startswith(OPTIMIZER_PREFIX))
    if extra:
        raise McoreCheckpointError(
            f"{directory}: checkpoint holds tensors its configuration does not describe ({len(extra)}: "
            f"{', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}); its flexolmo_config.json does not match it")


def check_canonical_shapes(directory: Path, expected: dict[str, tuple[int, ...]],
                           config: FlexOlmoConfig | None = None) -> None:
    """Every canonical tensor can be assembled from the checkpoint with the expected shape (and, given the
    checkpoint's ``config``, every tensor stored is one it describes), checked before any output is begun."""
    present = checkpoint_tensor_metadata(directory)
    if config is not None:
        check_accounted_for(directory, present, config)
    problems = []
    for name, shape in expected.items():
        parts = canonical_parts(name, present)
        missing = [key for key, _, _ in parts if key not in present]
        if missing or not parts:
            problems.append(f"missing {missing[0] if missing else name}")
            continue
        pieces = []
        for key, prefix, place in parts:
            stored = present[key][0]
            if len(stored) <= len(prefix) or any(i >= n for i, n in zip(prefix, stored)):
                problems.append(f"{key} has shape {list(stored)}, cannot hold layer {prefix}")
                break
            pieces.append((tuple(stored[len(prefix) :]), place))
        else:
            places = [p for _, p in pieces]
            if places == [None]:
                got = pieces[0][0]
            elif places == ["w", "v"]:
                got = (pieces[0][0][0] + pieces[1][0][0], *pieces[0][0][1:])
            else:
                got = (len(pieces), *pieces[0][0]) if len({s for s, _ in pieces}) == 1 else None
            if got != tuple(shape):
                problems.append(
                    f"{name} assembles to {list(got) if got else 'mismatched rows'}, "
                    f"the configuration implies {list(shape)}"
                )
    if problems:
        raise McoreCheckpointError(
            f"{directory}: checkpoint does not match its configuration: " + "; ".join(sorted(set(problems))[:8])
        )


def validate_model_layout(directory: Path, sharded) -> None:
    """Every tensor key the model expects is in the checkpoint with the same global shape, and every one
    stored is described by the checkpoint's configuration (:func:`check_accounted_for`)."""

    present = checkpoint_tensor_metadata(directory)
    check_accounted_for(directory, present, load_config(directory)[0])
    problems = []
    for item in nested_values(sharded):
        if isinstance(item, ShardedTensorFactory):  # a gated fc1: stored whole or as gate/up halves
            if item.key not in present and not set(split_keys(item.key)) <= set(present):
                problems.append(f"missing {item.key}")
            continue  # its global shape is known only once built; Megatron checks it on load
        if isinstance(item, ShardedTensor):
            if item.key not in present:
                problems.append(f"missing {item.key}")
            elif present[item.key][0] != tuple(item.global_shape):
                problems.append(
                    f"{item.key} has shape {list(present[item.key][0])}, "
                    f"the configuration implies {list(item.global_shape)}"
                )
    if problems:
        raise McoreCheckpointError(
            f"{directory}: checkpoint does not match its configuration: " + "; ".join(sorted(set(problems))[:8])
        )


def load_model_weights(model, directory: str | os.PathLike) -> None:
    """Load a FlexOlmo checkpoint (converted, or a Bridge save dir / ``iter_*``) into ``model``.
    Megatron's load also returns the *common* state (Bridge keeps iteration, scheduler and optimizer
    settings there): only the model's own keys are kept, and all must be present (strict load)."""

    directory = Path(directory)
    check_is_checkpoint(directory)
    sharded = model.sharded_state_dict()
    validate_model_layout(directory, sharded)
    try:
        state = dist_checkpointing.load(sharded, str(resolve_checkpoint(directory)))
    except (Exception, CheckpointException) as error:  # Megatron raises several types (torch's is a
        # BaseException: a truncated data file in a checkpoint without checksums); say which checkpoint and why
        lines = [line for line in str(error).splitlines() if line.strip()]  # torch's: a traceback per rank
        detail = lines[-1][:300] if lines else type(error).__name__
        raise McoreCheckpointError(f"{directory}: loading failed: {detail}") from error
    model.load_state_dict({key: value for key, value in state.items() if key in sharded})
