"""Loading HF FlexOlmo checkpoints: both expert layouts, sharded files, and clear errors on bad input."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import flexolmo_plugin as fp
from flexolmo_plugin.conversion.safetensors_reader import CheckpointFormatError
from tests.support import make_hf_model, save_hf_model

IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf_model():
    return make_hf_model(seed=21, num_experts=3, num_experts_per_tok=2)


@pytest.fixture
def hf_dir(hf_model, tmp_path):
    return save_hf_model(hf_model, tmp_path / "hf")


@pytest.fixture(autouse=True)
def _groups(megatron_single_process):
    yield


def rewrite(src, dst, edit, config_edit=None):
    """Copy an HF dir, passing its tensors through ``edit`` (dict -> dict)."""
    dst.mkdir()
    tensors = edit(load_file(src / "model.safetensors"))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_fused_transformers5_layout_gives_the_same_model(hf_model, hf_dir, tmp_path):
    """State dicts taken straight from a transformers-5 module store experts fused."""
    fused_dir = tmp_path / "fused"
    fused_dir.mkdir()
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, fused_dir / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(hf_dir / "config.json", fused_dir / "config.json")
    per_expert = fp.logits(fp.from_hf(hf_dir), IDS)
    fused = fp.logits(fp.from_hf(fused_dir), IDS)
    assert torch.equal(per_expert, fused)


def test_sharded_checkpoint_with_index(hf_model, hf_dir, tmp_path):
    sharded = tmp_path / "sharded"
    hf_model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert torch.equal(fp.logits(fp.from_hf(sharded), IDS), fp.logits(fp.from_hf(hf_dir), IDS))


def test_pickle_only_directory_is_refused_with_reason(hf_dir, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(hf_dir / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointFormatError, match="pickle"):
        fp.from_hf(pickled)


def test_missing_config_is_refused(hf_dir):
    (hf_dir / "config.json").unlink()
    with pytest.raises(CheckpointFormatError, match="config.json"):
        fp.from_hf(hf_dir)


def test_missing_tensor_is_named(hf_dir, tmp_path):
    key = "model.layers.1.mlp.experts.2.up_proj.weight"
    bad = rewrite(hf_dir, tmp_path / "bad", lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(CheckpointFormatError, match="missing tensors: " + key.replace(".", r"\.")):
        fp.from_hf(bad)


def test_misshaped_tensor_is_named_with_both_shapes(hf_dir, tmp_path):
    key = "model.layers.0.self_attn.k_norm.weight"
    bad = rewrite(hf_dir, tmp_path / "bad", lambda t: {**t, key: torch.ones(7)})
    with pytest.raises(CheckpointFormatError, match=key.replace(".", r"\.") + r" has shape \[7\], expected \[16\]"):
        fp.from_hf(bad)


def test_unknown_extra_tensor_is_named(hf_dir, tmp_path):
    bad = rewrite(hf_dir, tmp_path / "bad", lambda t: {**t, "model.layers.0.mlp.expert_bias": torch.zeros(2)})
    with pytest.raises(CheckpointFormatError, match=r"unexpected tensors.*model\.layers\.0\.mlp\.expert_bias"):
        fp.from_hf(bad)


def test_non_finite_weight_is_named(hf_dir, tmp_path):
    key = "model.layers.1.mlp.gate.weight"

    def poison(t):
        t[key] = t[key].clone()
        t[key][1, 3] = float("nan")
        return t

    bad = rewrite(hf_dir, tmp_path / "bad", poison)
    with pytest.raises(CheckpointFormatError, match=key.replace(".", r"\.")):
        fp.from_hf(bad)


def test_config_disagreeing_with_weights_is_refused(hf_dir, tmp_path):
    bad = rewrite(hf_dir, tmp_path / "bad", lambda t: t,
                  config_edit=lambda c: c.update(num_experts=4, num_experts_per_tok=2))
    with pytest.raises(CheckpointFormatError, match=r"missing tensors: .*experts\.3\."):
        fp.from_hf(bad)


def test_both_expert_layouts_in_one_layer_is_refused(hf_model, hf_dir, tmp_path):
    fused = {k: v for k, v in hf_model.state_dict().items() if k.endswith("mlp.experts.down_proj")}
    bad = rewrite(hf_dir, tmp_path / "bad", lambda t: {**t, **{k: v.contiguous() for k, v in fused.items()}})
    with pytest.raises(CheckpointFormatError, match="both fused and per expert"):
        fp.from_hf(bad)


def test_unsupported_hf_config_is_refused(hf_dir, tmp_path):
    bad = rewrite(hf_dir, tmp_path / "bad", lambda t: t, config_edit=lambda c: c.update(norm_topk_prob=True))
    with pytest.raises(ValueError, match="norm_topk_prob"):
        fp.from_hf(bad)
