"""Megatron-Bridge recipes for FlexOlmo.

:mod:`recipes.provider` holds :class:`~recipes.provider.FlexOlmoModelProvider`, the bridge model
provider; :mod:`recipes.expert` the public-model, anchored-expert and router-tuning recipes; :mod:`recipes.train`
the runner behind ``flexolmo train-expert``.  Exports are lazy: importing ``megatron.bridge`` takes seconds and, on machines
without Transformer Engine, needs :func:`flexolmo_plugin.compat.enable_bridge_compat` first.
"""

from importlib import import_module

_EXPORTS = {"FlexOlmoModelProvider": ".provider", "flexolmo_transformer_layer_spec": ".provider",
            "flexolmo_expert_config": ".expert", "flexolmo_router_tuning_config": ".expert",
            "flexolmo_public_config": ".expert"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'recipes' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
