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
:func:`enable_bridge_compat` (end of file) does the same for Megatron-Bridge 0.6.2's training loop.

Nothing is applied at import: only the entry points call these functions (the ``flexolmo`` CLI,
the demo, the test suite, and ``from_hf`` / ``from_mcore`` / ``save_mcore``), each applied once per
process and logged once.  :func:`cpu_model_settings` is the one place that says which model
settings differ on a CPU-only machine.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import torch

logger = logging.getLogger("flexolmo_plugin")

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


def device_capability() -> tuple[int, int] | None:
    """The local GPU's compute capability (FP8 recipe checks), or None without CUDA."""
    return tuple(torch.cuda.get_device_capability()) if cuda_available() else None


def device_name() -> str | None:
    """The local GPU's name (peak-FLOPs lookup for MFU), or None without CUDA."""
    return torch.cuda.get_device_name() if cuda_available() else None


def cuda_build_version() -> str | None:
    """The CUDA version PyTorch was built against (whose cuBLAS it loads); None for a CPU-only build."""
    return torch.version.cuda


# Megatron model settings a CPU run needs: parameters created on the CPU, and every fused kernel off
# (none of them exists without CUDA).
CPU_MODEL_SETTINGS = dict(use_cpu_initialization=True, gradient_accumulation_fusion=False, masked_softmax_fusion=False,
                          bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
                          persist_layer_norm=False, cross_entropy_loss_fusion=False)


def cpu_model_settings() -> dict:
    """:data:`CPU_MODEL_SETTINGS` on a machine without CUDA; {} where CUDA exists, so that Megatron's
    and Bridge's own defaults apply there."""
    return {} if cuda_available() else dict(CPU_MODEL_SETTINGS)


def cpu_compat_enabled() -> bool:
    return "forward" in _enabled


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
    """Make megatron-core runnable on a CPU-only machine (a no-op when CUDA is available).

    Idempotent and per-process (spawned workers must call it again); logged once.

    Args:
        training: also cover the optimizer / gradient-buffer / gradient-clipping paths.

    Returns:
        True if the shims are active in this process (no CUDA), False otherwise.
    """
    if cuda_available():
        return False
    with _lock:
        if "forward" not in _enabled:
            _check_megatron_version()
            _patch_forward_paths()
            _enabled.add("forward")
            logger.info("no CUDA: megatron-core %s runs on the CPU with flexolmo's compatibility shims "
                        "(flexolmo_plugin.compat)", SUPPORTED_MEGATRON_CORE)
        if training and "training" not in _enabled:
            _patch_training_paths()
            _enabled.add("training")
            logger.info("no CUDA: optimizer and gradient-clipping paths patched for the CPU")
    return True


def default_device() -> torch.device:
    """Where model parameters and inputs should live in this process."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def default_backend() -> str:
    return "nccl" if cuda_available() else "gloo"


# ====================================================================== Megatron-Bridge
# Megatron-Bridge is installed ``--no-deps``: its declared closure (Transformer Engine,
# nvidia-resiliency-ext, flashinfer, ...) cannot be built on CPU, yet two of those packages are
# imported unconditionally at module level, and its training loop refuses to start without CUDA.
# Measured against exactly megatron-bridge 0.6.2 + megatron-core 0.19.2
# (shared/research/bridge_cpu.md); each patch applies only where what it replaces is missing.

SUPPORTED_MEGATRON_BRIDGE = "0.6.2"  # the release every shim below was validated against
# Where no shim is needed (a GPU machine with Transformer Engine, e.g. an NGC container), releases
# in this range are accepted: the provider and recipes use only Bridge's public configuration API.
TESTED_MEGATRON_BRIDGE_RANGE = (">=0.6.2", "<0.7")


class _AbsentTransformerEngineClass:
    """Placeholder TE class: ``isinstance(x, te.Linear)`` is False and constructing one fails."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("transformer_engine is not installed (flexolmo import-time stand-in)")


def _transformer_engine_stub() -> dict:
    """I1: ``lora_layers`` uses ``te`` only in annotations/isinstance until LoRA is built."""
    import types

    te, pytorch = types.ModuleType("transformer_engine"), types.ModuleType("transformer_engine.pytorch")
    te.__path__, pytorch.__path__, te.pytorch = [], [], pytorch
    absent = {name: type(name, (_AbsentTransformerEngineClass,), {}) for name in (
        "Sequential", "Linear", "LayerNorm", "RMSNorm", "Quantize", "MakeExtraOutput", "Dropout",
        "ConstantScale", "AddExtraInput", "LayerNormLinear")}
    pytorch.ops = types.SimpleNamespace(**absent)
    pytorch.Linear, pytorch.LayerNormLinear = absent["Linear"], absent["LayerNormLinear"]
    pytorch.fp8_autocast = lambda *a, **k: contextlib.nullcontext()
    return {"transformer_engine": te, "transformer_engine.pytorch": pytorch}


def _resiliency_inprocess_stub() -> dict:
    """I2: ``pretrain`` imports ``nvidia_resiliency_ext.inprocess.CallWrapper`` for an annotation."""
    import types

    package, inprocess = (types.ModuleType("nvidia_resiliency_ext"),
                          types.ModuleType("nvidia_resiliency_ext.inprocess"))
    package.__path__ = []  # any other nvidia_resiliency_ext.* import still fails: features stay off
    package.__version__ = "0.0.0"  # below megatron-core's minimum, should anything compare it
    package.inprocess = inprocess
    inprocess.CallWrapper = type("CallWrapper", (), {"iteration": 0})
    return {"nvidia_resiliency_ext": package, "nvidia_resiliency_ext.inprocess": inprocess}


_STUBS = {  # module that needs a stand-in -> (stand-in factory, package it stands in for)
    "megatron.bridge.peft.lora_layers": ("I1", _transformer_engine_stub, "transformer_engine"),
    "megatron.bridge.training.pretrain": ("I2", _resiliency_inprocess_stub, "nvidia_resiliency_ext"),
}


def _preimport_dependencies(name: str, source: str, stubbed: str) -> None:
    """Import ``name``'s module-level imports (other than the stubbed package) beforehand.

    Then, while the stand-in is in ``sys.modules``, only the target's own body runs: no other
    module is imported for the first time in that window, so none can see the stand-in (and flip
    a ``HAVE_TE``-style flag).  This is checked after the fact in ``_StubbingLoader``.
    """
    import ast
    import importlib
    import importlib.util

    for node in ast.parse(source).body:
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            relative = "." * node.level + (node.module or "")
            modules = [importlib.util.resolve_name(relative, name.rpartition(".")[0])]
        else:
            continue
        for module in modules:
            if module.split(".")[0] != stubbed:
                try:
                    importlib.import_module(module)
                except ImportError:
                    pass  # the real execution reports it


class _StubbingLoader:
    """Wraps one module's real loader: the stand-in exists only while that module executes."""

    def __init__(self, real, factory, stubbed: str):
        self.real, self.factory, self.stubbed = real, factory, stubbed

    def __getattr__(self, attribute):  # get_source, get_code, ... of the real loader
        return getattr(self.real, attribute)

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):
        import sys

        _preimport_dependencies(module.__name__, self.real.get_source(module.__name__), self.stubbed)
        stubs = {k: v for k, v in self.factory().items() if k not in sys.modules}
        before = set(sys.modules)
        sys.modules.update(stubs)
        try:
            self.real.exec_module(module)
        finally:
            for key in stubs:
                sys.modules.pop(key, None)
        if leaked := sorted(set(sys.modules) - before):  # they may have kept the stand-in
            raise RuntimeError(f"{leaked} were first imported while {module.__name__} ran with a "
                               "stand-in for a missing package; re-validate flexolmo_plugin/compat.py")


class _ScopedStubFinder:
    """``sys.meta_path`` hook that hands :class:`_StubbingLoader` to the modules in ``_STUBS``."""

    def __init__(self, targets: dict):
        self.targets = targets

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.targets:
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            _, factory, stubbed = self.targets[fullname]
            spec.loader = _StubbingLoader(spec.loader, factory, stubbed)
        return spec


def _bridge_version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("megatron-bridge")
    except PackageNotFoundError:
        return "nothing"


def _check_bridge_version(shimmed: bool) -> None:
    """Exactly the validated release where a shim replaces Bridge internals; else the tested range."""
    version = _bridge_version()
    if shimmed:
        if version != SUPPORTED_MEGATRON_BRIDGE:
            raise RuntimeError(
                f"flexolmo's Megatron-Bridge patches (needed here: no CUDA or no Transformer Engine) were "
                f"validated against megatron-bridge {SUPPORTED_MEGATRON_BRIDGE}, found {version}; install "
                f"requirements/lock-cpu.txt or re-validate enable_bridge_compat in flexolmo_plugin/compat.py")
        return
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    tested = SpecifierSet(",".join(TESTED_MEGATRON_BRIDGE_RANGE))
    try:
        accepted = Version(version) in tested
    except InvalidVersion:
        accepted = False
    if not accepted:
        raise RuntimeError(f"megatron-bridge {version} is outside the range flexolmo is tested with "
                           f"({tested}); install a release in that range")


def _patch_initialize_megatron() -> None:
    """B1: ``setup()`` calls ``initialize_megatron`` without ``allow_no_cuda``, and with
    ``device_count() == 0`` bridge's ``_set_random_seed`` skips the model-parallel RNG seeding
    that every forward needs; it is done here exactly as that function would."""
    import functools

    import megatron.bridge.training.initialize as binit
    import megatron.bridge.training.setup as bsetup
    import torch.distributed as dist
    from megatron.core import tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.utils import get_pg_rank

    original = binit.initialize_megatron

    @functools.wraps(original)
    def initialize_megatron(cfg, *args, **kwargs):
        kwargs["allow_no_cuda"] = True
        groups = original(cfg, *args, **kwargs)
        if isinstance(groups, ProcessGroupCollection):  # not with lazy (externally finished) init
            rank = dist.get_rank()
            seed = cfg.rng.seed + 100 * dist.get_group_rank(groups.pp, rank)
            if cfg.rng.data_parallel_random_init:
                seed += 10 * dist.get_group_rank(groups.dp, rank)
            tensor_parallel.model_parallel_cuda_manual_seed(
                seed, cfg.rng.te_rng_tracker, cfg.rng.inference_rng_tracker,
                cfg.model.cuda_graph_impl != "none", tp_rank=get_pg_rank(groups.tp),
                ep_rank=get_pg_rank(groups.ep), etp_rank=get_pg_rank(groups.expt_tp))
        return groups

    binit.initialize_megatron = bsetup.initialize_megatron = initialize_megatron


def _patch_compile_helpers() -> bool:
    """B2: the megatron-core wheel ships the built ``helpers_cpp`` but no Makefile, and bridge
    runs ``make`` there on local rank 0 and exits when it fails.  Not CPU-specific; skipped where a
    Makefile exists (source checkouts, NGC containers) or the prebuilt module does not import."""
    import os

    import megatron.bridge.training.initialize as binit
    import megatron.core.datasets as mdatasets

    if os.path.exists(os.path.join(os.path.dirname(mdatasets.__file__), "Makefile")):
        return False
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        return False
    binit.compile_helpers = lambda: None
    return True


def enable_bridge_compat() -> frozenset[str]:
    """Make Megatron-Bridge 0.6.2's training entry points importable and runnable here.

    Call before importing ``megatron.bridge`` (and in every spawned worker).  Applies
    :func:`enable_cpu_compat` ``(training=True)`` (``"cpu"``) and, each only where needed:
    ``I1`` a Transformer Engine stand-in visible only while ``megatron.bridge.peft.lora_layers``
    executes (TE absent); ``I2`` ``nvidia_resiliency_ext.inprocess.CallWrapper`` visible only
    while ``megatron.bridge.training.pretrain`` executes (nvrx absent); ``B1`` CUDA-free
    ``initialize_megatron`` (no CUDA); ``B2`` no-op ``compile_helpers`` (prebuilt helpers, no
    Makefile).  Where a CUDA or stand-in shim applies, megatron-bridge must be exactly 0.6.2;
    elsewhere any release in ``TESTED_MEGATRON_BRIDGE_RANGE``.  Idempotent; returns the names of
    the patches active in this process.
    """
    import importlib.util
    import sys

    missing = {target: entry for target, entry in _STUBS.items()
               if importlib.util.find_spec(entry[2]) is None and target not in sys.modules}
    _check_bridge_version(shimmed=not cuda_available() or bool(missing))
    cpu = enable_cpu_compat(training=True)
    with _lock:
        if cpu:
            _enabled.add("cpu")
        if "stubs-checked" not in _enabled:
            _enabled.add("stubs-checked")
            if missing:
                sys.meta_path.insert(0, _ScopedStubFinder(missing))
                _enabled.update(entry[0] for entry in missing.values())
                logger.info("Megatron-Bridge: import-time stand-ins for %s", sorted(e[2] for e in missing.values()))
        if not cuda_available() and "B1" not in _enabled:
            _patch_initialize_megatron()
            _enabled.add("B1")
        if "B2-checked" not in _enabled:
            _enabled.add("B2-checked")
            if _patch_compile_helpers():
                _enabled.add("B2")
        return frozenset(_enabled & {"cpu", "I1", "I2", "B1", "B2"})
