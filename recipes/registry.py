"""The one list of FlexOlmo recipes: name -> the function that builds its Bridge ``ConfigContainer``.

Listing (``flexolmo train --help``, ``flexolmo plan``, the NeMo-Run launcher) needs no Megatron-Bridge
import: functions are named as ``module:function`` strings and imported by :func:`recipe` only when a
recipe is actually built.

Every recipe follows Megatron-Bridge's recipe idiom: it can be called with no arguments (every
parameter is keyword-only and has a default, as Bridge's ``scripts/training/run_recipe.py`` calls its
own recipes) and returns a ``ConfigContainer`` that Bridge's own override function refines::

    from megatron.bridge.training.utils.omegaconf_utils import process_config_with_overrides
    config = recipe("expert")(init_from="ckpt/code-start")        # or recipe("expert")()
    config = process_config_with_overrides(config, cli_overrides=["train.train_iters=7"])

``flexolmo train NAME`` does the same with its arguments: ``recipe.ARG=VALUE`` are the recipe
function's keyword arguments, every other ``key=value`` goes to Bridge's override function.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

from flexolmo_plugin.errors import ConfigError

RECIPE_PREFIX = "recipe."  # ``recipe.ARG=VALUE``: an argument of the recipe function, not a config key

RECIPES: dict[str, str] = {
    "public": "flexolmo_plugin.recipes.phases:flexolmo_public_config",
    "expert": "flexolmo_plugin.recipes.phases:flexolmo_expert_config",
    "router-tune": "flexolmo_plugin.recipes.phases:flexolmo_router_tuning_config",
    "public-7b": "flexolmo_plugin.recipes.production:flexolmo_public_7b_config",
    "expert-2x7b": "flexolmo_plugin.recipes.production:flexolmo_expert_2x7b_config",
    "router-tune-7x7b": "flexolmo_plugin.recipes.production:flexolmo_router_tuning_7x7b_config",
    "inference-7x7b": "flexolmo_plugin.recipes.production:flexolmo_inference_7x7b_config",
}


def check_name(name: str) -> str:
    """``name`` if it is a registered recipe, else a :class:`ConfigError` listing them (no import)."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; available: {', '.join(RECIPES)}")
    return name


def recipe(name: str) -> Callable:
    """The recipe function registered as ``name`` (imports Megatron-Bridge: apply
    :func:`flexolmo_plugin.compat.enable_bridge_compat` first on machines without Transformer Engine)."""
    module, _, function = RECIPES[check_name(name)].partition(":")
    return getattr(import_module(module), function)
