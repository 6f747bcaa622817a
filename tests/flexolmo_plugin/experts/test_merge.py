"""Expert packages, merge and opt-out, on real checkpoints (Megatron torch_dist + safetensors)."""

import json
import re
import shutil
import warnings

import pytest
import torch

import flexolmo_plugin as fp
from flexolmo_plugin.lifecycle.data import load_tokenizer
from flexolmo_plugin.lifecycle.merge import merge_experts
from flexolmo_plugin.lifecycle.opt_out import exclude_experts, opt_out
from flexolmo_plugin.lifecycle.package import PackageError, load_package, package_expert
from flexolmo_plugin.lifecycle.upcycle import upcycle
from tests.flexolmo_plugin.experts.helpers import (
    IDS,
    OWNERS,
    H,
    dense_model,
    embedding,
    make_owner,
)
from tests.support import hf_reference, make_tokenizer


def test_package_manifest_records_what_was_shared(world):
    root, anchor, owners, packages, merged = world
    package = load_package(packages["math"])
    manifest = package.manifest
    assert manifest["name"] == "math" and manifest["tokens_trained"] == 2000
    assert manifest["model"]["hidden_size"] == H and manifest["source_expert"] == 1
    assert len(manifest["anchor"]["sha256"]) == 64 and manifest["anchor"]["tensors"]
    assert set(manifest["files"]) == {"model.safetensors"}
    assert sorted(package.tensors.keys())[:3] == ["layers.0.linear_fc1.weight", "layers.0.linear_fc2.weight",
                                                  "layers.0.router_row"]
    package.close()


def test_merged_model_with_all_but_one_owner_masked_is_that_owners_model(world):
    root, anchor, owners, packages, merged = world
    config = json.loads((merged / "flexolmo_config.json").read_text())["config"]
    assert config["expert_names"] == ["public", *OWNERS] and config["num_experts"] == 4 and config["top_k"] == 4
    model = fp.from_mcore(merged, dispatcher="allgather")
    for name in OWNERS:
        exclude_experts(model, [n for n in OWNERS if n != name])
        own = fp.logits(fp.from_mcore(owners[name]), IDS)
        assert (fp.logits(model, IDS) - own).abs().max().item() <= 1e-5, name
    exclude_experts(model, None)


def test_physical_opt_out_equals_the_runtime_mask_and_leaves_no_trace(world):
    root, anchor, owners, packages, merged = world
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt_out(merged, root / "without_math", drop=["math"])
    assert any("top-k 4 exceeds the 3 remaining experts" in str(w.message) for w in caught)
    physical = fp.from_mcore(root / "without_math")
    assert physical.flexolmo_config.expert_names == ("public", "code", "news")
    masked = fp.from_mcore(merged, dispatcher="allgather")
    exclude_experts(masked, ["math"])
    assert (fp.logits(physical, IDS) - fp.logits(masked, IDS)).abs().max().item() <= 1e-5
    # no 64-byte window of the math expert's weights survives in any output file
    package = load_package(packages["math"])
    windows = []
    for key in ("layers.0.linear_fc1.weight", "layers.1.linear_fc2.weight", "layers.1.router_row"):
        raw = package.get(key).contiguous().view(torch.uint8).numpy().tobytes()
        windows += [raw[i:i + 64] for i in range(0, len(raw) - 64, max(64, len(raw) // 8))]
    package.close()
    blobs = [p.read_bytes() for p in (root / "without_math").rglob("*") if p.is_file()]
    assert windows and not any(w in blob for w in windows for blob in blobs)
    merged_blobs = [p.read_bytes() for p in merged.rglob("*") if p.is_file()]
    assert any(windows[0] in blob for blob in merged_blobs), "the search must find the expert where it is"


def test_merge_refuses_bad_packages_and_writes_nothing(world, tmp_path):
    root, anchor, owners, packages, merged = world
    # an expert trained against another public model (a different public router row r_pub)
    other_anchor = tmp_path / "other_anchor"
    upcycle(root / "dense", other_anchor, public_embedding=embedding(tmp_path / "x.npy", 99),
            domain_embedding=root / "e1.npy", router_bias_init=None)
    stranger = package_expert(make_owner(other_anchor, tmp_path / "stranger", 5), tmp_path / "pkg_s", name="stranger")
    with pytest.raises(
        PackageError, match=r"different anchor: first differing tensor decoder\.layers\.0\.mlp\.router\.weight\[0\]"
    ) as refused:
        merge_experts(anchor, [packages["code"], stranger], tmp_path / "out")
    # the digests shown are that tensor's own, so they differ (not the combined ones, which hide what differs)
    digests = re.search(r"\(package ([0-9a-f]{12})…, public ([0-9a-f]{12})…\)$", str(refused.value))
    assert digests and digests[1] != digests[2], str(refused.value)
    # tampered package
    tampered = tmp_path / "pkg_t"
    import shutil

    shutil.copytree(packages["news"], tampered)
    data = bytearray((tampered / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (tampered / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(PackageError, match="tampered or corrupt"):
        merge_experts(anchor, [tampered], tmp_path / "out")
    # duplicate names
    with pytest.raises(PackageError, match=r"named \['code'\]"):
        merge_experts(anchor, [packages["code"], packages["code"]], tmp_path / "out")
    # a package from a model of another width
    wide = tmp_path / "wide_anchor"
    upcycle(
        dense_model(tmp_path / "dense64", hidden=60),
        wide,
        public_embedding=embedding(tmp_path / "w0.npy", 0, 60),
        domain_embedding=embedding(tmp_path / "w1.npy", 1, 60),
        router_bias_init=None,
    )
    wide_owner = package_expert(wide, tmp_path / "pkg_w", name="wide")
    with pytest.raises(PackageError, match="hidden_size 60"):
        merge_experts(anchor, [wide_owner], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_opt_out_refuses_the_public_expert_and_unknown_names(world, tmp_path):
    root, anchor, owners, packages, merged = world
    with pytest.raises(PackageError, match="public expert"):
        opt_out(merged, tmp_path / "x", drop=["public"])
    with pytest.raises(PackageError, match=r"no experts named \['legal'\]"):
        opt_out(merged, tmp_path / "x", drop=["legal"])
    with pytest.raises(PackageError, match=r"expert 'math' is named twice"):  # was: recorded twice as opted out
        opt_out(merged, tmp_path / "x", drop=["math", "math"])
    assert not (tmp_path / "x").exists()


def _as_training_save(checkpoint, save_dir, tokenizer):
    """``checkpoint`` laid out as a Megatron-Bridge save directory, whose tokenizer training writes
    into ``iter_*/tokenizer`` (beside an empty ``tokenizer/`` in an older, unfinished iteration)."""
    shutil.copytree(checkpoint, save_dir / "iter_0000004")
    shutil.copytree(tokenizer, save_dir / "iter_0000004" / "tokenizer", dirs_exist_ok=True)
    (save_dir / "iter_0000002" / "tokenizer").mkdir(parents=True)
    (save_dir / "latest_checkpointed_iteration.txt").write_text("4")
    return save_dir


def test_checkpoints_made_from_others_keep_the_tokenizer_and_provenance(world, tmp_path):
    """Before: a training save directory's tokenizer (in iter_*) was not found by mcore-to-hf or upcycle,
    merge and opt-out wrote none, and the router steps (save_mcore) kept neither the tokenizer nor the
    provenance record, so the README's coordinator steps lost both."""
    from flexolmo_plugin.conversion.convert import mcore_to_hf
    from flexolmo_plugin.lifecycle.generation import checkpoint_tokenizer
    from flexolmo_plugin.lifecycle.provenance import verify_model

    root, anchor, owners, packages, merged = world
    tokenizer = make_tokenizer(tmp_path / "tok")
    save = _as_training_save(anchor, tmp_path / "public", tokenizer)
    mcore_to_hf(save, tmp_path / "public-hf")
    assert (tmp_path / "public-hf" / "tokenizer.json").read_bytes() == (tokenizer / "tokenizer.json").read_bytes()
    upcycle(save, tmp_path / "start", public_embedding=embedding(tmp_path / "e0.npy", 0),
            domain_embedding=embedding(tmp_path / "e1.npy", 1), router_bias_init=None)
    merge_experts(save, [packages[n] for n in OWNERS], tmp_path / "merged")
    fp.save_mcore(fp.from_mcore(tmp_path / "merged"), tmp_path / "routed", carry_from=tmp_path / "merged")
    opt_out(tmp_path / "routed", tmp_path / "without", drop=["news"])
    mcore_to_hf(tmp_path / "without", tmp_path / "without-hf")
    for made in ("start", "merged", "routed", "without"):
        assert (tmp_path / made / "tokenizer" / "tokenizer.json").is_file(), made
        assert checkpoint_tokenizer(tmp_path / made).encode("def add") == load_tokenizer(tokenizer).encode("def add")
    assert (tmp_path / "without-hf" / "tokenizer.json").is_file()
    for made in ("routed", "without", "without-hf"):
        assert (tmp_path / made / "provenance.json").is_file(), made
    assert verify_model(tmp_path / "routed").consistent
    assert "news" in [e["name"] for e in json.loads((tmp_path / "without" / "provenance.json").read_text())["removed"]]
    fp.save_mcore(fp.from_mcore(merged), tmp_path / "plain")  # without carry_from: the tensors only
    assert not (tmp_path / "plain" / "provenance.json").exists() and not (tmp_path / "plain" / "tokenizer").exists()


def test_merged_model_exports_to_transformers_with_identical_logits(world, tmp_path):
    from transformers import AutoModelForCausalLM

    from flexolmo_plugin.conversion.convert import mcore_to_hf

    root, anchor, owners, packages, merged = world
    mcore_to_hf(merged, tmp_path / "hf")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert reference.config.num_experts == 4
    ref, _ = hf_reference(reference, IDS)
    assert (fp.logits(fp.from_mcore(merged), IDS) - ref).abs().max().item() <= 1e-5


def test_cli_package_merge_opt_out(world, tmp_path, capsys):
    from flexolmo_plugin.cli import EXIT_BAD_INPUT, EXIT_OK, main

    root, anchor, owners, packages, merged = world
    assert main(["package-expert", str(owners["code"]), str(tmp_path / "pkg"), "--name", "code2"]) == EXIT_OK
    assert (
        main(
            [
                "merge",
                str(anchor),
                str(tmp_path / "pkg"),
                str(packages["news"]),
                "--out",
                str(tmp_path / "m"),
                "--top-k",
                "2",
                "--quiet",
            ]
        )
        == EXIT_OK
    )
    assert fp.from_mcore(tmp_path / "m").flexolmo_config.expert_names == ("public", "code2", "news")
    assert main(["opt-out", str(tmp_path / "m"), "--drop", "news", "--out", str(tmp_path / "o"), "--quiet"]) == EXIT_OK
    assert (
        main(["merge", str(anchor), str(packages["code"]), str(packages["code"]), "--out", str(tmp_path / "bad")])
        == EXIT_BAD_INPUT
    )
    assert "unique" in capsys.readouterr().err


def test_export_with_a_router_bias_needs_the_flag_and_reports_the_change(world, tmp_path, capsys):
    from flexolmo_plugin.cli import EXIT_BAD_INPUT, EXIT_OK, main
    from flexolmo_plugin.conversion.convert import mcore_to_hf
    from flexolmo_plugin.conversion.mcore_io import McoreCheckpointError

    root, anchor, owners, packages, merged = world
    model = fp.from_mcore(merged)
    config = model.flexolmo_config.replace(router_bias=True)
    biased = fp.build_model(config)
    biased.load_state_dict(
        {**model.state_dict(), **{k: v for k, v in biased.state_dict().items() if "domain_biases" in k}}
    )
    with torch.no_grad():
        for layer in biased.decoder.layers:
            layer.mlp.router.domain_biases[1].fill_(-3.0)  # math's logit lowered by 3
    fp.save_mcore(biased, tmp_path / "biased")
    with pytest.raises(McoreCheckpointError, match="--drop-router-bias"):
        mcore_to_hf(tmp_path / "biased", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert (
        main(["convert", "mcore-to-hf", str(tmp_path / "biased"), str(tmp_path / "hf2"), "--quiet"]) == EXIT_BAD_INPUT
    )
    assert (
        main(
            ["convert", "mcore-to-hf", str(tmp_path / "biased"), str(tmp_path / "hf3"), "--quiet", "--drop-router-bias"]
        )
        == EXIT_OK
    )
    out = capsys.readouterr().out
    change = float(out.split("max |Δlogit| vs the Megatron model on random tokens = ")[1].split()[0])
    assert change > 1e-3
