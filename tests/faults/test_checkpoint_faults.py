"""A checkpoint whose description disagrees with its tensors is refused, never reinterpreted."""

import json
import math
import shutil
import warnings

import pytest
import torch

from flexolmo_plugin.conversion.checksums import UnverifiedWarning, verification
from flexolmo_plugin.conversion.convert import mcore_to_hf
from flexolmo_plugin.lifecycle.upcycle import save_embedding, upcycle
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


def _with_model_fields(lab, tmp_path, **fields):
    """A checkpoint with a learned router bias whose configuration was edited (no checksums)."""
    copy = tmp_path / "biased"
    upcycle(lab.public_hf, copy, public_embedding=lab.embeddings[0], domain_embedding=lab.embeddings[1],
            expert_names=("public", "code"), router_bias_init=-1.0)
    (copy / "checksums.json").unlink()
    path = copy / "flexolmo_config.json"
    payload = json.loads(path.read_text())
    payload["config"].update(fields)
    path.write_text(json.dumps(payload))
    return copy


def test_tensors_the_configuration_does_not_describe_are_refused(lab, tmp_path, capsys):
    """Before: the stored learned bias was ignored (the export routed differently from the checkpoint, eval
    too), and so would any tensor the configuration does not name (an expert left out of a merge)."""
    copy = _with_model_fields(lab, tmp_path, router_bias=False)
    for argv in (["convert", "mcore-to-hf", copy, tmp_path / "hf"],
                 ["eval", copy, "--data", f"code={lab.dataset}", "--seq-len", 8],
                 ["package-expert", copy, tmp_path / "pkg", "--name", "code"]):
        assert_refused(argv, capsys, match=r"holds tensors its configuration does not describe \(1: .*domain_biases",
                       workdir=tmp_path, inputs=(copy,))


def test_a_truncated_data_file_without_checksums_is_named_by_every_reader(lab, tmp_path, capsys):
    """Before: loading the model (eval, generate) raised torch's CheckpointException, a BaseException
    that the loader's ``except Exception`` let through as a traceback."""
    copy = lab.copy("owner", tmp_path)
    (copy / "checksums.json").unlink()
    data_file = next(copy.glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[:-1000])
    for argv in (["eval", copy, "--data", f"code={lab.dataset}", "--seq-len", 8],
                 ["convert", "mcore-to-hf", copy, tmp_path / "hf"]):
        assert_refused(argv, capsys, match=r"(loading failed|cannot be read)", workdir=tmp_path, inputs=(copy,))


@pytest.mark.parametrize("field,value,match", [
    # each was read and used: eval gave another model's losses (eps inf), or a name reached file names
    ("rms_norm_eps", math.inf, r"rms_norm_eps must be a finite number > 0, got inf"),
    ("load_balancing_coeff", math.nan, r"load_balancing_coeff must be a finite number >= 0, got nan"),
    ("rope_theta", True, r"rope_theta must be a finite number > 0, got True"),
    ("router_bias", "no", r"router_bias must be true or false, got 'no'"),
    ("expert_names", ["public", "../x"], r"expert name '../x' is not a safe identifier"),
])
def test_configuration_values_are_checked_as_read(field, value, match, lab, tmp_path, capsys):
    copy = lab.copy("merged", tmp_path)
    (copy / "checksums.json").unlink()
    path = copy / "flexolmo_config.json"
    payload = json.loads(path.read_text())
    payload["config"][field] = value
    path.write_text(json.dumps(payload))
    assert_refused(["eval", copy, "--data", f"code={lab.dataset}", "--seq-len", 8], capsys, match=match,
                   workdir=tmp_path, inputs=(copy,))


def test_a_float64_source_is_refused_unless_a_dtype_is_chosen(lab, tmp_path, capsys):
    """Before: hf-to-mcore and upcycle wrote float64 checkpoints that every reader then refused."""
    from safetensors.torch import load_file, save_file

    source = shutil.copytree(lab.public_hf, tmp_path / "f64")
    (source / "checksums.json").unlink(missing_ok=True)
    for path in source.glob("*.safetensors"):
        save_file({k: v.double() for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    match = r"cannot write float64 parameters: a checkpoint holds float32, bfloat16, float16; choose one with --dtype"
    assert_refused(["convert", "hf-to-mcore", source, tmp_path / "m", "--num-experts", 2], capsys, match=match,
                   workdir=tmp_path, inputs=(source,))
    assert_refused(["upcycle", source, tmp_path / "u", "--public-embedding", lab.embeddings[0],
                    "--domain-embedding", lab.embeddings[1], "--name", "code"], capsys, match=match,
                   workdir=tmp_path, inputs=(source,))
    assert run_cli(["convert", "hf-to-mcore", source, tmp_path / "m", "--num-experts", 2, "--dtype", "fp32",
                    "--quiet"], capsys)[0] == 0


def test_an_output_inside_an_input_is_refused(lab, tmp_path, capsys):
    """Before: merge wrote into a package directory (which every later merge then refused: a file its
    manifest does not list) and opt-out into the checkpoint it read."""
    package, merged = lab.copy("package", tmp_path), lab.copy("merged", tmp_path)
    for argv, source in ((["merge", lab.anchor, package, "--out", package / "merged"], package),
                         (["opt-out", merged, "--drop", "code", "--out", merged / "sub"], merged),
                         (["convert", "mcore-to-hf", merged, merged / "hf"], merged)):
        assert_refused(argv, capsys, match=rf"output \S+ is inside the input {source}", workdir=tmp_path,
                       inputs=(source,))
    assert run_cli(["merge", lab.anchor, package, "--out", tmp_path / "ok", "--quiet"], capsys)[0] == 0
