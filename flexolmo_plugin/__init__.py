"""FlexOlmo (Shi et al., 2025) on NVIDIA Megatron-Core.

Public API (imported lazily so that ``import flexolmo_plugin`` stays cheap):

* :func:`from_hf` -- Megatron FlexOlmo model with the weights of a Hugging Face checkpoint;
* :func:`from_mcore` / :func:`save_mcore` -- Megatron torch_dist checkpoints with their configuration;
* :func:`logits` -- full-vocabulary causal-LM logits of such a model;
* :func:`build_model`, :class:`FlexOlmoConfig`, :func:`flexolmo_layer_spec` -- building blocks;
* :func:`enable_cpu_compat` -- run megatron-core on a CPU-only machine (no-op with CUDA).
"""

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
