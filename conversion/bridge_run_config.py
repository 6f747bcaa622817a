"""The FlexOlmo configuration of a checkpoint written by Megatron-Bridge's own ``pretrain()``.

Our ``flexolmo train`` runner writes ``flexolmo_config.json`` beside its checkpoints; a user who calls
Bridge's ``pretrain()`` directly with :class:`~flexolmo_plugin.recipes.provider.FlexOlmoModelProvider`
gets only Bridge's files, among them ``run_config.yaml`` in every ``iter_*`` directory: the whole
``ConfigContainer``, the provider's fields under ``model:``.  This module reads that file as *data*
(a safe YAML loader: Bridge's ``_target_`` entries and any tag stay plain values, nothing is imported,
called or constructed) and translates the provider's fields with the one translation,
:func:`~flexolmo_plugin.model.config.from_megatron_fields`, as the provider's own
``to_flexolmo_config`` does.  A file that does not describe a FlexOlmo model, or lacks a field, is
refused naming the file and the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from flexolmo_plugin.errors import ConfigError, FlexOlmoError
from flexolmo_plugin.model.config import FlexOlmoConfig, from_provider_fields, gpt_model_fields, megatron_fields

RUN_CONFIG_FILE = "run_config.yaml"
PROVIDER_TARGET = "flexolmo_plugin.recipes.provider.FlexOlmoModelProvider"
# Fields only FlexOlmo's provider has: a ``_target_`` naming a subclass of it still carries all of them.
PROVIDER_ONLY_FIELDS = ("router_bias", "flexolmo_backend", "trainable", "owner_expert")
# What from_megatron_fields reads, and what the provider adds to it (as its to_flexolmo_config does).
MEGATRON_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                   "ffn_hidden_size", "moe_ffn_hidden_size", "num_moe_experts", "moe_router_topk",
                   "layernorm_epsilon", "moe_z_loss_coeff", "moe_aux_loss_coeff", "moe_router_load_balancing_type")
REQUIRED_FIELDS = MEGATRON_FIELDS + ("vocab_size", "rotary_base", "seq_length", "make_vocab_size_divisible_by",
                                     "router_bias")
# The provider's function-defining fields (recipes/provider.py ``_INVARIANT_FIELDS``; a test keeps the two
# equal): each must have the value the one translation gives, or the weights mean something else.
INVARIANT_FIELDS = ("qk_layernorm", "add_bias_linear", "add_qkv_bias", "gated_linear_unit", "normalization",
                    "activation_func", "position_embedding_type", "rotary_percent",
                    "share_embeddings_and_output_weights", "moe_router_score_function", "moe_router_pre_softmax",
                    "moe_router_topk_scaling_factor", "moe_shared_expert_intermediate_size")
# Bridge / Megatron fields that change the function but that FlexOlmoConfig cannot carry: set, refused.
UNSUPPORTED_FIELDS = ("rope_scaling", "seq_len_interpolation_factor", "rotary_interleaved", "mtp_num_layers")
MAX_BYTES = 16 << 20


class RunConfigError(FlexOlmoError):
    """A ``run_config.yaml`` that does not describe a FlexOlmo model our tools can read."""


class _DataLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that keeps a tagged node (``!!python/...``, custom tags) as the plain mapping,
    list or string it is written as, instead of refusing the file: nothing is ever constructed."""


def _tagged_as_data(loader: _DataLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_DataLoader.add_constructor(None, _tagged_as_data)


def run_config_path(checkpoint: Path) -> Path | None:
    """``run_config.yaml`` of a resolved checkpoint directory (``iter_*``), if Bridge wrote one."""
    path = checkpoint / RUN_CONFIG_FILE
    return path if path.is_file() else None


def _model_section(path: Path) -> dict[str, Any]:
    if path.stat().st_size > MAX_BYTES:
        raise RunConfigError(f"{path}: {path.stat().st_size} bytes; not a Megatron-Bridge run configuration")
    try:
        document = yaml.load(path.read_text(encoding="utf-8"), Loader=_DataLoader)  # noqa: S506 (a SafeLoader)
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as error:
        raise RunConfigError(f"{path}: not readable YAML ({(str(error) or type(error).__name__).splitlines()[0]})"
                             ) from None
    model = document.get("model") if isinstance(document, Mapping) else None
    if not isinstance(model, Mapping):
        raise RunConfigError(f"{path}: no 'model' section (not a Megatron-Bridge run configuration)")
    target = model.get("_target_")
    if target != PROVIDER_TARGET and not all(name in model for name in PROVIDER_ONLY_FIELDS):
        raise RunConfigError(f"{path}: model._target_ is {target!r}, not FlexOlmo's provider {PROVIDER_TARGET} "
                             "(a checkpoint of another model)")
    missing = [name for name in REQUIRED_FIELDS + INVARIANT_FIELDS if name not in model]
    if missing:
        raise RunConfigError(f"{path}: model.{missing[0]} is missing (needed to describe the FlexOlmo model)")
    return dict(model)


def _plain(value: Any) -> Any:
    """A field's value as Bridge serialises it: a function becomes ``{_target_: module.name}``."""
    if callable(value):
        return f"{value.__module__}.{value.__qualname__}"
    return value


def _check_fields(path: Path, model: Mapping[str, Any], config: FlexOlmoConfig) -> None:
    want = {**megatron_fields(config), **gpt_model_fields(config)}
    for name in INVARIANT_FIELDS:
        value = model[name]
        found = value.get("_target_") if isinstance(value, Mapping) else value
        if found != _plain(want[name]):
            raise RunConfigError(f"{path}: model.{name} is {found!r}; FlexOlmo needs {_plain(want[name])!r}")
    for name in UNSUPPORTED_FIELDS:
        if model.get(name):
            raise RunConfigError(f"{path}: model.{name}={model[name]!r} is not supported by FlexOlmo's tools "
                                 "(its weights would be read as a different model)")


def read_run_config(path: Path) -> tuple[FlexOlmoConfig, dict[str, Any]]:
    """The :class:`FlexOlmoConfig` a Bridge ``run_config.yaml`` describes, and its ``model`` section."""
    model = _model_section(path)
    if not isinstance(model["router_bias"], bool):
        raise RunConfigError(f"{path}: model.router_bias is {model['router_bias']!r}, expected true or false")
    names = model.get("expert_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise RunConfigError(f"{path}: model.expert_names is {names!r}, expected a list of names")
    try:
        config = from_provider_fields(
            SimpleNamespace(**{name: value for name, value in model.items() if isinstance(name, str)}))
    except AttributeError as error:  # a field the translation reads that REQUIRED_FIELDS does not list yet
        raise RunConfigError(f"{path}: model.{error.name} is missing (needed to describe the FlexOlmo model)") from None
    except (ConfigError, TypeError, ValueError) as error:
        raise RunConfigError(f"{path}: the model fields do not describe a FlexOlmo model ({error})") from None
    _check_fields(path, model, config)
    return config, model


def run_config_dtype(model: Mapping[str, Any]) -> str | None:
    """The parameter dtype the ``model`` section states (only used when the checkpoint has no tensors)."""
    if model.get("bf16"):
        return "bfloat16"
    if model.get("fp16"):
        return "float16"
    params = model.get("params_dtype")
    target = params.get("_target_") if isinstance(params, Mapping) else None
    return target.removeprefix("torch.") if isinstance(target, str) else None
