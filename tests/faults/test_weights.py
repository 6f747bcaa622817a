"""Fault injection on weights: non-finite values, duplicate and mismatched packages, bad numbers and names.

The bad checkpoints are made the way they arise: a diverged training run leaves NaN/Inf in a parameter
(loaded with ``from_mcore``, poisoned, saved with ``save_mcore``); a package is copied and only its
manifest ``name`` edited (the manifest's file hashes do not cover the manifest itself); an owner saves
in bf16 while the public model is fp32.  Every case goes through the ``flexolmo`` command and must be
refused with exit 2, one line naming the tensor / package / option, nothing left behind, inputs unchanged.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import flexolmo_plugin as fp
from flexolmo_plugin.conversion.checks import file_sha256
from flexolmo_plugin.errors import ConfigError
from flexolmo_plugin.lifecycle.merge import merge_experts
from flexolmo_plugin.lifecycle.package import PackageError, package_expert
from tests.faults.harness import assert_refused, run_cli


@dataclasses.dataclass(frozen=True)
class Bad:
    """Inputs made bad on purpose, built once per module from the session's lab (never modified)."""

    nan_owner: Path  # NaN in the owner's expert 1 (layer 1 fc2): a diverged expert
    inf_owner: Path  # +Inf in the owner's router row r_1 (layer 0)
    nan_merged: Path  # merged model, NaN in the shared word embeddings
    inf_anchor: Path  # public model, -Inf in the final norm
    nan_package: Path  # a package written with a NaN (before packages were checked), hashes consistent
    renamed_package: Path  # copy of the lab's package, only the manifest name changed
    bf16_package: Path  # packaged from the owner saved in bf16; the public model is fp32
    lying_package: Path  # the lab's fp32 package whose manifest claims bfloat16


def _poisoned(source: Path, target: Path, poison) -> Path:
    model = fp.from_mcore(source)
    with torch.no_grad():
        poison(model)
    fp.save_mcore(model, target)
    return target


def _edit_manifest(package: Path, **changes) -> None:
    path = package / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest, indent=2) + "\n")


@pytest.fixture(scope="module")
def bad(lab, tmp_path_factory) -> Bad:
    root = tmp_path_factory.mktemp("bad_weights")

    def expert_nan(model):
        model.decoder.layers[1].mlp.experts.local_experts[1].linear_fc2.weight[3, 5] = float("nan")

    def row_inf(model):
        model.decoder.layers[0].mlp.router.domain_embeddings[1][7] = float("inf")

    def embedding_nan(model):
        model.embedding.word_embeddings.weight[11, 2] = float("nan")

    def norm_inf(model):
        model.decoder.final_layernorm.weight[0] = float("-inf")

    nan_package = shutil.copytree(lab.package, root / "nan_package")
    weights = load_file(nan_package / "model.safetensors")
    weights["layers.0.linear_fc1.weight"][0, 0] = float("nan")
    save_file(weights, nan_package / "model.safetensors", metadata={"format": "pt"})
    _edit_manifest(nan_package, files={"model.safetensors": file_sha256(nan_package / "model.safetensors")})
    renamed = shutil.copytree(lab.package, root / "renamed_package")
    _edit_manifest(renamed, name="code2")
    lying = shutil.copytree(lab.package, root / "lying_package")
    _edit_manifest(lying, dtype="bfloat16")
    fp.save_mcore(fp.from_mcore(lab.owner, params_dtype=torch.bfloat16), root / "bf16_owner")
    return Bad(
        nan_owner=_poisoned(lab.owner, root / "nan_owner", expert_nan),
        inf_owner=_poisoned(lab.owner, root / "inf_owner", row_inf),
        nan_merged=_poisoned(lab.merged, root / "nan_merged", embedding_nan),
        inf_anchor=_poisoned(lab.anchor, root / "inf_anchor", norm_inf),
        nan_package=nan_package,
        renamed_package=renamed,
        bf16_package=package_expert(root / "bf16_owner", root / "bf16_package", name="code"),
        lying_package=lying,
    )


def _eval(model, lab, *more):
    return ["eval", model, "--data", f"code={lab.dataset}", "--seq-len", 8, *more]


# (argv from lab, bad, out) and the message a user must see
CASES = [
    # non-finite weights: every tool that writes weights refuses them, naming the tensor and its source
    pytest.param(lambda lab, bad, out: ["package-expert", bad.nan_owner, out, "--name", "code"],
                 r"owner checkpoint \S*nan_owner: tensor decoder\.layers\.1\.mlp\.experts\.1\.linear_fc2\.weight "
                 r"has 1 non-finite", id="package-nan-expert"),
    pytest.param(lambda lab, bad, out: ["package-expert", bad.inf_owner, out, "--name", "code"],
                 r"inf_owner: tensor decoder\.layers\.0\.mlp\.router\.weight has 1 non-finite", id="package-inf-row"),
    pytest.param(lambda lab, bad, out: ["opt-out", bad.nan_merged, "--drop", "code", "--out", out],
                 r"checkpoint \S*nan_merged: tensor embedding\.word_embeddings\.weight has 1 non-finite",
                 id="opt-out-nan-shared"),
    pytest.param(lambda lab, bad, out: ["merge", bad.inf_anchor, lab.package, "--out", out],
                 r"public model \S*inf_anchor: tensor decoder\.final_layernorm\.weight has 1 non-finite",
                 id="merge-inf-public"),
    # was: upcycling copied a Megatron public model's NaN/Inf into both experts (exit 0)
    pytest.param(lambda lab, bad, out: ["upcycle", bad.inf_anchor, out, "--public-embedding", lab.embeddings[0],
                                        "--domain-embedding", lab.embeddings[1], "--name", "code"],
                 r"public model \S*inf_anchor: tensor decoder\.final_layernorm\.weight has 1 non-finite",
                 id="upcycle-inf-public"),
    pytest.param(lambda lab, bad, out: ["merge", lab.anchor, bad.nan_package, "--out", out],
                 r"package 'code' \(\S*nan_package\): tensor layers\.0\.linear_fc1\.weight has 1 non-finite",
                 id="merge-nan-package"),
    # eval: a non-finite loss is an error naming the domain and the first bad weight, not a 'nan' row
    pytest.param(lambda lab, bad, out: _eval(bad.nan_owner, lab),
                 r"non-finite loss \(nan\) on domain 'code'; its weights are not finite: first bad tensor "
                 r"\S*local_experts\.1\.linear_fc2\.weight \(1 of", id="eval-nan"),
    # the same expert twice, under two names
    pytest.param(lambda lab, bad, out: ["merge", lab.anchor, lab.package, bad.renamed_package, "--out", out],
                 r"packages 'code' \(\S+\) and 'code2' \(\S*renamed_package\) hold identical weights",
                 id="merge-renamed-copy"),
    # dtype: named as such, not as a "different anchor"
    pytest.param(lambda lab, bad, out: ["merge", lab.anchor, bad.bf16_package, "--out", out],
                 r"dtype mismatch: package dtype bfloat16, public model dtype float32", id="merge-bf16-on-fp32"),
    pytest.param(lambda lab, bad, out: ["merge", lab.anchor, bad.lying_package, "--out", out],
                 r"lying_package: tensor layers\.0\.router_row is float32, the manifest says bfloat16",
                 id="merge-manifest-dtype-lie"),
    # the number of experts is known only from the inputs (0 and negatives are refused at parse time)
    pytest.param(lambda lab, bad, out: ["merge", lab.anchor, lab.package, "--out", out, "--top-k", 3],
                 r"top-k must be in \[1, 2\] \(the number of experts after the merge\), got 3", id="merge-top-k-3"),
]


@pytest.mark.parametrize("argv, match", CASES)
def test_refused(lab, bad, tmp_path, capsys, argv, match):
    args = argv(lab, bad, tmp_path / "out")
    inputs = tuple(a for a in args if isinstance(a, Path) and a.exists())
    assert_refused(args, capsys, match=match, workdir=tmp_path, inputs=inputs)


def test_a_diverged_expert_can_still_be_opted_out_and_excluded(lab, bad, tmp_path, capsys):
    """Only what is written is checked: dropping the NaN expert is the repair, and so is excluding it
    at run time (the reason eval checks the loss, not every weight up front)."""
    code, err = run_cli(["opt-out", bad.nan_owner, "--drop", "code", "--out", tmp_path / "repaired"], capsys)
    assert code == 0, err
    code, err = run_cli(_eval(tmp_path / "repaired", lab), capsys)
    assert code == 0, err
    capsys.readouterr()
    code = run_cli(_eval(bad.nan_owner, lab, "--exclude", "code"), capsys)[0]
    out = capsys.readouterr().out
    assert code == 0 and "nan" not in out.split("mean gate weight")[0], out


def test_the_same_expert_packaged_twice_is_a_duplicate(lab, tmp_path, capsys):
    """Packaging is deterministic, so two packagings of one expert have one content digest."""
    code, err = run_cli(["package-expert", lab.owner, tmp_path / "again", "--name", "again"], capsys)
    assert code == 0, err
    assert_refused(["merge", lab.anchor, lab.package, tmp_path / "again", "--out", tmp_path / "out"], capsys,
                   match="hold identical weights", workdir=tmp_path, inputs=(lab.package, tmp_path / "again"))


# The library checks its own arguments too: the CLI refuses these at parse time, but the demo, notebooks
# and scripts call the functions directly, and a name in a manifest is read back by every merge.
LIBRARY_CASES = [
    *[pytest.param(lambda lab, out, k=k: merge_experts(lab.anchor, [lab.package], out, top_k=k),
                   ConfigError, r"top-k must be in \[1, 2\]", id=f"merge-top-k-{k}") for k in (0, -1, 3, True)],
    pytest.param(lambda lab, out: package_expert(lab.owner, out, name="c", tokens_trained=-5),
                 PackageError, "tokens_trained must be a whole number >= 0, got -5", id="package-negative-tokens"),
    *[pytest.param(lambda lab, out, name=name: package_expert(lab.owner, out, name=name), PackageError,
                   "expert name .* must be 1-64", id=f"package-name-{label}")
      for label, name in (("slash", "a/b"), ("dotdot", ".."), ("inner-dotdot", "a..b"), ("empty", ""),
                          ("long", "x" * 65), ("newline", "code\n"), ("space", "my code"), ("none", None))],
]


@pytest.mark.parametrize("call, error, match", LIBRARY_CASES)
def test_library_refuses(lab, tmp_path, call, error, match):
    with pytest.raises(error, match=match):
        call(lab, tmp_path / "out")
    assert not list(tmp_path.iterdir())
