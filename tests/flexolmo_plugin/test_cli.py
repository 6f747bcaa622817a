"""The ``flexolmo`` command line: parity check, exit codes, option checks, OS errors as messages."""

import argparse
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flexolmo_plugin.cli import (
    EXIT_BAD_INPUT,
    EXIT_CHECK_FAILED,
    EXIT_OK,
    build_parser,
    describe_os_error,
    environment_error,
    main,
    options,
    run_command,
)
from tests.support import make_hf_model, save_hf_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_hf_model(make_hf_model(seed=2), tmp_path_factory.mktemp("cli") / "hf")


def test_help_lists_commands_and_exit_codes():
    flexolmo = shutil.which("flexolmo", path=str(Path(sys.executable).parent))
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


# ------------------------------------------------------------------ parse-time checks (cli.options)
def test_sizes_parse_with_and_without_units():
    assert options.size("5GB") == 5 * 2**30
    assert options.size("1.5 mb") == 3 * 2**19
    assert options.size("1048576") == 2**20
    assert options.size("512B") == 512
    for bad in ("abc", "", "0", "-1GB", "inf", "nanKB", "5XB", "0.5B"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a size"):
            options.size(bad)


def test_names_are_one_plain_path_component():
    for good in ("code", "python-3.12", "owner_7", "A", "x" * 64):
        assert options.safe_name(good) == good
    for bad in ("a/b", "..", "a..b", ".hidden", "-x", "", "x" * 65, "a b", "a\\b", "é"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not a valid name"):
            options.safe_name(bad)


def test_valid_option_values_still_parse():
    args = build_parser().parse_args(["select-proxy", "o.jsonl", "p.jsonl", "--out", "x.json", "--name", "code.v2",
                                      "--embedder", "e", "--fraction", "1", "--min-probability", "0",
                                      "--seed", str(2**32 - 1)])
    assert (args.fraction, args.min_probability, args.seed, args.name) == (1.0, 0.0, 2**32 - 1, "code.v2")
    args = build_parser().parse_args(["package-expert", "o", "p", "--name", "code", "--tokens-trained", "0"])
    assert args.tokens_trained == 0 and args.expert == 1
    args = build_parser().parse_args(["convert", "mcore-to-hf", "a", "b"])
    assert args.max_shard_size == 5 * 2**30  # the default goes through the same check


def test_a_usage_error_is_one_line_and_exit_2_from_the_console_script():
    """argparse's own refusals used to print the whole usage and raise SystemExit(2); now one line."""
    flexolmo = shutil.which("flexolmo", path=str(Path(sys.executable).parent))
    done = subprocess.run([flexolmo, "eval", "m", "--data", "a=b", "--seq-len", "0"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == EXIT_BAD_INPUT
    assert done.stderr.splitlines() == [
        "error: argument --seq-len: must be an integer >= 2 (the loss predicts each token from the ones before "
        "it), got 0 (see 'flexolmo eval --help')"]


def test_embed_domain_for_model_without_hidden_size_is_refused(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "olmo2"}')
    code = main(["embed-domain", str(tmp_path / "docs.jsonl"), str(tmp_path / "e.safetensors"), "--model",
                 str(tmp_path / "model"), "--for-model", str(tmp_path / "model")])
    assert code == EXIT_BAD_INPUT  # was a KeyError traceback
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "has no integer 'hidden_size'" in err, err


# --------------------------------------------------------------------- OS errors: message or bug
def test_os_errors_are_described_with_the_output_path():
    out = Path("/data/out")
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a write() on an open file names no file
    assert describe_os_error(full, out) == (
        "cannot write /data/out: No space left on device (ENOSPC; nothing was written)")
    hidden = PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/.out.partial-12-ab/x/y.distcp")
    assert describe_os_error(hidden, out).startswith("cannot write /data/out: Permission denied (EACCES")
    reading = PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/models/in/config.json")
    assert describe_os_error(reading, out).startswith("cannot access /models/in/config.json: Permission denied")
    exists = OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), "/data/out")
    assert describe_os_error(exists, out).startswith("/data/out already exists; choose a new path")


def test_os_errors_inside_torch_checkpoint_errors_are_found_and_bugs_are_not():
    from torch.distributed.checkpoint.api import CheckpointException

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert environment_error(CheckpointException("write", {0: (full, None)})) is full
    assert environment_error(CheckpointException("write", {0: (KeyError("x"), None)})) is None
    assert environment_error(CheckpointException("write", {0: (full, None), 1: (KeyError("x"), None)})) is None
    wrapped = RuntimeError("writer failed")
    wrapped.__cause__ = full
    assert environment_error(wrapped) is full
    during = KeyError("a bug while handling a full disk")
    during.__context__ = full  # raised *while handling* it: a bug of its own, keeps its traceback
    assert environment_error(during) is None
    assert environment_error(OSError(errno.EIO, os.strerror(errno.EIO))) is None  # hardware: worth a report
    assert environment_error(ValueError("x")) is None


@pytest.mark.parametrize("bug", [KeyError("bug"), OSError(errno.EIO, "Input/output error"), RuntimeError("x")])
def test_a_bug_keeps_its_traceback(bug):
    """Anything that is not a refusal propagates out of the command runner, as it was raised."""
    args = build_parser().parse_args(["router-mix", "p.jsonl", "s.json", "--out", "m.jsonl"])

    def broken(_args):
        raise bug

    args.func = broken
    with pytest.raises(type(bug)) as raised:
        run_command(args)
    assert raised.value is bug
