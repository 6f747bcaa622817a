"""eval's window messages say which limit is short: the token budget or the dataset."""

import json

from flexolmo_plugin.lifecycle.data import prepare_dataset
from tests.faults.harness import assert_refused


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
