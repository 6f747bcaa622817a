"""The one list of FlexOlmo recipes: name -> the function that builds its Bridge ``ConfigContainer``.

Listing (``flexolmo train --help``, launchers) needs no Megatron-Bridge import: functions are named
as ``module:function`` strings and imported by :func:`recipe` when a recipe is actually built.
Every recipe function can be called with keyword arguments only (the ``recipe.ARG=VALUE`` overrides)
and returns a ``ConfigContainer`` that Bridge's ``key=value`` / Hydra overrides then refine.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

from flexolmo_plugin.errors import ConfigError

RECIPES: dict[str, str] = {
    "public": "flexolmo_plugin.recipes.phases:flexolmo_public_config",
    "expert": "flexolmo_plugin.recipes.phases:flexolmo_expert_config",
    "router-tune": "flexolmo_plugin.recipes.phases:flexolmo_router_tuning_config",
    "public-7b": "flexolmo_plugin.recipes.production:flexolmo_public_7b_config",
    "expert-2x7b": "flexolmo_plugin.recipes.production:flexolmo_expert_2x7b_config",
    "router-tune-7x7b": "flexolmo_plugin.recipes.production:flexolmo_router_tuning_7x7b_config",
    "inference-7x7b": "flexolmo_plugin.recipes.production:flexolmo_inference_7x7b_config",
}


def recipe(name: str) -> Callable:
    """The recipe function registered as ``name`` (imports Megatron-Bridge: apply
    :func:`flexolmo_plugin.compat.enable_bridge_compat` first on machines without Transformer Engine)."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; available: {sorted(RECIPES)}")
    module, _, function = RECIPES[name].partition(":")
    return getattr(import_module(module), function)
