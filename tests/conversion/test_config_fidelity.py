"""Config fidelity: HF config.json is read as ``transformers`` reads it, and every value our model would
compute differently is refused (exit 2, naming the field) instead of being converted away."""

import dataclasses
import json
import math
import shutil
import warnings

import pytest
import transformers
from transformers import AutoConfig

import flexolmo_plugin as fp
from flexolmo_plugin.conversion.convert import hf_to_mcore, mcore_to_hf
from flexolmo_plugin.conversion.mcore_io import load_config
from flexolmo_plugin.errors import ConfigError
from flexolmo_plugin.model.config import (
    HF_DEFAULTS,
    ExportCompatibilityWarning,
    FlexOlmoConfig,
    hf_rope_parameters,
)
from tests.faults.harness import assert_refused, run_cli
from tests.support import make_dense_model, make_hf_model, save_hf_model

SHAPE = dict(vocab_size=100352, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2)
LINEAR = {"type": "linear", "factor": 2.0}
DEFAULT_1E4 = {"rope_type": "default", "rope_theta": 10000.0}


def transformers_config(raw, tmp_path):
    """What ``transformers.AutoConfig`` makes of ``raw`` written as a config.json."""
    directory = tmp_path / f"cfg{len(list(tmp_path.iterdir()))}"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(raw))
    return AutoConfig.from_pretrained(directory)


# ---------------------------------------------------------------------- precedence, against transformers
@pytest.mark.parametrize("model_type", ["flex_olmo", "olmo2"])
@pytest.mark.parametrize("rope", [
    {},
    {"rope_theta": 7.0},
    {"rope_theta": 0},
    {"rope_parameters": DEFAULT_1E4, "rope_theta": 7.0},
    {"rope_parameters": {"rope_type": "default"}, "rope_theta": 7.0},
    {"rope_parameters": DEFAULT_1E4, "rope_scaling": LINEAR},  # the legacy key wins, whole
    {"rope_parameters": DEFAULT_1E4, "rope_scaling": LINEAR, "rope_theta": 3.0},
    {"rope_parameters": DEFAULT_1E4, "rope_scaling": None},
    {"rope_scaling": {}, "rope_theta": 3.0},
    {"rope_parameters": {"type": "dynamic", "factor": 2.0}},
    {"rope_parameters": {"rope_type": "default", "type": "linear", "factor": 2.0}},
    {"partial_rotary_factor": 0.5},
    {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 1.0}, "partial_rotary_factor": 0.5},
], ids=lambda r: json.dumps(r, sort_keys=True))
def test_rope_parameters_are_read_with_transformers_precedence(model_type, rope, tmp_path):
    raw = {"model_type": model_type, **SHAPE, **rope}
    assert hf_rope_parameters(raw, model_type) == transformers_config(raw, tmp_path).rope_parameters


def test_a_legacy_linear_rope_scaling_is_not_read_as_unscaled():
    """Before: ``rope_parameters`` was preferred, so this checkpoint converted as unscaled RoPE."""
    raw = {"model_type": "flex_olmo", **SHAPE, "num_experts": 2, "num_experts_per_tok": 1,
           "rope_parameters": DEFAULT_1E4, "rope_scaling": LINEAR}
    with pytest.raises(ConfigError, match=r"rope_scaling: rope_type='linear' is not implemented"):
        FlexOlmoConfig.from_hf(raw)


@pytest.mark.parametrize("extra", [
    {},
    {"rope_theta": 12345, "rms_norm_eps": 1e-5, "max_position_embeddings": 77},
    {"num_key_value_heads": None},
    {"num_local_experts": 3, "num_experts": 4},  # transformers' attribute_map: the alias wins
    {"head_dim": 16},
], ids=lambda e: json.dumps(e, sort_keys=True))
@pytest.mark.parametrize("model_type", ["flex_olmo", "olmo2"])
def test_accepted_configs_read_the_values_transformers_uses(model_type, extra, tmp_path):
    raw = {"model_type": model_type, **SHAPE, **extra}
    if model_type == "flex_olmo":
        raw.setdefault("num_experts_per_tok", 2)
        ours = FlexOlmoConfig.from_hf(raw)
    else:
        ours = FlexOlmoConfig.from_hf_olmo2(raw, num_experts=2)
    theirs = transformers_config(raw, tmp_path)
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert (ours.rms_norm_eps, ours.max_position_embeddings) == (theirs.rms_norm_eps,
                                                                 theirs.max_position_embeddings)
    assert (ours.num_key_value_heads, ours.pad_token_id, ours.eos_token_id) == (
        theirs.num_key_value_heads, theirs.pad_token_id, theirs.eos_token_id)
    assert ours.kv_channels == getattr(theirs, "head_dim", theirs.hidden_size // theirs.num_attention_heads)
    if model_type == "flex_olmo":
        assert (ours.num_experts, ours.top_k) == (theirs.num_experts, theirs.num_experts_per_tok)


def test_olmo2_defaults_are_olmo2s_not_flexolmos():
    """Before: an OLMo-2 config.json without rope_theta / rms_norm_eps got FlexOlmo's 500000 / 1e-6;
    transformers runs it with 10000 / 1e-5."""
    config = FlexOlmoConfig.from_hf_olmo2({"model_type": "olmo2", **SHAPE}, num_experts=2)
    assert (config.rope_theta, config.rms_norm_eps, config.max_position_embeddings) == (10000.0, 1e-5, 2048)


@pytest.mark.parametrize("model_type,cls", [("flex_olmo", transformers.FlexOlmoConfig),
                                            ("olmo2", transformers.Olmo2Config)])
def test_the_defaults_table_is_transformers_own(model_type, cls):
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    for key, value in HF_DEFAULTS[model_type].items():
        assert (cls.default_theta if key == "default_theta" else fields[key]) == value, key


# ---------------------------------------------------------------------- refusals, one per field
@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    save_hf_model(make_hf_model(seed=3, num_experts=2, num_experts_per_tok=1), root / "flex")
    make_dense_model(root / "olmo2")
    return root


def _edited(sources, tmp_path, kind, edit):
    src = tmp_path / "src"
    shutil.copytree(sources / kind, src)
    config = json.loads((src / "config.json").read_text())
    config.update(edit)
    (src / "config.json").write_text(json.dumps(config))
    return src


REFUSED = {
    "rope_scaling_linear": ({"rope_scaling": LINEAR}, r"rope_scaling: rope_type='linear' is not implemented"),
    "rope_parameters_yarn": ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
                             r"rope_parameters: rope_type='yarn' is not implemented"),
    "rope_parameters_llama3": ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "rope_theta": 1e4}},
                               r"rope_type='llama3' is not implemented"),
    "partial_rotary_factor": ({"partial_rotary_factor": 0.5}, r"partial_rotary_factor=0.5 is not supported"),
    "rope_theta_zero": ({"rope_parameters": {"rope_type": "default", "rope_theta": 0}},
                        r"rope_theta must be a positive finite number, got 0$"),
    "rope_theta_top_level_zero": ({"rope_parameters": {"rope_type": "default"}, "rope_theta": 0},
                                  r"rope_theta must be a positive finite number, got 0$"),
    "rope_theta_negative": ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}},
                            r"rope_theta must be a positive finite number, got -1.0"),
    "rope_theta_infinite": ({"rope_parameters": {"rope_type": "default", "rope_theta": math.inf}},
                            r"rope_theta must be a positive finite number, got inf"),
    "rope_theta_text": ({"rope_parameters": {"rope_type": "default", "rope_theta": "1e4"}},
                        r"rope_theta must be a positive finite number, got '1e4'"),
    "attention_dropout": ({"attention_dropout": 0.1}, r"attention_dropout=0.1 is not supported"),
    "attention_bias": ({"attention_bias": True}, r"attention_bias=True"),
    "tie_word_embeddings": ({"tie_word_embeddings": True}, r"tie_word_embeddings=True"),
    "hidden_act": ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
    "norm_topk_prob": ({"norm_topk_prob": True}, r"norm_topk_prob=True"),
    "rms_norm_eps": ({"rms_norm_eps": None}, r"rms_norm_eps must be a finite number, got None"),
    "head_dim": ({"head_dim": 0}, r"head_dim must be a positive integer or None, got 0"),
    # transformers' strict config refuses these types, and its embedding refuses a padding_idx past the vocabulary
    "norm_topk_prob_int": ({"norm_topk_prob": 0}, r"norm_topk_prob must be true or false, got 0"),
    "attention_bias_text": ({"attention_bias": "false"}, r"attention_bias must be true or false, got 'false'"),
    "pad_token_id_past_vocab": ({"pad_token_id": 500}, r"pad_token_id must be None or a token id in \[0, 100\)"),
    "eos_token_id_text": ({"eos_token_id": "x"}, r"eos_token_id must be None or a token id.*got 'x'"),
    "eos_token_id_list": ({"eos_token_id": [1, -1]}, r"eos_token_id must be None or a token id.*got \[1, -1\]"),
    "bos_token_id_bool": ({"bos_token_id": True}, r"bos_token_id must be None or a token id.*got True"),
    "expert_names_count": ({"expert_names": ["public"]}, r"expert_names has 1 entries for 2 experts"),
    "expert_names_type": ({"expert_names": ["public", 3]}, r"expert name 3 is not a safe identifier"),
    "output_router_logits_int": ({"output_router_logits": 1}, r"hf_settings output_router_logits must be true or "
                                                              r"false, got 1"),
    "router_aux_loss_coef": ({"router_aux_loss_coef": -0.5}, r"hf_settings router_aux_loss_coef must be >= 0"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_hf_to_mcore_refuses_a_field_the_model_would_not_honour(case, sources, tmp_path, capsys):
    edit, match = REFUSED[case]
    src = _edited(sources, tmp_path, "flex", edit)
    assert_refused(["convert", "hf-to-mcore", src, tmp_path / "out", "--quiet"], capsys, match=match,
                   workdir=tmp_path, inputs=(src,))


@pytest.mark.parametrize("case", ["rope_scaling_linear", "rope_theta_zero", "attention_dropout", "attention_bias",
                                  "tie_word_embeddings", "hidden_act", "partial_rotary_factor"])
def test_upcycling_olmo2_refuses_the_same_fields(case, sources, tmp_path, capsys):
    edit, match = REFUSED[case]
    src = _edited(sources, tmp_path, "olmo2", edit)
    assert_refused(["convert", "hf-to-mcore", src, tmp_path / "out", "--num-experts", 2, "--quiet"], capsys,
                   match=match, workdir=tmp_path, inputs=(src,))


# ---------------------------------------------------------------------- export
def test_a_round_trip_keeps_transformers_settings_names_and_chat_template(sources, tmp_path,
                                                                          megatron_single_process):
    """Before: router_aux_loss_coef / output_router_logits were dropped (transformers then computed another
    loss, returned no router logits), the expert names were not exported (opt-out by name failed after a
    round trip) and chat_template.jinja was not copied (apply_chat_template failed)."""
    src = _edited(sources, tmp_path, "flex", {"router_aux_loss_coef": 0.5, "output_router_logits": True,
                                              "initializer_range": 0.01, "use_cache": False,
                                              "expert_names": ["public", "code"]})
    (src / "chat_template.jinja").write_text("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}")
    (src / "additional_chat_templates").mkdir()
    (src / "additional_chat_templates" / "tools.jinja").write_text("tools")
    hf_to_mcore(src, tmp_path / "mcore")
    assert (tmp_path / "mcore" / "tokenizer" / "chat_template.jinja").is_file()
    mcore_to_hf(tmp_path / "mcore", tmp_path / "back")
    before, after = (json.loads((d / "config.json").read_text()) for d in (src, tmp_path / "back"))
    for key in ("router_aux_loss_coef", "output_router_logits", "initializer_range", "use_cache", "expert_names"):
        assert after[key] == before[key], key
    assert (tmp_path / "back" / "chat_template.jinja").read_text() == (src / "chat_template.jinja").read_text()
    assert (tmp_path / "back" / "additional_chat_templates" / "tools.jinja").read_text() == "tools"
    theirs = AutoConfig.from_pretrained(tmp_path / "back")
    assert (theirs.router_aux_loss_coef, theirs.output_router_logits, theirs.use_cache) == (0.5, True, False)
    assert fp.read_hf_config(tmp_path / "back").expert_names == ("public", "code")
    hf_to_mcore(tmp_path / "back", tmp_path / "again")  # and back in: the names allow opt-out by name
    assert load_config(tmp_path / "again")[0].expert_names == ("public", "code")


def test_export_writes_rope_theta_at_top_level_too(sources, tmp_path, megatron_single_process):
    src = _edited(sources, tmp_path, "flex", {"rope_parameters": {"rope_type": "default", "rope_theta": 12345.0}})
    hf_to_mcore(src, tmp_path / "mcore")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportCompatibilityWarning)  # nothing to warn about here
        mcore_to_hf(tmp_path / "mcore", tmp_path / "back")
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert written["rope_theta"] == written["rope_parameters"]["rope_theta"] == 12345.0
    assert fp.read_hf_config(tmp_path / "back").rope_theta == 12345.0
    assert AutoConfig.from_pretrained(tmp_path / "back").rope_parameters == {"rope_type": "default",
                                                                             "rope_theta": 12345.0}


def test_export_warns_that_vllm_would_not_honour_a_custom_head_dim():
    custom = FlexOlmoConfig(vocab_size=100, hidden_size=48, intermediate_size=40, num_layers=2,
                            num_attention_heads=6, num_key_value_heads=2, num_experts=2, top_k=1, head_dim=16)
    with pytest.warns(ExportCompatibilityWarning, match=r"head_dim=16 differs from hidden_size // "
                                                        r"num_attention_heads = 8.*vLLM"):
        assert custom.to_hf_dict()["head_dim"] == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportCompatibilityWarning)
        custom.replace(head_dim=8).to_hf_dict()  # explicit but equal to the derived value: no warning
        custom.replace(head_dim=None).to_hf_dict()


def test_the_head_dim_warning_reaches_a_cli_user(tmp_path, capsys, megatron_single_process):
    """The CLI silences UserWarnings (library advisories); this warning is not one: it is one line."""
    src = save_hf_model(make_hf_model(seed=4, num_experts=2, num_experts_per_tok=1, head_dim=16), tmp_path / "src")
    hf_to_mcore(src, tmp_path / "mcore")
    code, err = run_cli(["convert", "mcore-to-hf", tmp_path / "mcore", tmp_path / "back", "--quiet"], capsys)
    assert [line for line in err.splitlines() if line.startswith("warning:") and "head_dim=16" in line], err
    assert code == 0 and json.loads((tmp_path / "back" / "config.json").read_text())["head_dim"] == 16
