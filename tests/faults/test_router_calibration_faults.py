"""calibrate-router / align-router / scale-router refuse what they cannot use, in one line, before writing anything."""

import pytest
import torch

import flexolmo_plugin as fp
from flexolmo_plugin.cli import options
from flexolmo_plugin.conversion.convert import hf_to_mcore
from flexolmo_plugin.errors import ConfigError
from flexolmo_plugin.lifecycle import router_calibration, router_scaling
from flexolmo_plugin.lifecycle.evaluation import evaluate
from tests.faults.harness import assert_refused, run_cli


def test_calibrating_a_three_expert_model_is_refused(lab, tmp_path, tmp_path_factory, capsys):
    """Calibration fits one owner's row against r_pub: only an owner's [public, own] model has one."""
    three = tmp_path_factory.mktemp("three") / "model"
    hf_to_mcore(lab.public_hf, three, num_experts=3)
    assert_refused(["calibrate-router", three, "--own-data", lab.dataset, "--public-data", lab.dataset, "--out",
                    tmp_path / "cal", "--seq-len", 8, "--max-tokens", 64], capsys,
                   match=r"router calibration is for an owner's \[public, own\] model", workdir=tmp_path,
                   inputs=(three, lab.dataset))


def test_a_missing_dataset_is_refused(lab, tmp_path, capsys):
    assert_refused(["calibrate-router", lab.owner, "--own-data", tmp_path / "absent", "--public-data", lab.dataset,
                    "--out", tmp_path / "cal"], capsys, match=r"no Megatron indexed dataset at .*absent",
                   workdir=tmp_path, inputs=(lab.owner, lab.dataset))


def test_an_existing_output_is_refused_before_any_work(lab, tmp_path, capsys):
    (tmp_path / "aligned").mkdir()
    assert_refused(["align-router", lab.merged, "--data", lab.dataset, "--out", tmp_path / "aligned"], capsys,
                   match=r"aligned.* exists", workdir=tmp_path, inputs=(lab.merged, lab.dataset))


def test_scale_router_refuses_a_bad_grid_and_an_existing_output(lab, tmp_path, capsys):
    for grid, match in (("1,-2", "scales must be >= 0"), ("1,x", "expected a number"), ("1,nan", "finite")):
        assert_refused(["scale-router", lab.merged, "--data", lab.dataset, "--out", tmp_path / "scaled", "--grid",
                        grid], capsys, match=match, workdir=tmp_path, inputs=(lab.merged, lab.dataset))
    (tmp_path / "scaled").mkdir()
    assert_refused(["scale-router", lab.merged, "--data", lab.dataset, "--out", tmp_path / "scaled"], capsys,
                   match=r"scaled.* exists", workdir=tmp_path, inputs=(lab.merged, lab.dataset))


def test_scale_router_writes_a_loadable_model_with_r_pub_and_experts_unchanged(lab, tmp_path, capsys):
    import torch

    from flexolmo_plugin.api import from_mcore

    code, err = run_cli(["scale-router", lab.merged, "--data", lab.dataset, "--out", tmp_path / "scaled",
                         "--seq-len", 8, "--max-tokens", 128, "--grid", "0.5,2"], capsys)
    assert code == 0, err
    before, after = from_mcore(lab.merged), from_mcore(tmp_path / "scaled")
    for key, value in before.state_dict().items():
        if torch.is_tensor(value) and "domain_embeddings.1" not in key:
            assert torch.equal(value, after.state_dict()[key]), key


def test_non_finite_router_inputs_name_the_bad_tensor(lab, tmp_path, tmp_path_factory, capsys):
    """Was: "the model's weights are not usable" -- also said when the weights were finite (an overflow)."""
    model = fp.from_mcore(lab.owner)
    with torch.no_grad():
        model.decoder.layers[0].mlp.experts.local_experts[1].linear_fc2.weight[1, 2] = float("nan")
    nan_owner = tmp_path_factory.mktemp("nan_owner") / "model"
    fp.save_mcore(model, nan_owner)
    assert_refused(["calibrate-router", nan_owner, "--own-data", lab.dataset, "--public-data", lab.dataset, "--out",
                    tmp_path / "cal", "--seq-len", 8, "--max-tokens", 64], capsys,
                   match=r"layer 1: non-finite router inputs; its weights are not finite: first bad tensor "
                         r"\S*layers\.0\.mlp\.experts\.local_experts\.1\.linear_fc2\.weight \(1 of",
                   workdir=tmp_path, inputs=(nan_owner, lab.dataset))


def test_the_library_bounds_the_scales_as_the_command_line_does(lab):
    """calibrate_router's scale: above MAX_SCALE the router logits overflow and the model would be blamed; the
    CLI's parse-time bound (also of scale-router --grid) is the same number."""
    assert options.MAX_ROUTER_SCALE == router_calibration.MAX_SCALE
    model = fp.from_mcore(lab.owner)
    windows = torch.randint(0, 300, (4, 8))
    with pytest.raises(ConfigError, match=r"scale must be at most 1000 \(larger router logits overflow\), got 1e\+300"):
        router_calibration.calibrate_router(model, windows, windows, scale=1e300)
    merged = fp.from_mcore(lab.merged)
    with pytest.raises(ConfigError, match=r"windows of 1 token predict nothing: the loss needs seq >= 2"):
        router_scaling.scale_router(merged, windows[:, :1])
    # a grid past the bound is the caller's to try; when it overflows, the refusal says so
    with pytest.raises(ConfigError, match=r"not finite \(nan\) at scales 1e\+38: the scaled router rows or logits "
                                          r"overflow; use a grid of smaller scales \(at most 1000\)"):
        router_scaling.scale_router(merged, windows, grid=(1e38,), sweeps=1)
    with pytest.raises(ConfigError, match=r"seq_len must be an integer >= 2"):
        evaluate(merged, {"code": lab.dataset}, seq_len=1)
