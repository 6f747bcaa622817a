"""The documented entry points: build a FlexOlmo Megatron model from a Hugging Face directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from flexolmo_plugin import compat
from flexolmo_plugin.conversion.atomic import check_new_output, move_into_place, temporary_name
from flexolmo_plugin.conversion.checksums import write_directory_checksums
from flexolmo_plugin.conversion.convert import carry_checkpoint_files
from flexolmo_plugin.conversion.hf_import import load_hf_weights
from flexolmo_plugin.conversion.mcore_io import load_config, load_model_weights, save_config
from flexolmo_plugin.conversion.safetensors_reader import CheckpointFormatError, SafetensorsCheckpoint
from flexolmo_plugin.model.build import build_model, unwrap
from flexolmo_plugin.model.config import FlexOlmoConfig
from flexolmo_plugin.model.layout import ParallelLayout
from flexolmo_plugin.model.parallel import ensure_model_parallel
from flexolmo_plugin.model.spec import Backend


def read_hf_config(hf_dir: str | os.PathLike, **overrides) -> FlexOlmoConfig:
    """The FlexOlmo configuration stored in ``hf_dir/config.json``."""

    with SafetensorsCheckpoint.open(hf_dir) as checkpoint:
        raw = checkpoint.config()
    if raw is None:
        raise CheckpointFormatError(f"{hf_dir}: no config.json (needed to know the model's shape)")
    return FlexOlmoConfig.from_hf(raw, **overrides)


def _ready(layout: ParallelLayout | None) -> ParallelLayout:
    """CPU compatibility where CUDA is absent (documented: these functions are entry points), then
    the process groups for ``layout``."""
    layout = layout or ParallelLayout()
    compat.enable_cpu_compat()
    ensure_model_parallel(layout)
    return layout


def from_hf(
    hf_dir: str | os.PathLike,
    *,
    layout: ParallelLayout | None = None,
    params_dtype: torch.dtype = torch.float32,
    backend: Backend = "local",
    dispatcher: str = "alltoall",
    **config_overrides,
):
    """A Megatron FlexOlmo ``GPTModel`` holding the weights of the HF checkpoint in ``hf_dir``.

    Uses the process groups already set up (``torchrun`` + ``parallel_state``); if
    ``torch.distributed`` is not initialised it creates a single-process group itself (gloo on a
    CPU machine), with the requested ``layout`` (no model parallelism by default).  On a machine
    without CUDA it first applies :func:`flexolmo_plugin.compat.enable_cpu_compat` (logged once).
    The model is returned in eval mode on this process's device.  Training with TP>1 needs
    ``ParallelLayout(sequence_parallel=True)`` (Megatron refuses MoE + TP without it, since experts
    would see every token once per TP rank).

    Args:
        hf_dir: directory with ``config.json`` and safetensors of an HF ``flex_olmo`` model.
        layout: tensor / expert parallelism (the current process groups must match it).
        params_dtype: parameter dtype of the Megatron model.
        backend: ``"local"`` (Megatron-Core modules, runs on CPU), ``"te"`` or ``"auto"``.
        dispatcher: Megatron's token dispatcher (``"allgather"`` lets a run-time opt-out shrink top-k).
        **config_overrides: :class:`FlexOlmoConfig` fields to change (e.g. ``top_k``).

    Returns:
        A Megatron-Core ``GPTModel`` with ``model.flexolmo_config`` attached.
    """

    config = read_hf_config(hf_dir, **config_overrides)
    layout = _ready(layout)
    model = build_model(config, params_dtype=params_dtype, sequence_parallel=layout.sequence_parallel,
                        backend=backend, dispatcher=dispatcher)
    model.to(compat.default_device())
    load_hf_weights(model, hf_dir)
    model.eval()
    return model


def from_mcore(
    mcore_dir: str | os.PathLike,
    *,
    layout: ParallelLayout | None = None,
    params_dtype: torch.dtype | None = None,
    backend: Backend = "local",
    dispatcher: str = "alltoall",
):
    """A FlexOlmo ``GPTModel`` from a checkpoint written by ``flexolmo convert hf-to-mcore``,
    :func:`save_mcore`, ``flexolmo merge`` / ``opt-out`` / ``upcycle`` or ``flexolmo train`` (a Bridge
    save directory means its latest complete ``iter_*``), at any TP/EP layout; no other input is needed.

    Args:
        mcore_dir: the checkpoint directory (``flexolmo_config.json`` beside it or in the save dir).
        layout: tensor / expert parallelism; process groups are handled as in :func:`from_hf`.
        params_dtype: parameter dtype; ``None`` keeps the checkpoint's.
        backend: ``"local"``, ``"te"`` or ``"auto"`` (as in :func:`from_hf`).
        dispatcher: Megatron's token dispatcher (as in :func:`from_hf`).

    Returns:
        The model in eval mode, with ``model.flexolmo_config``.

    Raises:
        McoreCheckpointError: the directory is not a FlexOlmo checkpoint or does not match its config.
    """

    config, stored_dtype, _ = load_config(mcore_dir)
    layout = _ready(layout)
    model = build_model(config, params_dtype=params_dtype or stored_dtype, sequence_parallel=layout.sequence_parallel,
                        backend=backend, dispatcher=dispatcher)
    model.to(compat.default_device())
    load_model_weights(model, mcore_dir)
    model.eval()
    return model


def save_mcore(model, mcore_dir: str | os.PathLike, *, carry_from: str | os.PathLike | None = None) -> None:
    """Save a FlexOlmo model as a torch_dist checkpoint plus its configuration, atomically.

    Args:
        model: a FlexOlmo model at any TP/EP layout (wrappers such as DDP are unwrapped); every rank
            must call this (it is collective).
        mcore_dir: a path that does not exist yet; the directory appears only when complete.
        carry_from: the checkpoint the model was read from, whose tokenizer and provenance record the
            new one keeps (``flexolmo calibrate-router``, ``align-router``, ``scale-router``).

    Raises:
        FileExistsError: ``mcore_dir`` exists (nothing is written).
    """
    compat.enable_cpu_compat()
    inner = unwrap(model)
    final = Path(mcore_dir)
    rank0 = dist.get_rank() == 0
    decision = [None, None]  # [temporary directory, refusal]
    if rank0:
        try:
            check_new_output(final, inputs=() if carry_from is None else (carry_from,))
            tmp = temporary_name(final)
            tmp.mkdir()
            decision = [str(tmp), None]
        except Exception as error:  # every rank must stop, not only rank 0
            decision = [None, f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(decision, src=0)
    if decision[1]:
        raise FileExistsError(f"save_mcore refused: {decision[1]}")
    tmp = Path(decision[0])
    try:
        dist_checkpointing.save(inner.sharded_state_dict(), str(tmp), async_sharded_save=False)
        dist.barrier()
        if rank0:
            save_config(tmp, inner.flexolmo_config, dtype=inner.config.params_dtype,
                        extra={"source": {"format": "megatron"}})
            if carry_from is not None:
                carry_checkpoint_files(carry_from, tmp)
            write_directory_checksums(tmp)
            move_into_place(tmp, final)  # never replaces a directory that appeared meanwhile
        dist.barrier()
    except BaseException:
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
