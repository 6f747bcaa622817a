"""eval and the router steps: the window messages say which limit is short (the token budget or the
dataset); a damaged dataset, a repeated domain, options that would be ignored and plot paths that exist
are refused in one line before any work."""

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from flexolmo_plugin.cli import main
from flexolmo_plugin.lifecycle.data import check_indexed_dataset, prepare_dataset
from flexolmo_plugin.lifecycle.evaluation import read_windows
from tests.faults.harness import assert_refused, listing, run_cli


def test_a_budget_below_one_window_names_max_tokens(lab, tmp_path, capsys):
    assert_refused(["eval", lab.merged, "--data", f"code={lab.dataset}", "--seq-len", 8, "--max-tokens", 4], capsys,
                   match=r"--max-tokens 4 is less than one window of --seq-len 8; raise --max-tokens",
                   workdir=tmp_path, inputs=(lab.merged, lab.dataset))


def test_a_dataset_below_one_window_names_the_dataset(lab, tmp_path, capsys):
    docs = tmp_path / "short.jsonl"
    docs.write_text(json.dumps({"text": "a b"}) + "\n")
    prepare_dataset(docs, tmp_path / "short", tokenizer_dir=lab.tokenizer)
    assert_refused(["eval", lab.merged, "--data", f"code={tmp_path / 'short'}", "--seq-len", 32], capsys,
                   match=r"short: \d+ tokens, fewer than one window of 32; lower --seq-len",
                   workdir=tmp_path, inputs=(lab.merged,))


# ------------------------------------------------------------------ damaged datasets (no checksums to catch them)
def _damaged(lab, root: Path, damage: str) -> Path:
    """A copy of the lab's dataset without its checksums sidecar (as Bridge or another tool writes one), damaged."""
    root.mkdir()
    prefix = lab.copy("dataset", root)
    idx, bin_ = prefix.with_name(prefix.name + ".idx"), prefix.with_name(prefix.name + ".bin")
    if damage == "short-idx":  # was: ValueError: buffer is smaller than requested size
        idx.write_bytes(idx.read_bytes()[:100])
    elif damage == "garbage-idx":  # was: AssertionError: bad header, cannot read
        idx.write_bytes(bytes(range(256)) * 4)
    elif damage == "short-bin":  # was: a traceback once enough tokens were read
        bin_.write_bytes(bin_.read_bytes()[:40])
    elif damage == "garbage-bin":  # right size, ids far beyond the vocabulary: was an IndexError in the embedding
        bin_.write_bytes(b"\xff" * bin_.stat().st_size)
    elif damage == "pointer":  # the second sequence does not start where the first ends
        data = bytearray(idx.read_bytes())
        sequences = struct.unpack("<Q", data[18:26])[0]
        offset = 34 + 4 * sequences + 8
        data[offset:offset + 8] = struct.pack("<q", 2)
        idx.write_bytes(bytes(data))
    return prefix


DAMAGE = [
    ("short-idx", r"dataset_copy\.idx: 100 bytes, but its header declares \d+ sequences"),
    ("garbage-idx", r"dataset_copy\.idx: not a Megatron indexed-dataset index \(no MMIDIDX header\)"),
    ("short-bin", r"dataset_copy\.bin: 40 bytes, but dataset_copy\.idx describes \d+"),
    ("garbage-bin", r"dataset_copy\.bin: token id 65535 is outside the model's vocabulary of 320"),
    ("pointer", r"dataset_copy\.idx: sequence 1 does not start where the one before it ends"),
]
READERS = {
    "eval": lambda lab, data, out: ["eval", lab.merged, "--data", f"code={data}", "--seq-len", 8,
                                    "--max-tokens", 10_000],
    "calibrate-router": lambda lab, data, out: ["calibrate-router", lab.owner, "--own-data", lab.dataset,
                                                "--public-data", data, "--out", out, "--seq-len", 8],
    "align-router": lambda lab, data, out: ["align-router", lab.merged, "--data", data, "--out", out, "--seq-len", 8],
    "scale-router": lambda lab, data, out: ["scale-router", lab.merged, "--data", data, "--out", out,
                                            "--seq-len", 8],
}


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize(("damage", "match"), DAMAGE, ids=[d[0] for d in DAMAGE])
def test_a_damaged_dataset_is_refused_in_one_line_by_every_reader(lab, tmp_path, capsys, reader, damage, match):
    data = _damaged(lab, tmp_path / "data", damage)
    work = tmp_path / "work"
    work.mkdir()
    err = assert_refused(READERS[reader](lab, data, work / "out"), capsys, match=match, workdir=work,
                         inputs=(lab.merged, lab.owner, lab.dataset, data))
    assert len(err.strip().splitlines()) == 1, err  # not even the "unverified" warning before it


def test_the_dataset_check_accepts_what_prepare_data_writes(lab):
    assert check_indexed_dataset(lab.dataset) == np.uint16
    windows = read_windows(lab.dataset, seq_len=8, max_tokens=10_000, vocab_size=320)
    assert windows.shape[1] == 8 and int(windows.max()) < 320


# ------------------------------------------------------------------ the command line's own options
def _eval(lab, *more):
    return ["eval", lab.merged, "--data", f"code={lab.dataset}", "--seq-len", 8, "--max-tokens", 32, *more]


def test_a_repeated_domain_name_is_refused(lab, tmp_path, capsys):
    """Was: the second --data cpp=... silently replaced the first."""
    argv = ["eval", lab.merged, "--data", f"code={lab.dataset}", f"code={tmp_path / 'other'}", "--seq-len", 8]
    assert_refused(argv, capsys, match=r"--data names 'code' twice \(\S+data and \S+other\)", workdir=tmp_path,
                   inputs=(lab.merged, lab.dataset))


def test_a_repeated_model_is_refused(lab, tmp_path, capsys):
    argv = ["eval", lab.merged, lab.merged, "--data", f"code={lab.dataset}", "--seq-len", 8]
    assert_refused(argv, capsys, match=r"a model is given twice", workdir=tmp_path, inputs=(lab.merged,))


@pytest.mark.parametrize(("models", "options", "match"), [
    # was: exit 0 with both options silently ignored
    (1, ["--public", "nope", "--composed", "{merged}"], r"--public and --composed compare several models"),
    (1, ["--composed", "{merged}"], r"--public and --composed compare several models"),
    # was: --composed alone (or --public alone) printed no efficiency and said nothing
    (2, ["--composed", "{merged}"], r"--composed needs --public: the composition efficiency compares"),
    (2, ["--public", "{anchor}"], r"--public needs --composed"),
    (2, ["--public", "{anchor}", "--composed", "nope"], r"--composed nope is not among the evaluated models"),
    (2, ["--public", "{merged}", "--composed", "{merged}"], r"--public and --composed name the same model"),
])
def test_public_and_composed_are_refused_where_they_would_be_ignored(lab, tmp_path, capsys, models, options, match):
    dirs = [lab.merged, lab.anchor][:models]
    options = [o.format(merged=lab.merged, anchor=lab.anchor) for o in options]
    assert_refused(["eval", *dirs, "--data", f"code={lab.dataset}", "--seq-len", 8, *options], capsys, match=match,
                   workdir=tmp_path, inputs=(lab.merged, lab.anchor))


def test_composition_efficiency_is_printed_for_the_models_named(lab, capsys, monkeypatch):
    """--public and --composed match their MCORE_DIR however it is spelled; the efficiency is printed
    (or said to be undefined), never a bare 'nan%'."""
    monkeypatch.chdir(lab.root)
    capsys.readouterr()
    code = main(["eval", str(lab.merged), str(lab.anchor), "--data", f"code={lab.dataset}", "--seq-len", "8",
                 "--max-tokens", "32", "--public", "anchor", "--composed", f"./{lab.merged.name}"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(rf"composition efficiency of {re.escape(str(lab.merged))}: (-?\d+\.\d%|undefined \(the oracle)",
                     out), out
    assert "nan%" not in out


# ------------------------------------------------------------------ --plot
def test_an_existing_plot_is_refused_before_any_work(lab, tmp_path, capsys):
    """Was: fig.savefig replaced the file (and wrote it in place, non-atomically)."""
    taken = tmp_path / "routing.png"
    taken.write_bytes(b"mine")
    assert_refused(_eval(lab, "--plot", taken), capsys, match=r"output \S*routing\.png already exists",
                   workdir=tmp_path, inputs=(taken, lab.merged))


@pytest.mark.parametrize("name", ["routing", "routing.xyz"])
def test_a_plot_without_an_image_suffix_is_refused(lab, tmp_path, capsys, name):
    """Was: matplotlib appended .png to a bare name (writing another file than the one named), or
    raised ValueError on an unknown suffix after the whole evaluation."""
    assert_refused(_eval(lab, "--plot", tmp_path / name), capsys, match=r"routing(\.xyz)?: (no suffix|suffix \.xyz); "
                   r"the suffix names the image format", workdir=tmp_path, inputs=(lab.merged,))


def test_an_existing_numbered_plot_is_refused_before_any_work(lab, tmp_path, capsys):
    (tmp_path / "q-2.svg").write_text("mine")
    argv = ["eval", lab.merged, lab.anchor, "--data", f"code={lab.dataset}", "--seq-len", 8, "--plot",
            tmp_path / "q.svg"]
    assert_refused(argv, capsys, match=r"q-2\.svg already exists", workdir=tmp_path,
                   inputs=(lab.merged, lab.anchor, tmp_path / "q-2.svg"))


def test_plots_of_several_models_go_beside_the_path_named_with_its_suffix(lab, tmp_path, capsys, monkeypatch):
    """Was: ``--plot ../plots/q.svg`` wrote q-1.png and q-2.png into the current directory."""
    (tmp_path / "cwd").mkdir()
    (tmp_path / "plots").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    code, err = run_cli(["eval", lab.merged, lab.anchor, "--data", f"code={lab.dataset}", "--seq-len", 8,
                         "--max-tokens", 32, "--plot", "../plots/q.svg"], capsys)
    assert code == 0, err
    assert listing(tmp_path / "cwd") == set()
    assert listing(tmp_path / "plots") == {"q-1.svg", "q-2.svg"}
    assert (tmp_path / "plots" / "q-1.svg").read_bytes().lstrip().startswith(b"<?xml")
