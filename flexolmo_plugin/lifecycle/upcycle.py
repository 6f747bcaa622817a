"""Upcycling: the public model becomes a data owner's 2-expert ``[public, domain]`` starting point.

Both experts start as copies of the public FFN and every layer's router gets the same two rows
``[r_pub; r_i]`` -- the domain embeddings (paper §3.3.2: mean embedding of ~1000 documents; the same
vector seeds every layer).  The public model may be an HF OLMo-2 dense checkpoint (FlexOlmo's public
model), an HF FlexOlmo or a converted Megatron FlexOlmo checkpoint; for the latter two its expert 0
(the public expert) is the FFN that gets copied.

Domain embeddings are files holding one float vector of the model's hidden size: ``.safetensors``
or ``.npy`` (the official repository's format, read with ``allow_pickle=False``); ``flexolmo
embed-domain`` writes either, in the format the output's suffix names.
"""

from __future__ import annotations

import io
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from flexolmo_plugin.conversion.atomic import atomic_directory, check_new_output, write_file_atomically
from flexolmo_plugin.conversion.checkpoint_dir import has_config, tokenizer_dir
from flexolmo_plugin.conversion.checks import all_finite, file_sha256
from flexolmo_plugin.conversion.checksums import checksums_payload, sidecar, verify_checksums
from flexolmo_plugin.conversion.convert import copy_tokenizer_files
from flexolmo_plugin.conversion.hf_layout import HFWeights
from flexolmo_plugin.conversion.mapping import Role, entries_by_name, expert_entry
from flexolmo_plugin.conversion.mcore_io import (
    CONFIG_FILE,
    CanonicalReader,
    load_config,
    save_config,
    write_checkpoint,
)
from flexolmo_plugin.conversion.olmo2 import Olmo2AsFlexOlmo, is_olmo2_config
from flexolmo_plugin.conversion.progress import ConversionReport, ProgressMeter
from flexolmo_plugin.conversion.safetensors_reader import (
    PICKLE_SUFFIXES,
    CheckpointFormatError,
    SafetensorsCheckpoint,
)
from flexolmo_plugin.errors import FlexOlmoError
from flexolmo_plugin.lifecycle.anchor import check_finite
from flexolmo_plugin.model.config import FlexOlmoConfig, check_expert_names  # noqa: F401 (re-exported)

EMBEDDING_KEY = "embedding"
# Initial learned router bias of an owner's expert (logit offset min(b, 0)); the paper leaves it
# unspecified.  0, not -1: in the full demo (seeds 0-2) a start at 0 composed at least as well as a start
# at -1 in every seed, both with the owner-side calibration (2-5 points of composition efficiency, 0.3-0.7
# points of public-text loss) and on the paper's path of LM router tuning without it (0-4 points, 0.3-0.5),
# because the bias hardly moves in training and the merged model's router step drops it
# (docs/composition.md, "The learned bias's starting value on the paper's path").
DEFAULT_ROUTER_BIAS_INIT = 0.0


class EmbeddingError(FlexOlmoError):
    """A domain-embedding file that is unreadable, unsafe, or does not fit the model."""


def load_embedding(path: str | os.PathLike, hidden_size: int | None = None) -> torch.Tensor:
    """A float32 ``[hidden]`` domain embedding from ``.safetensors`` or ``.npy`` (no pickle)."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise EmbeddingError(f"{path}: pickle files are refused (unpickling can execute code); "
                             "use .safetensors or .npy")
    if not path.is_file():
        raise EmbeddingError(f"{path}: no such file")
    verify_checksums(sidecar(path), what=f"embedding {path}", required=[path.name])
    if path.suffix == ".npy":
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic != b"\x93NUMPY":  # else numpy calls any other bytes "pickled data"
            hint = " (it holds safetensors data: rename it to .safetensors)" if _looks_like_safetensors(path) else ""
            raise EmbeddingError(f"{path}: not a .npy file (no NumPy header){hint}")
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as error:  # object arrays need pickle
            raise EmbeddingError(f"{path}: not a plain numeric .npy array ({error})") from error
        tensor = torch.from_numpy(np.asarray(array))
    elif path.suffix == ".safetensors":

        try:
            tensors = load_file(str(path))
        except Exception as error:
            raise EmbeddingError(f"{path}: unreadable safetensors file ({error})") from error
        if EMBEDDING_KEY in tensors:
            tensor = tensors[EMBEDDING_KEY]
        elif len(tensors) == 1:
            tensor = next(iter(tensors.values()))
        else:
            raise EmbeddingError(
                f"{path}: expected one tensor (or one named '{EMBEDDING_KEY}'), found {sorted(tensors)}"
            )
    else:
        raise EmbeddingError(f"{path}: unsupported embedding file type {path.suffix!r} (use .safetensors or .npy)")
    if tensor.dim() == 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 1 or not tensor.is_floating_point():
        raise EmbeddingError(f"{path}: expected a 1-D float vector, got {tensor.dtype} {list(tensor.shape)}")
    if hidden_size is not None and tensor.numel() != hidden_size:
        raise EmbeddingError(
            f"{path}: embedding width {tensor.numel()} does not match the model's hidden size "
            f"{hidden_size} (the embedder's width must equal the model's)"
        )
    if not all_finite(tensor):
        raise EmbeddingError(f"{path}: embedding contains NaN/Inf")
    return tensor.float().contiguous()


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header (``{``)."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


EMBEDDING_SUFFIXES = (".safetensors", ".npy")


def check_embedding_output(path: str | os.PathLike) -> Path:
    """Refuse an embedding output path before any work: its suffix must name a format that
    :func:`load_embedding` reads (the file is written in the format its suffix says -- safetensors
    bytes under a ``.npy`` name would later be refused as "pickled" data), and it must not exist."""
    path = Path(path)
    if path.suffix not in EMBEDDING_SUFFIXES:
        got = repr(path.suffix) if path.suffix else "a name without suffix"
        raise EmbeddingError(f"{path}: an embedding is written as .safetensors or .npy (the suffix chooses the "
                             f"format), not {got}")
    check_new_output(sidecar(path))  # a stale checksum file of a deleted embedding
    return check_new_output(path)


def save_embedding(path: str | os.PathLike, embedding: torch.Tensor, metadata: dict[str, str]) -> None:
    """Write the new file ``path`` in the format its suffix names: ``.safetensors`` (with
    ``metadata``) or ``.npy`` (a plain float32 array, which holds no metadata).  All or nothing and
    never over an existing file (a uniquely named temporary file linked into place), so two runs
    writing one path cannot leave one run's bytes under the other's report."""
    path = check_embedding_output(path)
    vector = embedding.detach().float().contiguous().cpu()
    if path.suffix == ".npy":
        buffer = io.BytesIO()
        np.save(buffer, vector.numpy(), allow_pickle=False)
        data = buffer.getvalue()
    else:
        data = save({EMBEDDING_KEY: vector}, metadata=metadata)
    write_file_atomically(path, data)
    write_file_atomically(sidecar(path), checksums_payload(path.parent, [path]))


class _PublicModel:
    """Canonical tensors of the public model (shared weights and its public FFN), any source format."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._checkpoint = None
        if has_config(directory):  # a Megatron checkpoint: ours, a training run's, or plain Bridge's
            self.config, self.dtype, _ = load_config(directory)
            reader = CanonicalReader(directory)
            self.read = reader.read
            self.kind = "megatron"
            return
        self._checkpoint = SafetensorsCheckpoint.open(directory)
        raw = self._checkpoint.config()
        if raw is None:
            raise CheckpointFormatError(f"{directory}: no config.json and no {CONFIG_FILE}: not a public model")
        if is_olmo2_config(raw):
            weights = Olmo2AsFlexOlmo(self._checkpoint, raw, num_experts=1)
            self.kind = "olmo2"
        elif raw.get("model_type") == "flex_olmo":
            weights = HFWeights(self._checkpoint, FlexOlmoConfig.from_hf(raw))
            self.kind = "flex_olmo"
        else:
            raise CheckpointFormatError(
                f"{directory}: model_type {raw.get('model_type')!r} is neither olmo2 nor "
                "flex_olmo; the public model must be one of them"
            )
        self.config = weights.config if self.kind == "olmo2" else FlexOlmoConfig.from_hf(raw)
        dtypes = {self._checkpoint.dtype(k) for k in self._checkpoint.keys()}
        self.dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        by_name = entries_by_name(self.config)
        self.read = lambda name: weights.canonical(by_name[name])

    def close(self) -> None:
        if self._checkpoint is not None:
            self._checkpoint.close()


def upcycle(
    public_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    public_embedding: str | os.PathLike,
    domain_embedding: str | os.PathLike,
    expert_names: tuple[str, str] = ("public", "domain"),
    dtype: torch.dtype | None = None,
    router_bias_init: float | None = DEFAULT_ROUTER_BIAS_INIT,
    progress: bool = False,
) -> ConversionReport:
    """Write the 2-expert ``[public, domain]`` Megatron checkpoint a data owner starts training from.

    ``router_bias_init``: initial value of the owner's learned router bias b (logit offset
    ``min(b, 0)`` of the owner's expert, paper §3.3.2); ``None`` builds a model without the bias.
    """
    start = time.perf_counter()
    public_dir = Path(public_dir)
    expert_names = check_expert_names(expert_names)
    check_new_output(out_dir, inputs=(public_dir,))
    public = _PublicModel(public_dir)
    try:
        if router_bias_init is not None and not (math.isfinite(router_bias_init) and router_bias_init <= 0):
            raise EmbeddingError(f"the initial router bias must be a finite value <= 0 (the bias is min(b, 0)), "
                                 f"got {router_bias_init}")
        config = public.config.replace(num_experts=2, top_k=2, expert_names=tuple(expert_names),
                                       router_bias=router_bias_init is not None)
        rows = torch.stack(
            [load_embedding(public_embedding, config.hidden_size), load_embedding(domain_embedding, config.hidden_size)]
        )
        out_dtype = dtype or public.dtype
        by_name = entries_by_name(config)

        def source(name: str) -> torch.Tensor:
            entry = by_name[name]
            if entry.rule.role is Role.ROUTER_ROW:
                return rows  # the same [r_pub; r_i] seeds every layer
            if entry.rule.role is Role.ROUTER_BIAS:
                return torch.full(entry.shape(config), float(router_bias_init), dtype=torch.float32)
            # Both experts start as the public FFN; like every tool that copies weights, refuse a non-finite one
            # (a Megatron public model's tensors are not checked on read; HF safetensors ones are).
            label = f"public model {public_dir}"
            if entry.rule.role is Role.EXPERT:
                return check_finite(public.read(expert_entry(entry, 0)), expert_entry(entry, 0), label)
            return check_finite(public.read(name), name, label)

        meter = ProgressMeter(0, progress, "upcycle")
        try:
            with atomic_directory(out_dir) as tmp:
                write_checkpoint(tmp, config, source, dtype=out_dtype, expected=set(by_name), on_tensor=meter)
                tokenizer_src = tokenizer_dir(public_dir) if public.kind == "megatron" else public_dir
                copied = copy_tokenizer_files(tokenizer_src, tmp / "tokenizer") if tokenizer_src else []
                save_config(
                    tmp,
                    config,
                    dtype=out_dtype,
                    extra={
                        "source": {"format": f"upcycled from {public.kind}", "path": str(public_dir.resolve())},
                        "domain_embedding_files": {
                            "public": {"path": str(public_embedding), "sha256": file_sha256(Path(public_embedding))},
                            expert_names[1]: {
                                "path": str(domain_embedding),
                                "sha256": file_sha256(Path(domain_embedding)),
                            },
                        },
                        "tokenizer_files": copied,
                    },
                )
        finally:
            meter.close()
    finally:
        public.close()
    return ConversionReport(meter.tensors, meter.bytes, time.perf_counter() - start, Path(out_dir))
