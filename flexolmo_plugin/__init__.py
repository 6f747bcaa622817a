"""FlexOlmo (Shi et al., 2025) on NVIDIA Megatron-Core.

Public API (imported lazily so that ``import flexolmo_plugin`` stays cheap):

* :func:`from_hf` -- Megatron FlexOlmo model with the weights of a Hugging Face checkpoint;
* :func:`from_mcore` / :func:`save_mcore` -- Megatron torch_dist checkpoints with their configuration;
* :func:`logits` -- full-vocabulary causal-LM logits of such a model;
* :func:`build_model`, :class:`FlexOlmoConfig`, :func:`flexolmo_layer_spec` -- building blocks;
* :func:`enable_cpu_compat` -- run megatron-core on a CPU-only machine (no-op with CUDA).

Importing the package also makes Megatron-Bridge's ``AutoBridge`` know FlexOlmo and OLMo-2
(:mod:`flexolmo_plugin.recipes.bridges`) without importing Bridge: see :class:`_RegisterBridgesAfter`.
"""

import sys
import warnings
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "from_hf": ".api",
    "read_hf_config": ".api",
    "from_mcore": ".api",
    "save_mcore": ".api",
    "logits": ".model.build",
    "build_model": ".model.build",
    "next_token_loss": ".model.build",
    "FlexOlmoConfig": ".model.config",
    "ParallelLayout": ".model.layout",
    "ConfigError": ".errors",
    "FlexOlmoError": ".errors",
    "flexolmo_layer_spec": ".model.spec",
    "flexolmo_block_spec": ".model.spec",
    "DomainEmbeddingRouter": ".model.router",
    "ensure_model_parallel": ".model.parallel",
    "enable_cpu_compat": ".compat",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flexolmo_plugin' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


# ---------------------------------------------------------------------- Megatron-Bridge registration
_BRIDGE_PACKAGE = "megatron.bridge"
_BRIDGES_MODULE = "flexolmo_plugin.recipes.bridges"


def _register_bridges() -> None:
    """Import the bridges module (its class decorators register with Bridge's dispatch).  A failure
    must not break the user's own ``import megatron.bridge``: it is reported as a warning."""
    try:
        import_module(_BRIDGES_MODULE)
    except Exception as error:  # reported; AutoBridge then says FlexOlmo is unsupported
        warnings.warn(f"flexolmo_plugin could not register its Megatron-Bridge bridges: {error!r}", stacklevel=2)


class _RegisteringLoader:
    """Runs ``megatron.bridge``'s own loader, then registers our bridges: Bridge is then fully imported
    (its package ``__init__`` imports every bridge and ``AutoBridge``), and every import of anything under
    ``megatron.bridge`` runs that ``__init__`` first, so the bridges are registered before any use."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, attribute):
        return getattr(self.real, attribute)

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):
        self.real.exec_module(module)
        _register_bridges()


class _RegisterBridgesAfter:
    """``sys.meta_path`` hook: hands ``megatron.bridge`` a loader that registers our bridges after it.

    Why a hook: ``import flexolmo_plugin`` must stay cheap (Bridge takes seconds to import, and on a
    machine without Transformer Engine only after :func:`flexolmo_plugin.compat.enable_bridge_compat`),
    and Bridge has no plugin entry points; its registry is filled by importing bridge modules.  Nothing
    of Bridge is patched: the hook only decides *when* ours is imported.
    """

    def find_spec(self, fullname, path, target=None):
        if fullname != _BRIDGE_PACKAGE:
            return None
        for finder in sys.meta_path:  # the finder that would have found it without us
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def _install_bridge_hook() -> None:
    if _BRIDGE_PACKAGE in sys.modules:  # Bridge came first: register now (it is imported already)
        _register_bridges()
    elif not any(isinstance(finder, _RegisterBridgesAfter) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterBridgesAfter())


_install_bridge_hook()
