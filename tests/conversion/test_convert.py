"""HF ⇄ Megatron conversion: bitwise round trips, transformers reloads, upcycling, and bad inputs."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import flexolmo_plugin as fp
from flexolmo_plugin.conversion.atomic import OutputExistsError
from flexolmo_plugin.conversion.checksums import CorruptFileError
from flexolmo_plugin.conversion.convert import hf_to_mcore, mcore_to_hf
from flexolmo_plugin.conversion.mapping import entries
from flexolmo_plugin.conversion.mcore_io import McoreCheckpointError
from flexolmo_plugin.conversion.safetensors_reader import (
    CheckpointFormatError,
    SafetensorsCheckpoint,
)
from tests.support import hf_reference, kill_when, make_dense_model, make_hf_model, save_hf_model

IDS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _groups(megatron_single_process):
    yield


def all_tensors(directory):
    with SafetensorsCheckpoint.open(directory) as checkpoint:
        return {k: checkpoint.get(k, check_finite=False) for k in checkpoint.keys()}


def nothing_left_behind(parent, name):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.partial")]


@pytest.mark.parametrize("overrides,dtype", [
    (dict(num_experts=2, num_experts_per_tok=2), torch.float32),
    (dict(num_experts=8, num_experts_per_tok=3, num_key_value_heads=3), torch.float32),
    (dict(num_experts=5, num_experts_per_tok=1, num_key_value_heads=6, vocab_size=131), torch.bfloat16),
], ids=["e2", "e8_gqa", "e5_mha_bf16"])
def test_hf_to_mcore_to_hf_is_bitwise_identical(overrides, dtype, tmp_path):
    hf = make_hf_model(seed=1, **overrides).to(dtype)
    src = save_hf_model(hf, tmp_path / "src")
    report = hf_to_mcore(src, tmp_path / "mcore")
    assert report.tensors == len(list(entries(fp.read_hf_config(src))))
    mcore_to_hf(tmp_path / "mcore", tmp_path / "back")
    before, after = all_tensors(src), all_tensors(tmp_path / "back")
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["model_type"] == "flex_olmo" and config["num_experts"] == overrides["num_experts"]


def test_export_loads_in_transformers_with_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = make_hf_model(seed=2)
    hf_to_mcore(save_hf_model(hf, tmp_path / "src"), tmp_path / "mcore")
    mcore_to_hf(tmp_path / "mcore", tmp_path / "back", max_shard_bytes=40_000)
    assert (tmp_path / "back" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "back").glob("model-*.safetensors"))) > 1
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    ref, _ = hf_reference(hf, IDS)
    got, _ = hf_reference(reloaded, IDS)
    assert torch.equal(got, ref)
    assert (fp.logits(fp.from_mcore(tmp_path / "mcore"), IDS) - ref).abs().max() <= 1e-5


def test_fused_and_sharded_sources_convert_to_the_same_checkpoint(tmp_path):
    hf = make_hf_model(seed=3)
    per_expert = save_hf_model(hf, tmp_path / "per_expert")
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, fused / "model.safetensors",
              metadata={"format": "pt"})
    shutil.copy(per_expert / "config.json", fused / "config.json")
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="20KB")
    for name in ("per_expert", "fused", "sharded"):
        hf_to_mcore(tmp_path / name, tmp_path / f"mc_{name}")
        mcore_to_hf(tmp_path / f"mc_{name}", tmp_path / f"back_{name}")
    reference = all_tensors(per_expert)
    for name in ("fused", "sharded"):
        got = all_tensors(tmp_path / f"back_{name}")
        assert sorted(got) == sorted(reference)
        assert all(torch.equal(got[k], reference[k]) for k in reference), name


def test_tokenizer_files_travel_both_ways(tmp_path):
    src = save_hf_model(make_hf_model(seed=4), tmp_path / "src")
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    hf_to_mcore(src, tmp_path / "mcore")
    mcore_to_hf(tmp_path / "mcore", tmp_path / "back")
    assert (tmp_path / "back" / "tokenizer.json").read_text() == '{"version": "1.0"}'


def test_olmo2_dense_upcycled_with_one_expert_left_is_the_dense_model(tmp_path):
    dense = make_dense_model(tmp_path / "dense", seed=0)
    hf_to_mcore(tmp_path / "dense", tmp_path / "mcore", num_experts=3, top_k=2)
    model = fp.from_mcore(tmp_path / "mcore", dispatcher="allgather")  # top-3 of the 1 expert left
    assert model.flexolmo_config.num_experts == 3
    ref, _ = hf_reference(dense, IDS)
    for layer in model.decoder.layers:
        layer.mlp.router.set_excluded_experts([1, 2])
    assert (fp.logits(model, IDS) - ref).abs().max().item() <= 1e-5
    for layer in model.decoder.layers:
        layer.mlp.router.set_excluded_experts(None)
    # unmasked, zero router rows give each expert 1/3: top-2 of identical experts is 2/3 of the FFN
    assert (fp.logits(model, IDS) - ref).abs().max().item() > 1e-3


# ---------------------------------------------------------------------------------------------- bad inputs
def _rewrite(src, dst, edit=lambda t: t, config_edit=None):
    dst.mkdir()
    save_file(edit(load_file(src / "model.safetensors")), dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def good_src(tmp_path_factory):
    return save_hf_model(make_hf_model(seed=5, num_experts=3), tmp_path_factory.mktemp("good") / "hf")


def _nan(t):
    t["model.layers.1.mlp.experts.2.down_proj.weight"][0, 0] = float("nan")
    return t


def _truncate(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-100])


def _lying_header(path):
    raw = (path / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    key = "model.norm.weight"
    begin, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [begin, end + 4096]
    header[key]["shape"] = [header[key]["shape"][0] + 1024]
    blob = json.dumps(header).encode()
    (path / "model.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n:])


@pytest.mark.parametrize("case,match", [
    ("pickle_only", "pickle"),
    ("truncated", "truncated"),
    ("lying_header", "model.norm.weight"),
    ("missing_expert", r"missing tensors: model\.layers\.0\.mlp\.experts\.1\.gate_proj\.weight"),
    ("extra_tensor", r"unexpected tensors.*model\.layers\.0\.mlp\.router_bias"),
    ("wrong_shape", r"model\.layers\.1\.self_attn\.o_proj\.weight has shape"),
    ("nan_weight", r"model\.layers\.1\.mlp\.experts\.2\.down_proj\.weight"),
    ("config_disagrees", r"missing tensors: .*experts\.3"),
])
def test_bad_hf_input_fails_clearly_and_leaves_nothing(case, match, good_src, tmp_path):
    bad = tmp_path / "bad"
    if case == "pickle_only":
        bad.mkdir()
        shutil.copy(good_src / "config.json", bad / "config.json")
        (bad / "pytorch_model.bin").write_bytes(b"\x80\x04")
    elif case in ("truncated", "lying_header"):
        shutil.copytree(good_src, bad)
        (_truncate if case == "truncated" else _lying_header)(bad)
    elif case == "missing_expert":
        _rewrite(good_src, bad, lambda t: {k: v for k, v in t.items()
                                           if k != "model.layers.0.mlp.experts.1.gate_proj.weight"})
    elif case == "extra_tensor":
        _rewrite(good_src, bad, lambda t: {**t, "model.layers.0.mlp.router_bias": torch.zeros(3)})
    elif case == "wrong_shape":
        _rewrite(good_src, bad, lambda t: {**t, "model.layers.1.self_attn.o_proj.weight": torch.zeros(48, 47)})
    elif case == "nan_weight":
        _rewrite(good_src, bad, _nan)
    elif case == "config_disagrees":
        _rewrite(good_src, bad, config_edit=lambda c: c.update(num_experts=4))
    with pytest.raises((CheckpointFormatError, McoreCheckpointError), match=match):
        hf_to_mcore(bad, tmp_path / "out")
    nothing_left_behind(tmp_path, "out")


def test_existing_output_is_refused_and_untouched(good_src, tmp_path):
    existing = tmp_path / "out"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        hf_to_mcore(good_src, existing)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    hf_to_mcore(good_src, tmp_path / "mcore")
    with pytest.raises(OutputExistsError):
        mcore_to_hf(tmp_path / "mcore", existing)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


def test_mcore_checkpoint_disagreeing_with_its_config_is_refused(good_src, tmp_path):
    hf_to_mcore(good_src, tmp_path / "mcore")
    config_file = tmp_path / "mcore" / "flexolmo_config.json"
    payload = json.loads(config_file.read_text())
    payload["config"]["intermediate_size"] = 44
    config_file.write_text(json.dumps(payload))
    with pytest.raises(CorruptFileError, match="flexolmo_config.json: .* bytes, .* when written"):
        mcore_to_hf(tmp_path / "mcore", tmp_path / "back")
    (tmp_path / "mcore" / "checksums.json").unlink()  # as a checkpoint from another tool: the layout check
    with pytest.raises(McoreCheckpointError, match="does not match its configuration"):
        mcore_to_hf(tmp_path / "mcore", tmp_path / "back")
    nothing_left_behind(tmp_path, "back")
    with pytest.raises(McoreCheckpointError, match="does not match its configuration"):
        fp.from_mcore(tmp_path / "mcore")


def test_not_a_converted_checkpoint_is_refused(tmp_path):
    (tmp_path / "not-a-checkpoint").mkdir()
    with pytest.raises(McoreCheckpointError, match="flexolmo_config.json"):
        mcore_to_hf(tmp_path / "not-a-checkpoint", tmp_path / "back")


def test_killed_conversion_leaves_no_output(tmp_path):
    """SIGKILL in the middle of writing: the target never appears (only a hidden .partial dir)."""
    import os
    import subprocess
    import sys

    src = save_hf_model(make_hf_model(seed=6, num_hidden_layers=12, num_experts=8), tmp_path / "src")
    target = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "flexolmo_plugin", "convert", "hf-to-mcore", str(src),
                             str(target), "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def writing() -> bool:
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]
        return bool(partial) and any(partial[0].glob("*.distcp"))

    kill_when(proc, writing, what="conversion")
    assert not target.exists()


def test_save_mcore_refuses_an_existing_directory(good_src, tmp_path):
    model = fp.from_hf(good_src)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        fp.save_mcore(model, tmp_path / "taken")
    fp.save_mcore(model, tmp_path / "fresh")
    assert (tmp_path / "fresh" / "flexolmo_config.json").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]
