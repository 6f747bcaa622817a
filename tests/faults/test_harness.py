"""The harness itself: the lab is a working lifecycle, and a refusal check can fail."""

import pytest

from tests.faults.harness import assert_refused, digests, run_cli


def test_lab_commands_succeed(lab, capsys, tmp_path):
    code, err = run_cli(["eval", lab.merged, "--data", f"code={lab.dataset}", "--seq-len", 8], capsys)
    assert code == 0, err
    code, err = run_cli(["opt-out", lab.merged, "--drop", "code", "--out", tmp_path / "out"], capsys)
    assert code == 0, err


def test_assert_refused_detects_a_success_and_a_left_over_output(lab, capsys, tmp_path):
    with pytest.raises(AssertionError, match="exit 0"):
        assert_refused(["opt-out", lab.merged, "--drop", "code", "--out", tmp_path / "out"], capsys,
                       match="anything", workdir=tmp_path)
    before = digests(lab.merged)
    assert before and digests(lab.merged) == before
