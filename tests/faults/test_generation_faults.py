"""``flexolmo generate`` and ``eval --attribution``: every bad input is one line, exit 2, nothing written;
a good run writes exactly its two JSON Lines files."""

import json
import re

import pytest
import torch

import flexolmo_plugin as fp
from flexolmo_plugin.cli import main
from tests.faults.harness import assert_refused, listing, run_cli


def _prompts(tmp_path, *lines: str):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize(("options", "match"), [
    ([], r"one of the arguments --prompt --prompts is required"),
    (["--prompt", "x", "--max-new-tokens", "0"], r"argument --max-new-tokens: must be an integer >= 1, got 0"),
    (["--prompt", "x", "--max-new-tokens", "many"], r"argument --max-new-tokens: expected an integer, got 'many'"),
    (["--prompt", "x", "--temperature", "-1"], r"argument --temperature: must be >= 0 \(0 = greedy\), got -1"),
    (["--prompt", "x", "--temperature", "nan"], r"argument --temperature: expected a finite number, got 'nan'"),
    (["--prompt", "x", "--temperature", "1", "--top-p", "0"], r"argument --top-p: must be in \(0, 1\], got 0"),
    (["--prompt", "x", "--temperature", "1", "--top-p", "1.5"], r"argument --top-p: must be in \(0, 1\], got 1.5"),
    (["--prompt", "x", "--temperature", "1", "--seed", "-3"], r"argument --seed: must be an integer in \[0, "),
    (["--prompt", "x", "--top-p", "0.9"], r"--top-p and --seed only apply when sampling: give --temperature > 0"),
    (["--prompt", "x", "--seed", "1"], r"--top-p and --seed only apply when sampling"),
    (["--prompt", "x", "--exclude", "../x"], r"argument --exclude: '../x' is not a valid name"),
])
def test_bad_options_are_refused_at_parse_time(lab, tmp_path, capsys, options, match):
    assert_refused(["generate", lab.merged, *options], capsys, match=match, workdir=tmp_path, inputs=(lab.merged,))


@pytest.mark.parametrize(("lines", "match"), [
    (['{"prompt": "def add"}', '{"prompt": "x"'], r"prompts.jsonl:2: not valid JSON"),
    (['{"text": "def add"}'], r"prompts.jsonl:1: expected an object with a string field 'prompt'"),
    (['{"prompt": ""}'], r"prompts.jsonl:1: the prompt is empty"),
    (['["def"]'], r"prompts.jsonl:1: expected a JSON object"),
    ([""], r"prompts.jsonl: no prompts"),
])
def test_bad_prompt_files_name_file_and_line(lab, tmp_path, capsys, lines, match):
    prompts = _prompts(tmp_path, *lines)
    assert_refused(["generate", lab.merged, "--prompts", prompts, "--tokenizer", lab.tokenizer], capsys, match=match,
                   workdir=tmp_path, inputs=(lab.merged, prompts))


def test_inputs_the_model_cannot_take(lab, tmp_path, capsys):
    base = ["generate", lab.merged, "--prompt", "def add"]
    kept = dict(workdir=tmp_path, inputs=(lab.merged, lab.tokenizer))
    assert_refused(base, capsys, match=r"merged holds no tokenizer/ .*pass --tokenizer DIR", **kept)
    base += ["--tokenizer", lab.tokenizer, "--max-new-tokens", "5"]
    assert_refused([*base, "--exclude", "nope"], capsys, match=r"no experts named \['nope'\]; the model has", **kept)
    assert_refused([*base, "--exclude", "public"], capsys, match=r"the public expert .* cannot be opted out", **kept)
    assert_refused([*base, "--max-new-tokens", "100"], capsys,
                   match=r"prompt 0 has \d+ tokens; with 100 new tokens that exceeds the model's context of 64", **kept)


def test_outputs_are_never_overwritten(lab, tmp_path, capsys):
    taken = tmp_path / "taken.jsonl"
    taken.write_text("mine\n")
    base = ["generate", lab.merged, "--prompt", "def add", "--tokenizer", lab.tokenizer]
    kept = dict(workdir=tmp_path, inputs=(lab.merged, taken))
    assert_refused([*base, "--out", taken], capsys, match=r"output .*taken.jsonl already exists", **kept)
    assert_refused([*base, "--attribution", taken], capsys, match=r"taken.jsonl already exists", **kept)
    assert_refused([*base, "--out", tmp_path / "a.jsonl", "--attribution", tmp_path / "a.jsonl"], capsys,
                   match=r"--out and --attribution must be different files", **kept)
    assert_refused(["eval", lab.merged, "--data", f"code={lab.dataset}", "--seq-len", 8, "--attribution", taken],
                   capsys, match=r"taken.jsonl already exists", **kept)


def test_generate_and_eval_write_their_records(lab, tmp_path, capsys):
    out, attribution = tmp_path / "out.jsonl", tmp_path / "attr.jsonl"
    code, err = run_cli(["generate", lab.merged, "--prompt", "def add", "--prompt", "the quick brown fox jumps",
                         "--tokenizer", lab.tokenizer, "--max-new-tokens", 5, "--temperature", 1.5, "--seed", 3,
                         "--exclude", "code", "--out", out, "--attribution", attribution], capsys)
    assert code == 0, err
    assert listing(tmp_path) == {"out.jsonl", "attr.jsonl"}
    outputs = [json.loads(line) for line in out.read_text().splitlines()]
    records = [json.loads(line) for line in attribution.read_text().splitlines()]
    assert [o["prompt"] for o in outputs] == ["def add", "the quick brown fox jumps"]
    assert all(1 <= len(o["tokens"]) <= 5 for o in outputs)
    assert [r["tokens"] for r in records] == [len(o["tokens"]) for o in outputs]
    for record in records:
        assert record["excluded"] == ["code"] and record["attribution"] == {"public": 1.0, "code": 0.0}

    capsys.readouterr()
    assert main(["generate", str(lab.merged), "--prompt", "def add", "--tokenizer", str(lab.tokenizer),
                 "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out  # without --out: each completion and its attribution
    assert re.search(r"\[0\] 'def add' -> '.*'\n    attribution: public \d+\.\d%, code \d+\.\d%\n", printed), printed

    windows = tmp_path / "windows.jsonl"
    code, err = run_cli(["eval", lab.merged, "--data", f"code={lab.dataset}", "--seq-len", 8, "--max-tokens", 32,
                         "--attribution", windows], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in windows.read_text().splitlines()]
    assert [(r["domain"], r["window"]) for r in records] == [("code", i) for i in range(4)]
    for record in records:
        assert set(record["attribution"]) == {"public", "code"}
        assert abs(sum(record["attribution"].values()) - 1) < 1e-12 and 0 < record["attribution"]["code"] < 1


@pytest.fixture(scope="module")
def nan_merged(lab, tmp_path_factory):
    """The lab's merged model with one NaN in the code expert (a diverged expert, merged before merges checked)."""
    model = fp.from_mcore(lab.merged)
    with torch.no_grad():
        model.decoder.layers[0].mlp.experts.local_experts[1].linear_fc2.weight[2, 3] = float("nan")
    target = tmp_path_factory.mktemp("nan_merged") / "model"
    fp.save_mcore(model, target)
    return target


def test_a_model_with_nan_weights_is_refused_naming_the_tensor(lab, nan_merged, tmp_path, capsys):
    """Was: ValueError: no routing mass recorded for this sequence (a traceback from the attribution)."""
    base = ["generate", nan_merged, "--prompt", "def add", "--tokenizer", lab.tokenizer, "--max-new-tokens", 3]
    assert_refused([*base, "--out", tmp_path / "out.jsonl"], capsys,
                   match=r"the model produces non-finite logits \(position \d+\); its weights are not finite: first "
                         r"bad tensor \S*local_experts\.1\.linear_fc2\.weight \(1 of \d+ values\)",
                   workdir=tmp_path, inputs=(nan_merged, lab.tokenizer))
    code, err = run_cli([*base, "--exclude", "code"], capsys)  # the repair: mask the diverged expert
    assert code == 0, err


@pytest.mark.parametrize(("source", "match"), [
    # a lone surrogate escaped in JSON: was a tokenizer TypeError (TextEncodeInput must be ...)
    ("file", r"prompts\.jsonl:2: a string holds the lone UTF-16 surrogate \\ud800, which is not text"),
    # bytes of argv that are not UTF-8 reach Python as surrogates (surrogateescape): the same TypeError
    ("argv", r"prompt 1 is not valid text: the byte 0xed, which is not UTF-8 \(character 3\)"),
    ("argv-escaped", r"prompt 0 is not valid text: the lone UTF-16 surrogate \\ud800, which no UTF-8 encodes"),
])
def test_a_prompt_that_is_not_text_is_refused(lab, tmp_path, capsys, source, match):
    if source == "file":
        prompts = _prompts(tmp_path, '{"prompt": "def add"}', '{"prompt": "hi\\ud800"}')
        options = ["--prompts", prompts]
    elif source == "argv":
        prompts = None
        options = ["--prompt", "def add", "--prompt", "hi\udced\udca0\udc80"]  # what Python makes of b"hi\xed\xa0\x80"
    else:
        prompts = None
        options = ["--prompt", "hi\ud800"]
    assert_refused(["generate", lab.merged, *options, "--tokenizer", lab.tokenizer], capsys, match=match,
                   workdir=tmp_path, inputs=(lab.merged, *([prompts] if prompts else [])))
