"""``flexolmo train`` on bad input: a one-line refusal before anything is written, never a traceback.

The refusals run in-process through the CLI (they happen before Bridge's loop or any process group
starts, so they take a second each); a recipe's save directory lies in the test's ``workdir``, so
:func:`assert_refused` also proves that a refused run leaves no ``flexolmo_config.json`` behind.
Two real training runs (in a subprocess, as a user starts them, so that their stderr is the user's)
check that a successful run prints no traceback and that a dataset rebuilt at the same prefix is
trained on with fresh sample indices instead of Bridge's stale cache.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from flexolmo_plugin.lifecycle.data import prepare_dataset
from tests.faults.harness import DOCS, VOCAB, assert_refused
from tests.support import make_tokenizer

TINY = ["recipe.seq_length=8", "recipe.train_iters=2", "recipe.global_batch_size=2", "recipe.micro_batch_size=1",
        "recipe.lr_warmup_iters=1"]


def _train(lab, tmp_path, *, init_from=None, data=None, extra=()) -> list:
    """``flexolmo train expert`` on the lab's anchor and dataset, saving into ``tmp_path/run``."""
    return ["train", "expert", f"recipe.init_from={init_from or lab.anchor}", f"recipe.save_dir={tmp_path / 'run'}",
            f"recipe.data_paths=[{data or lab.dataset}]", *TINY, *extra]


def _write_dataset(prefix: Path, documents: list[list[int]], dtype=np.uint16) -> Path:
    """An indexed dataset holding exactly ``documents`` (token ids), written by Megatron's builder."""
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for document in documents:
        builder.add_item(torch.tensor(document, dtype=torch.int64))
        builder.end_document()
    builder.finalize(str(prefix) + ".idx")
    return prefix


# ------------------------------------------------------------------------ refusals, in-process
def _no_such_prefix(lab, tmp_path):
    return dict(data=tmp_path / "inputs" / "missing"), r"no Megatron indexed dataset at .*missing: missing\.bin and"


def _index_missing(lab, tmp_path):
    prefix = lab.copy("dataset", tmp_path / "inputs")
    prefix.with_name(prefix.name + ".idx").unlink()
    return dict(data=prefix), r"dataset_copy\.idx missing"


def _bin_of_another_build(lab, tmp_path):
    prefix = lab.copy("dataset", tmp_path / "inputs")
    path = prefix.with_name(prefix.name + ".bin")
    path.write_bytes(path.read_bytes()[:100])  # what a mixed-up or interrupted build leaves
    return dict(data=prefix), r"dataset_copy\.bin has 100 bytes but dataset_copy\.idx describes \d+"


def _init_from_missing(lab, tmp_path):
    return dict(init_from=tmp_path / "inputs" / "nothing"), r"nothing is not a directory"


def _init_from_without_weights(lab, tmp_path):
    directory = tmp_path / "inputs" / "config_only"
    directory.mkdir()
    shutil.copy2(lab.anchor / "flexolmo_config.json", directory)
    return dict(init_from=directory), r"init_from: .*config_only: not a Megatron torch_dist checkpoint"


def _tokenizer_missing(lab, tmp_path):
    return dict(extra=[f"recipe.tokenizer_dir={tmp_path / 'inputs' / 'no_tokenizer'}"]), \
        r"tokenizer directory .*no_tokenizer does not exist"


def _tokenizer_larger_than_vocabulary(lab, tmp_path):
    tokenizer = make_tokenizer(tmp_path / "inputs" / "tokenizer400", vocab_size=400)
    return dict(extra=[f"recipe.tokenizer_dir={tokenizer}"]), rf"has 3\d\d entries, more than .* vocabulary of {VOCAB}"


def _unknown_recipe_argument(lab, tmp_path):
    return dict(extra=["recipe.no_such_arg=1"]), \
        r"recipe 'expert' has no argument recipe\.no_such_arg; its arguments: init_from, save_dir, data_paths"


def _unknown_config_key(lab, tmp_path):
    return dict(extra=["train.no_such=1"]), r"unknown configuration key 'train\.no_such'; valid keys .*train_iters"


def _unknown_config_section(lab, tmp_path):
    return dict(extra=["trian.train_iters=3"]), r"unknown configuration key 'trian\.train_iters'; .*top level: .*train"


def _config_value_not_a_number(lab, tmp_path):
    return dict(extra=["train.train_iters=abc"]), r"train\.train_iters='abc': expected a number"


def _override_syntax(lab, tmp_path):
    return dict(extra=["train.train_iters=[1"]), r"cannot apply the overrides .*train\.train_iters=\[1"


def _token_ids_beyond_the_vocabulary(lab, tmp_path):
    """A dataset prepared with a 331-entry tokenizer, for a model of 320 (the real way this happens)."""
    tokenizer = make_tokenizer(tmp_path / "inputs" / "tokenizer400", vocab_size=400)
    prefix = tmp_path / "inputs" / "wide"
    prepare_dataset(lab.docs, prefix, tokenizer_dir=tokenizer)
    return dict(data=prefix), rf"wide\.bin: token id 3\d\d is outside the model's vocabulary of {VOCAB} .*larger"


def _negative_token_ids(lab, tmp_path):
    prefix = _write_dataset(tmp_path / "inputs" / "negative", [[5, 6, -3, 2]] * 4, dtype=np.int32)
    return dict(data=prefix), r"token id -3 is outside .* the \.bin is corrupt"


def _lr_not_a_number(lab, tmp_path):
    return dict(extra=["recipe.lr=abc"]), r"optimizer\.lr='abc': must be a finite number > 0 .*recipe\.lr="


def _lr_nan(lab, tmp_path):
    return dict(extra=["recipe.lr=nan"]), r"optimizer\.lr='nan': must be a finite number > 0"


def _lr_infinite_override(lab, tmp_path):
    return dict(extra=["optimizer.lr=inf"]), r"optimizer\.lr=inf: must be a finite number > 0"


def _min_lr_above_lr(lab, tmp_path):
    return dict(extra=["recipe.lr=1e-4", "recipe.min_lr=1e-3"]), r"optimizer\.min_lr=0\.001: .*in \[0, optimizer\.lr"


def _train_iters_negative(lab, tmp_path):
    return dict(extra=["recipe.train_iters=-1"]), r"train\.train_iters=-1: must be a whole number > 0"


def _train_iters_fractional(lab, tmp_path):
    return dict(extra=["recipe.train_iters=1.5"]), r"train\.train_iters=1\.5: must be a whole number"


def _warmup_negative(lab, tmp_path):
    return dict(extra=["recipe.lr_warmup_iters=-3"]), r"scheduler\.lr_warmup_iters=-3: must be a whole number >= 0"


def _weight_decay_negative(lab, tmp_path):
    return dict(extra=["recipe.weight_decay=-0.1"]), r"optimizer\.weight_decay=-0\.1: must be a finite number >= 0"


def _clip_grad_negative(lab, tmp_path):
    return dict(extra=["optimizer.clip_grad=-1.0"]), r"optimizer\.clip_grad=-1\.0: must be a finite number >= 0"


def _micro_batch_not_dividing(lab, tmp_path):
    return dict(extra=["recipe.global_batch_size=3", "recipe.micro_batch_size=2"]), \
        r"train\.micro_batch_size=2: must be a whole number in \[1, train\.global_batch_size=3\] and divide it"


def _seq_length_zero(lab, tmp_path):
    return dict(extra=["recipe.seq_length=0"]), r"model\.seq_length=0: must be a whole number > 0"


CASES = [_no_such_prefix, _index_missing, _bin_of_another_build, _init_from_missing, _init_from_without_weights,
         _tokenizer_missing, _tokenizer_larger_than_vocabulary, _unknown_recipe_argument, _unknown_config_key,
         _unknown_config_section, _config_value_not_a_number, _override_syntax, _token_ids_beyond_the_vocabulary,
         _negative_token_ids, _lr_not_a_number, _lr_nan, _lr_infinite_override, _min_lr_above_lr,
         _train_iters_negative, _train_iters_fractional, _warmup_negative, _weight_decay_negative,
         _clip_grad_negative, _micro_batch_not_dividing, _seq_length_zero]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.__name__.strip("_"))
def test_train_refuses_bad_input_before_writing_anything(case, lab, capsys, tmp_path):
    (tmp_path / "inputs").mkdir()
    arguments, match = case(lab, tmp_path)
    assert_refused(_train(lab, tmp_path, **arguments), capsys, match=match, workdir=tmp_path,
                   inputs=(lab.anchor, lab.dataset))
    assert not (tmp_path / "run").exists()


def test_the_launchers_entry_point_refuses_with_a_message_too(lab, capsys, tmp_path):
    from flexolmo_plugin.recipes.train import main

    code = main(_train(lab, tmp_path, extra=["recipe.no_such_arg=1"])[1:])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "error: recipe 'expert' has no argument" in err, err
    assert not (tmp_path / "run").exists()


def test_a_large_dataset_is_checked_in_windows(lab, tmp_path, monkeypatch):
    """Past TOKEN_SCAN_BYTES the vocabulary check reads evenly spaced windows (a whole terabyte
    would delay every run by minutes); a wrong tokenizer's ids, which occur throughout, are found."""
    from flexolmo_plugin.recipes import inputs

    monkeypatch.setattr(inputs, "TOKEN_SCAN_BYTES", 64)
    monkeypatch.setattr(inputs, "TOKEN_SCAN_WINDOW", 16)
    good = _write_dataset(tmp_path / "good", [[5, 6, 7, 8, 9, 2]] * 200)
    assert inputs.check_dataset(str(good), VOCAB)  # its digest
    bad = _write_dataset(tmp_path / "bad", [[5, 6, 7, 400, 9, 2]] * 200)
    with pytest.raises(inputs.ConfigError, match="token id 400 .*found in a sample"):
        inputs.check_dataset(str(bad), VOCAB)


def test_only_bridges_transformer_engine_probe_is_silenced():
    """The filter drops Bridge's INFO record of the FP8GlobalStateManager probe (TE absent), nothing
    else: a warning or error about the same module, and any other record, still reach the handlers."""
    from flexolmo_plugin.recipes.train import _AbsentTransformerEngineImports

    def record(level, message):
        return logging.LogRecord("megatron.bridge.utils.import_utils", level, __file__, 1, message, None, None)

    keep = _AbsentTransformerEngineImports().filter
    probe = ("Import of FP8GlobalStateManager from megatron.core.extensions.transformer_engine failed with: "
             "Traceback (most recent call last): ...")
    assert not keep(record(logging.INFO, probe))
    assert keep(record(logging.WARNING, probe)) and keep(record(logging.ERROR, probe))
    assert keep(record(logging.INFO, "Import of X from megatron.bridge.other failed with: Traceback ..."))


# ---------------------------------------------------------------- real runs, in a subprocess
RERUN = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from flexolmo_plugin.cli import main

    anchor, tokenizer, prefix, docs = sys.argv[1:5]
    train = ["train", "expert", f"recipe.init_from={anchor}", "recipe.save_dir=null",
             f"recipe.data_paths=[{prefix}]", *sys.argv[5:]]
    first = main(train)
    for suffix in (".bin", ".idx"):  # the owner rebuilds the dataset at the same prefix, smaller
        Path(prefix + suffix).unlink()
    rebuilt = main(["prepare-data", docs, prefix, "--tokenizer", tokenizer, "--quiet"])
    second = main(train)
    print("EXIT", json.dumps([first, rebuilt, second]))
""")


def test_a_rebuilt_dataset_trains_on_fresh_indices_and_runs_print_no_traceback(lab, tmp_path):
    """Bridge caches the sample indices under ``PREFIX/cache`` keyed by the configuration only; the
    second run, on a 2-document rebuild of a 24-document dataset, used to read the old indices
    (IndexError).  Both runs must succeed, each from its own cache, with no "Traceback" on stderr
    (Bridge logged one for the Transformer Engine probe on every run)."""
    prefix = lab.copy("dataset", tmp_path)
    docs = tmp_path / "small.jsonl"
    docs.write_text("".join(json.dumps({"text": text}) + "\n" for text in DOCS[:2]))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "-c", RERUN, str(lab.anchor), str(lab.tokenizer), str(prefix), str(docs),
                             *TINY], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert "EXIT [0, 0, 0]" in result.stdout, result.stderr[-6000:]
    assert "Traceback" not in result.stderr, result.stderr[-6000:]
    caches = sorted(p.name for p in (prefix / "cache").iterdir())
    assert len(caches) == 2 and all(name.startswith("flexolmo-") for name in caches), caches  # one per dataset version


def test_a_precision_this_machine_cannot_run_is_refused_before_anything_is_written(lab, tmp_path, capsys):
    """The precision check used to run after the save directory and its flexolmo_config.json existed."""
    assert_refused(_train(lab, tmp_path, extra=["mixed_precision=bf16_with_fp8_current_scaling_mixed"]), capsys,
                   match=r"(?i)fp8", workdir=tmp_path, inputs=(lab.anchor, lab.dataset))
    assert not (tmp_path / "run").exists()


def test_a_save_dir_that_is_a_file_is_refused(lab, tmp_path, capsys):
    (tmp_path / "run").write_text("not a directory\n")
    assert_refused(_train(lab, tmp_path), capsys, match=r"checkpoint\.save .*run exists and is not a directory",
                   workdir=tmp_path, inputs=(lab.anchor, lab.dataset, tmp_path / "run"))


STOPPED = textwrap.dedent("""
    import json, sys
    from flexolmo_plugin.compat import enable_bridge_compat
    enable_bridge_compat()
    from megatron.bridge.training.callbacks import Callback
    from flexolmo_plugin.recipes.train import run

    class Stop(Callback):
        def on_train_start(self, context):
            raise RuntimeError("stopped before the first checkpoint")

    anchor, prefix, fresh, existing = sys.argv[1:5]
    stopped = []
    for save in (fresh, existing):
        try:
            run("expert", [f"recipe.init_from={anchor}", f"recipe.save_dir={save}", f"recipe.data_paths=[{prefix}]",
                           *sys.argv[5:]], callbacks=[Stop()])
        except RuntimeError as error:
            stopped.append(str(error))
    print("STOPPED", json.dumps(stopped))
""")


def test_a_run_that_fails_before_its_first_checkpoint_takes_back_what_it_wrote(lab, tmp_path):
    """The run config (and Bridge's tb_logs) are written before training starts; a run that stops before it
    completed a checkpoint removes them again: a save directory it created (with the parents it created)
    is gone, one that existed is left exactly as it was (its old flexolmo_config.json restored)."""
    prefix = lab.copy("dataset", tmp_path)
    fresh = tmp_path / "new" / "parent" / "run"
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("the user's own file\n")
    (existing / "flexolmo_config.json").write_text('{"an": "older run config"}\n')
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "-c", STOPPED, str(lab.anchor), str(prefix), str(fresh), str(existing),
                             *TINY], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert 'STOPPED ["stopped before the first checkpoint", "stopped before the first checkpoint"]' in result.stdout, \
        result.stderr[-6000:]
    assert not (tmp_path / "new").exists()
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before
    assert not [p for p in existing.rglob("*") if p.name not in before]
