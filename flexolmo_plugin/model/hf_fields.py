"""Reading a Hugging Face ``config.json`` exactly as ``transformers`` reads it (FlexOlmo and OLMo-2).

A key missing from ``config.json`` must mean here what it means in ``transformers`` (its defaults, its
precedence of legacy ``rope_scaling`` over ``rope_parameters``), and every value our model would not
honour is refused naming the field, never dropped: :func:`read_hf_fields` gives the
:class:`~flexolmo_plugin.model.config.FlexOlmoConfig` fields, :func:`runtime_compatibility_notes` what
other runtimes (vLLM) would load differently from an export.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flexolmo_plugin.errors import ConfigError, FlexOlmoWarning

if TYPE_CHECKING:
    from flexolmo_plugin.model.config import FlexOlmoConfig

HF_MODEL_TYPE = "flex_olmo"


class ExportCompatibilityWarning(FlexOlmoWarning):
    """An exported ``config.json`` that ``transformers`` reads as we mean it but another runtime (vLLM)
    would not."""


_MISSING = object()
_SHARED_DEFAULTS = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=None, hidden_act="silu", bos_token_id=None, tie_word_embeddings=False,
                        attention_bias=False, attention_dropout=0.0)
#: ``transformers`` 5.12's values for the keys we read when config.json omits them (its config classes'
#: field defaults and ``default_theta``): a missing key must mean the same here as there -- and OLMo-2's
#: RoPE base and RMSNorm epsilon are not FlexOlmo's.  tests/conversion/test_config_fidelity.py compares
#: this table with transformers' own classes.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    HF_MODEL_TYPE: dict(_SHARED_DEFAULTS, vocab_size=100352, max_position_embeddings=4096, rms_norm_eps=1e-6,
                        pad_token_id=100277, eos_token_id=100257, num_experts=7, num_experts_per_tok=5,
                        norm_topk_prob=False, default_theta=500000.0),
    "olmo2": dict(_SHARED_DEFAULTS, vocab_size=50304, max_position_embeddings=2048, rms_norm_eps=1e-5,
                  pad_token_id=1, eos_token_id=50279, default_theta=10000.0),
}
# Keys of transformers' FlexOlmoConfig / Olmo2Config that do not change the function a checkpoint computes
# but do change what transformers does with it: initializer_range (initialisation), use_cache (inference KV
# cache), output_router_logits and router_aux_loss_coef (extra outputs and HF's training loss; our
# load_balancing_coeff is a training setting of our recipes).  Present in a source config.json, they are kept
# as FlexOlmoConfig.hf_settings and written back on export, so an HF round trip changes nothing in
# transformers.  Not read: pad_token_id as HF's embedding padding_idx (it only stops that row's gradient;
# the id itself is kept for export) and PreTrainedConfig's generic keys (dtype, architectures, ...).
# Every other key is read or refused below.
HF_SETTINGS = {"initializer_range": float, "use_cache": bool, "output_router_logits": bool,
               "router_aux_loss_coef": float}


def config_getter(hf_config: Any):
    return hf_config.get if isinstance(hf_config, Mapping) else lambda k, d=None: getattr(hf_config, k, d)


def _flag(name: str, value: Any, default: bool) -> bool:
    """A config.json boolean; transformers' strict config refuses anything else (0, "false")."""
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def check_hf_settings(settings: Any) -> tuple[tuple[str, Any], ...]:
    """``hf_settings`` as a sorted tuple of ``(key, value)`` pairs (from a mapping or pairs, e.g. the
    lists a saved flexolmo_config.json holds), each key one of :data:`HF_SETTINGS` with a value of its type."""
    if not settings:
        return ()
    try:
        pairs = dict(settings.items() if isinstance(settings, Mapping) else settings)
    except (TypeError, ValueError):
        raise ConfigError(f"hf_settings must be a mapping of transformers settings, got {settings!r}") from None
    for key, value in pairs.items():
        kind = HF_SETTINGS.get(key)
        if kind is None:
            raise ConfigError(f"hf_settings: {key!r} is not one of {', '.join(HF_SETTINGS)}")
        if kind is bool:
            _flag(f"hf_settings {key}", value, False)
        elif _number(f"hf_settings {key}", value) < 0:
            raise ConfigError(f"hf_settings {key} must be >= 0, got {value!r}")
    return tuple(sorted(pairs.items()))


def check_token_ids(pad: Any, bos: Any, eos: Any, vocab_size: int) -> None:
    """Token ids an export can carry: None or ids inside the vocabulary (eos may be a list of them).
    transformers builds its embedding with ``padding_idx=pad_token_id`` and fails on an id past the
    vocabulary; an id outside it can never be read or produced, so it is a typo, not a setting."""
    for name, value in (("pad_token_id", pad), ("bos_token_id", bos), ("eos_token_id", eos)):
        ids = value if name == "eos_token_id" and isinstance(value, (list, tuple)) and value else [value]
        for token in ids:
            if token is None and len(ids) == 1:
                continue
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
                raise ConfigError(f"{name} must be None or a token id in [0, {vocab_size}) (eos_token_id also a "
                                  f"list of them), got {value!r}")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def hf_rope_parameters(hf_config: Any, model_type: str = HF_MODEL_TYPE) -> dict[str, Any]:
    """The RoPE parameters ``transformers`` derives from ``hf_config`` (a config.json dict or a config object).

    Its precedence (``RotaryEmbeddingConfigMixin.convert_rope_params_to_dict`` and
    ``standardize_rope_params``): a non-empty legacy ``rope_scaling`` *replaces* ``rope_parameters``
    whole; ``rope_theta`` inside the dict beats a top-level ``rope_theta``, which beats the model's
    default base; ``rope_type`` beats the legacy ``type`` (else ``"default"``); a top-level
    ``partial_rotary_factor`` fills in a missing one.  Nothing is validated here.
    """
    get = config_getter(hf_config)
    rope = get("rope_scaling") or get("rope_parameters") or {}
    if not isinstance(rope, Mapping):
        raise ConfigError(f"rope_parameters must be a mapping, got {rope!r}")
    rope = dict(rope)
    rope.setdefault("rope_theta", get("rope_theta", HF_DEFAULTS[model_type]["default_theta"]))
    if get("partial_rotary_factor") is not None:
        rope.setdefault("partial_rotary_factor", get("partial_rotary_factor"))
    rope.setdefault("rope_type", rope.get("type", "default"))
    return rope


def _rope_theta(rope: Mapping[str, Any], key: str) -> float:
    """The RoPE base of ``rope`` (read from config.json's ``key``), refusing what our rotary embedding
    (unscaled, whole head) would not honour."""
    if rope["rope_type"] != "default":
        # Linear scaling maps to Megatron's seq_len_interpolation_factor, but FlexOlmoConfig, the Bridge
        # provider and expert packages do not carry it yet: refusing beats converting it away silently.
        raise ConfigError(f"{key}: rope_type={rope['rope_type']!r} is not implemented (only unscaled "
                          "'default' RoPE is); converting would silently drop the scaling")
    partial = rope.get("partial_rotary_factor")
    if partial is not None and partial != 1:
        # transformers' flex_olmo/olmo2 default RoPE ignores it, other runtimes apply it: ambiguous.
        raise ConfigError(f"{key}: partial_rotary_factor={partial!r} is not supported (RoPE rotates "
                          "the whole head here and in transformers, but not in runtimes that honour it)")
    theta = rope["rope_theta"]
    if type(theta) not in (int, float) or not (math.isfinite(theta) and theta > 0):
        raise ConfigError(f"rope_theta must be a positive finite number, got {theta!r}")
    return float(theta)


def read_hf_fields(hf_config: Any, model_type: str) -> dict[str, Any]:
    """:class:`FlexOlmoConfig` fields of an HF ``flex_olmo`` or ``olmo2`` config, read with transformers'
    precedence and defaults; every value our model would compute differently is a :class:`ConfigError`
    naming the key.  (For ``olmo2`` the expert count and top-k are the caller's.)"""
    get, defaults = config_getter(hf_config), HF_DEFAULTS[model_type]

    def value(key: str) -> Any:
        return get(key, defaults.get(key))

    if value("hidden_act") not in ("silu", "swish"):  # transformers' ACT2FN: both are SiLU
        raise ConfigError(f"hidden_act={value('hidden_act')!r}: only SwiGLU (hidden_act='silu') is supported")
    if _flag("attention_bias", value("attention_bias"), False):
        raise ConfigError("attention_bias=True is not FlexOlmo; only bias-free attention is supported")
    if _flag("tie_word_embeddings", value("tie_word_embeddings"), False):
        raise ConfigError("tie_word_embeddings=True is not FlexOlmo (its output layer is untied)")
    dropout = value("attention_dropout")
    if dropout is not None and _number("attention_dropout", dropout) != 0:
        # transformers applies it in training only; our attention has none, so training would differ.
        raise ConfigError(f"attention_dropout={dropout!r} is not supported (attention has no dropout here); "
                          "set it to 0.0")
    heads, kv_heads = value("num_attention_heads"), value("num_key_value_heads")
    fields = dict(
        vocab_size=value("vocab_size"), hidden_size=value("hidden_size"),
        intermediate_size=value("intermediate_size"), num_layers=value("num_hidden_layers"),
        num_attention_heads=heads, num_key_value_heads=heads if kv_heads is None else kv_heads,
        head_dim=get("head_dim"),  # not a transformers field: an extra attribute its attention reads
        rope_theta=_rope_theta(hf_rope_parameters(hf_config, model_type), "rope_scaling" if isinstance(
            hf_config, Mapping) and get("rope_scaling") else "rope_parameters"),
        rms_norm_eps=_number("rms_norm_eps", value("rms_norm_eps")),
        max_position_embeddings=value("max_position_embeddings"),
        pad_token_id=value("pad_token_id"), bos_token_id=value("bos_token_id"), eos_token_id=value("eos_token_id"),
        hf_settings=check_hf_settings({key: get(key) for key in HF_SETTINGS if get(key) is not None}))
    if model_type == HF_MODEL_TYPE:
        if get("expert_names") is not None:  # our exports name the experts (opt-out by name after a round trip)
            fields["expert_names"] = get("expert_names")
        if _flag("norm_topk_prob", value("norm_topk_prob"), False):
            raise ConfigError("norm_topk_prob=True renormalises the top-k router weights; FlexOlmo does not, "
                              "and this implementation only supports norm_topk_prob=False")
        experts = get("num_local_experts", _MISSING)  # transformers' attribute_map: the alias wins
        fields.update(num_experts=value("num_experts") if experts is _MISSING else experts,
                      top_k=value("num_experts_per_tok"))
    return fields


def runtime_compatibility_notes(config: FlexOlmoConfig) -> list[str]:
    """What runtimes other than ``transformers`` would load differently from an export of ``config``."""
    notes = []
    derived = config.hidden_size // config.num_attention_heads
    if config.head_dim is not None and config.head_dim != derived:
        notes.append(f"head_dim={config.head_dim} differs from hidden_size // num_attention_heads = {derived}: "
                     "transformers reads head_dim from config.json, but vLLM derives it from hidden_size and "
                     "num_attention_heads and would load this export with the wrong attention shape")
    return notes
