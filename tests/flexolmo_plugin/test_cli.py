"""The ``flexolmo`` command line: parity check and exit codes."""

import shutil
import subprocess
import sys

import pytest

from flexolmo_plugin.cli import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_OK, main
from tests.support import make_hf_model, save_hf_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_hf_model(make_hf_model(seed=2), tmp_path_factory.mktemp("cli") / "hf")


def test_help_lists_commands_and_exit_codes():
    flexolmo = shutil.which("flexolmo", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert flexolmo, "the flexolmo console script is installed with the package"
    done = subprocess.run([flexolmo, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "parity" in done.stdout and "Exit codes" in done.stdout


def test_parity_passes_on_a_converted_model(hf_dir, capsys, megatron_single_process):
    assert main(["parity", str(hf_dir), "--tokens", "12"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "max  |Δlogit|" in out and out.strip().endswith("PASS")


def test_parity_fails_above_tolerance(hf_dir, capsys, megatron_single_process):
    # bf16 weights differ from the fp32 reference by ~1e-3 (measured), far above 1e-4
    assert main(["parity", str(hf_dir), "--tokens", "12", "--dtype", "bf16"]) == EXIT_CHECK_FAILED
    assert "FAIL" in capsys.readouterr().out


def test_bad_input_exits_2_with_a_message(tmp_path, capsys):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    assert main(["parity", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "pickle" in capsys.readouterr().err
    assert main(["parity", str(tmp_path / "missing")]) == EXIT_BAD_INPUT
