"""calibrate-router / align-router refuse what they cannot use, in one line, before writing anything."""

from flexolmo_plugin.conversion.convert import hf_to_mcore
from tests.faults.harness import assert_refused


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
