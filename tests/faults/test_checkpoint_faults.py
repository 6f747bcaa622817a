"""A checkpoint whose description disagrees with its tensors is refused, never reinterpreted."""

import json
import warnings

import pytest
import torch

from flexolmo_plugin.conversion.checksums import UnverifiedWarning, verification
from flexolmo_plugin.conversion.convert import mcore_to_hf
from flexolmo_plugin.lifecycle.upcycle import save_embedding
from tests.faults.harness import HIDDEN, assert_refused, run_cli


def _with_config(lab, tmp_path, **changes):
    """A checkpoint whose configuration file was edited; without checksums (as one written by another
    tool), so that the configuration check itself is what must catch it."""
    copy = lab.copy("merged", tmp_path)
    (copy / "checksums.json").unlink(missing_ok=True)
    path = copy / "flexolmo_config.json"
    payload = json.loads(path.read_text())
    payload.update(changes)
    path.write_text(json.dumps(payload))
    return copy


@pytest.mark.parametrize("dtype,match", [
    ("int32", "dtype 'int32' is not a parameter dtype"),  # was: all-zero int32 weights, exit 0
    ("bool", "dtype 'bool' is not a parameter dtype"),  # was: all True
    ("float16", "says dtype float16 but the checkpoint's tensors are float32"),  # was: a silent downcast
    ("bfloat16", "says dtype bfloat16 but the checkpoint's tensors are float32"),
    ("no_such_dtype", "dtype 'no_such_dtype' is not a parameter dtype"),
])
def test_config_dtype_must_match_the_tensors(dtype, match, lab, tmp_path, capsys):
    copy = _with_config(lab, tmp_path, dtype=dtype)
    for argv in (["convert", "mcore-to-hf", copy, tmp_path / "hf"],
                 ["opt-out", copy, "--drop", "code", "--out", tmp_path / "out"]):
        assert_refused(argv, capsys, match=match, workdir=tmp_path, inputs=(copy,))


def _flip_bit(path, offset_fraction=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset_fraction)] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_data_file_is_detected(lab, tmp_path, capsys):
    copy = lab.copy("owner", tmp_path)
    data_file = next(copy.glob("*.distcp"))
    _flip_bit(data_file)
    for argv in (["convert", "mcore-to-hf", copy, tmp_path / "hf"],
                 ["package-expert", copy, tmp_path / "pkg", "--name", "code"],
                 ["eval", copy, "--data", f"code={lab.dataset}", "--seq-len", 8]):
        assert_refused(argv, capsys, match=rf"{data_file.name}: checksum mismatch", workdir=tmp_path, inputs=(copy,))


def test_a_truncated_or_added_file_is_named(lab, tmp_path, capsys):
    copy = lab.copy("owner", tmp_path)
    data_file = next(copy.glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[:-100])
    assert_refused(["convert", "mcore-to-hf", copy, tmp_path / "hf"], capsys,
                   match=rf"{data_file.name}: \d+ bytes, \d+ when written", workdir=tmp_path, inputs=(copy,))
    copy2 = lab.copy("merged", tmp_path)
    (copy2 / "common.pt").write_bytes(b"not part of it")
    assert_refused(["opt-out", copy2, "--drop", "code", "--out", tmp_path / "out"], capsys,
                   match=r"common\.pt: not listed in .*checksums\.json", workdir=tmp_path, inputs=(copy2,))


def test_without_checksums_the_checkpoint_is_read_but_flagged_unverified(lab, tmp_path):
    copy = lab.copy("owner", tmp_path)
    (copy / "checksums.json").unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mcore_to_hf(copy, tmp_path / "hf")
    assert any(issubclass(w.category, UnverifiedWarning) and "unverified" in str(w.message) for w in caught)
    assert (tmp_path / "hf" / "config.json").is_file()


def test_verification_can_be_switched_off(lab, tmp_path):
    copy = lab.copy("owner", tmp_path)
    _flip_bit(next(copy.glob("*.distcp")), 0.9)
    with verification(False), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mcore_to_hf(copy, tmp_path / "hf")
    assert any("not verified (--no-verify)" in str(w.message) for w in caught)


def test_cli_no_verify_reads_a_corrupt_file_and_says_so(lab, tmp_path, capsys):
    copy = lab.copy("owner", tmp_path)
    _flip_bit(next(copy.glob("*.distcp")), 0.9)
    code, err = run_cli(["convert", "mcore-to-hf", copy, tmp_path / "hf", "--quiet", "--no-verify"], capsys)
    assert code == 0, err
    assert "warning: checkpoint" in err and "checksums not verified (--no-verify)" in err


def test_cli_flags_a_checkpoint_without_checksums(lab, tmp_path, capsys):
    copy = lab.copy("owner", tmp_path)
    (copy / "checksums.json").unlink()
    code, err = run_cli(["convert", "mcore-to-hf", copy, tmp_path / "hf", "--quiet"], capsys)
    assert code == 0, err
    assert "warning: checkpoint" in err and "its files are unverified" in err
    assert (tmp_path / "hf" / "checksums.json").is_file(), "what we write from it has checksums again"


def test_a_corrupt_dataset_is_detected_by_eval(lab, tmp_path, capsys):
    copy = lab.copy("dataset", tmp_path)
    (tmp_path / "dataset_copy.checksums.json").write_bytes(
        (lab.dataset.parent / "data.checksums.json").read_bytes().replace(b'"data.', b'"dataset_copy.'))
    _flip_bit(tmp_path / "dataset_copy.bin")
    assert_refused(["eval", lab.merged, "--data", f"code={copy}", "--seq-len", 8], capsys,
                   match=r"dataset_copy\.bin: checksum mismatch", workdir=tmp_path, inputs=(copy,))


def test_a_corrupt_embedding_is_detected_by_upcycle(lab, tmp_path, capsys):
    path = tmp_path / "e.safetensors"
    save_embedding(path, torch.randn(HIDDEN), {})
    assert (tmp_path / "e.safetensors.checksums.json").is_file()
    _flip_bit(path, 0.95)
    assert_refused(["upcycle", lab.public_hf, tmp_path / "out", "--public-embedding", lab.embeddings[0],
                    "--domain-embedding", path], capsys, match=r"e\.safetensors: checksum mismatch",
                   workdir=tmp_path, inputs=(path,))


def test_a_truncated_data_file_without_checksums_is_named(lab, tmp_path, capsys):
    """A checkpoint from another tool has no checksums: a truncated data file is still one line."""
    copy = lab.copy("owner", tmp_path)
    (copy / "checksums.json").unlink()
    data_file = next(copy.glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    assert_refused(["convert", "mcore-to-hf", copy, tmp_path / "hf"], capsys,
                   match=r"tensor \S+ cannot be read .*a data file is truncated or damaged", workdir=tmp_path,
                   inputs=(copy,))
