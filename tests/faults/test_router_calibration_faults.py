"""calibrate-router / align-router / scale-router refuse what they cannot use, in one line, before writing anything."""

from flexolmo_plugin.conversion.convert import hf_to_mcore
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
