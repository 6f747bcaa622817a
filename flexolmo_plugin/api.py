"""The documented entry points: build a FlexOlmo Megatron model from a Hugging Face directory."""

from __future__ import annotations

import os

import torch

from . import compat
from .config import FlexOlmoConfig
from .distributed import ensure_model_parallel
from .model import build_model
from .spec import Backend


def read_hf_config(hf_dir: str | os.PathLike, **overrides) -> FlexOlmoConfig:
    """The FlexOlmo configuration stored in ``hf_dir/config.json``."""
    from conversion.safetensors_reader import CheckpointFormatError, SafetensorsCheckpoint

    with SafetensorsCheckpoint.open(hf_dir) as checkpoint:
        raw = checkpoint.config()
    if raw is None:
        raise CheckpointFormatError(f"{hf_dir}: no config.json (needed to know the model's shape)")
    return FlexOlmoConfig.from_hf(raw, **overrides)


def from_hf(
    hf_dir: str | os.PathLike,
    *,
    params_dtype: torch.dtype = torch.float32,
    tensor_parallel: int = 1,
    expert_parallel: int = 1,
    expert_tensor_parallel: int | None = None,
    sequence_parallel: bool = False,
    backend: Backend = "local",
    **config_overrides,
):
    """A Megatron FlexOlmo ``GPTModel`` holding the weights of the HF checkpoint in ``hf_dir``.

    Uses the process groups already set up (``torchrun`` + ``parallel_state``); if
    ``torch.distributed`` is not initialised it creates a single-process group itself (gloo on a
    CPU machine), with the requested TP/EP sizes (1 by default).  The model is returned in eval
    mode on this process's device.  Training with TP>1 needs ``sequence_parallel=True`` (Megatron
    refuses MoE + TP without it, since experts would see every token once per TP rank).
    """
    from conversion.hf_import import load_hf_weights

    config = read_hf_config(hf_dir, **config_overrides)
    ensure_model_parallel(tensor_parallel=tensor_parallel, expert_parallel=expert_parallel,
                          expert_tensor_parallel=expert_tensor_parallel)
    model = build_model(config, params_dtype=params_dtype, sequence_parallel=sequence_parallel,
                        backend=backend)
    model.to(compat.default_device())
    load_hf_weights(model, hf_dir)
    model.eval()
    return model
