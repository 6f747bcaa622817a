"""Process-group setup, so that one-off tools (parity checks, conversion) work without a launcher.

Megatron modules need ``torch.distributed`` and ``parallel_state`` initialised even in a single
process.  Inside ``torchrun`` / Megatron-Bridge the caller owns that setup and we only read it;
in a plain Python process we create a world of one (an in-memory store: no port, no files).
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel as mtp

from flexolmo_plugin import compat
from flexolmo_plugin.model.layout import ParallelLayout

DEFAULT_SEED = 1234


def ensure_model_parallel(
    layout: ParallelLayout | None = None,
    *,
    seed: int = DEFAULT_SEED,
    timeout_minutes: float = 10.0,
) -> None:
    """Initialise torch.distributed (world of one if nothing is set up) and Megatron's groups for
    ``layout`` (default: no model parallelism).

    Existing initialisation is respected; requesting a layout that conflicts with an already
    initialised ``parallel_state`` is an error rather than a silent mismatch.
    """

    layout = layout or ParallelLayout()
    if not compat.cuda_available() and not compat.cpu_compat_enabled():
        raise RuntimeError("megatron-core needs CUDA; on a CPU-only machine call flexolmo_plugin.enable_cpu_compat() "
                           "first (the flexolmo command line, from_hf and from_mcore do)")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=compat.default_backend(),
            store=dist.HashStore(),
            rank=0,
            world_size=1,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    if ps.model_parallel_is_initialized():
        have = (ps.get_tensor_model_parallel_world_size(), ps.get_expert_model_parallel_world_size())
        want = (layout.tensor_parallel, layout.expert_parallel)
        if dist.get_world_size() == 1 and have != want:
            raise RuntimeError(f"parallel_state is already initialised with (TP, EP)={have}, not {want}")
    else:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=layout.tensor_parallel,
            expert_model_parallel_size=layout.expert_parallel,
            expert_tensor_parallel_size=layout.etp,
            pipeline_model_parallel_size=layout.pipeline_parallel,
            distributed_timeout_minutes=int(max(1, timeout_minutes)),
        )
    tracker = mtp.get_cuda_rng_tracker()
    if "model-parallel-rng" not in tracker.get_states():
        mtp.model_parallel_cuda_manual_seed(seed)


def teardown_model_parallel() -> None:
    """Undo :func:`ensure_model_parallel` (tests and tools that switch layouts)."""

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def device() -> torch.device:
    return compat.default_device()
