"""CPU compatibility for megatron-core: the only place in the project that touches ``torch.cuda``.

Megatron-Core assumes CUDA: it places buffers on ``torch.cuda.current_device()``, seeds CUDA RNG
state, creates side streams for the all-to-all dispatcher and synchronises before checkpoint writes.
Our CI machines have no GPU, yet we want the *real* Megatron modules, collectives (gloo) and
``dist_checkpointing`` under test.  :func:`enable_cpu_compat` redirects exactly those entry points
to CPU equivalents when -- and only when -- CUDA is unavailable; on a GPU machine it does nothing,
so production runs execute unmodified Megatron code.

Product modules must never call CUDA-only APIs themselves; everything CPU-specific lives here.
The shims were established by measurement (shared/research/feasibility.md, Appendix A) against
megatron-core 0.19.2, which is asserted below because two of them replace Megatron internals.
"""

from __future__ import annotations

import contextlib
import threading

import torch

SUPPORTED_MEGATRON_CORE = "0.19.2"

_lock = threading.Lock()
_enabled: set[str] = set()


class _NullEvent:
    """Stands in for ``torch.cuda.Event``: CPU work is synchronous, so every wait is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


class _NullStream:
    """Stands in for ``torch.cuda.Stream``; all instances are the same (synchronous) stream."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __eq__(self, other):
        return isinstance(other, _NullStream)

    def __hash__(self):
        return 0


_STREAM = _NullStream()


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _check_megatron_version() -> None:
    # Package metadata, not megatron.core.__version__ (which appends the git hash of the cwd).
    from importlib.metadata import version as package_version

    version = package_version("megatron-core")
    if version != SUPPORTED_MEGATRON_CORE:
        raise RuntimeError(
            f"flexolmo CPU compatibility was validated against megatron-core "
            f"{SUPPORTED_MEGATRON_CORE}, found {version}; re-validate the shims in "
            f"flexolmo_plugin/compat.py before using another version on CPU"
        )


def _move_to_host(tensor, as_numpy=False, record_stream=False):
    """CPU twin of moe_utils.maybe_move_tensor_to_cpu: gloo all-to-all wants host split sizes."""
    if torch.is_tensor(tensor):
        tensor = tensor.cpu()
        if as_numpy:
            tensor = tensor.numpy()
    return tensor


def _patch_forward_paths() -> None:
    # Buffers (RoPE inv_freq, router counters) and collective outputs are placed here.
    torch.cuda.current_device = lambda: torch.device("cpu")
    # The model-parallel RNG tracker snapshots/restores "CUDA" RNG state around dropout.
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)
    import megatron.core.tensor_parallel.random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # The all-to-all dispatcher overlaps work on side streams.
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullEvent
    torch.cuda.current_stream = lambda *a, **k: _STREAM
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    # dist_checkpointing synchronises before writing.
    torch.cuda.synchronize = lambda *a, **k: None
    # Expert-parallel all-to-all split sizes must be host lists for gloo.
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    moe_utils.maybe_move_tensor_to_cpu = _move_to_host
    token_dispatcher.maybe_move_tensor_to_cpu = _move_to_host


class _CudaDeviceToCpu(torch.overrides.TorchFunctionMode):
    """Rewrites literal ``device="cuda"`` factory arguments (optimizer and grad-buffer code)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if (isinstance(device, str) and device.startswith("cuda")) or (
            isinstance(device, torch.device) and device.type == "cuda"
        ):
            kwargs = dict(kwargs, device="cpu")
        return func(*args, **kwargs)


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """CPU version of Megatron's clip (the original asserts ``torch.cuda.FloatTensor`` grads)."""
    from megatron.core.optimizer import clip_grads

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [
        clip_grads.to_local_if_dtensor(getattr(p, attr)).detach()
        for p in parameters
        if getattr(p, attr, None) is not None
    ]
    coeff = max_norm / (total_norm + 1.0e-6)
    if isinstance(coeff, torch.Tensor):
        torch._foreach_mul_(grads, coeff.clamp_max(1.0))
    elif coeff < 1.0:
        torch._foreach_mul_(grads, coeff)


def _patch_training_paths() -> None:
    torch.Tensor.cuda = lambda self, *a, **k: self
    _CudaDeviceToCpu().__enter__()  # process-wide on purpose: optimizer code allocates on "cuda"
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as moptim

    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    moptim.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu


def enable_cpu_compat(*, training: bool = False) -> bool:
    """Make megatron-core runnable on a CPU-only machine; returns True if shims were applied.

    ``training=True`` additionally covers the optimizer / gradient-buffer paths.  Idempotent and
    per-process (spawned workers must call it again).  A no-op when CUDA is available.
    """
    if cuda_available():
        return False
    with _lock:
        if "forward" not in _enabled:
            _check_megatron_version()
            _patch_forward_paths()
            _enabled.add("forward")
        if training and "training" not in _enabled:
            _patch_training_paths()
            _enabled.add("training")
    return True


def default_device() -> torch.device:
    """Where model parameters and inputs should live in this process."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def default_backend() -> str:
    return "nccl" if cuda_available() else "gloo"
