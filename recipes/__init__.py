"""Layer 4, training on Megatron-Bridge (installed as ``flexolmo_plugin.recipes``).

:mod:`.provider` holds :class:`~flexolmo_plugin.recipes.provider.FlexOlmoModelProvider`, the Bridge
model provider; :mod:`.phases` the public-model, anchored-expert and router-tuning recipes at any
size; :mod:`.production` the H100 recipes at the paper's scale, with :mod:`.precision` (BF16/FP8);
:mod:`.flops` the frozen-weight-aware FLOP count; :mod:`.train` the runner behind ``flexolmo train``.
Exports are lazy: importing ``megatron.bridge`` takes seconds and, on machines without Transformer
Engine, needs :func:`flexolmo_plugin.compat.enable_bridge_compat` first.
"""

from importlib import import_module

_EXPORTS = {"FlexOlmoModelProvider": ".provider", "flexolmo_transformer_layer_spec": ".provider",
            "flexolmo_expert_config": ".phases", "flexolmo_router_tuning_config": ".phases",
            "flexolmo_public_config": ".phases"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flexolmo_plugin.recipes' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
