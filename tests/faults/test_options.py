"""Bad option values across every command: refused at parse time, in one line naming the flag.

Before these checks a zero or negative count reached the library (``--top-k 0`` silently became the
default, ``--seq-len 0`` a traceback, ``--tokens-trained -5`` went into a manifest, ``--name a/b``
into a path) and argparse's own refusals raised ``SystemExit`` with a usage block.  Each case here
must exit 2 with exactly one ``error:`` line matching the pattern, with nothing written and every
input unchanged (:func:`tests.faults.harness.assert_refused`).
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from flexolmo_plugin.conversion.convert import hf_to_mcore, mcore_to_hf
from flexolmo_plugin.errors import ConfigError
from tests.faults.harness import assert_refused

INT_1 = "must be an integer >= 1, got "
SEED = r"must be an integer in \[0, 4294967295\], got "
FINITE = "expected a finite number, got "
SCALE_RANGE = "must be > 0 and <= 1000, got "
WINDOW = r"must be an integer >= 2 \(the loss predicts each token from the ones before it\), got "
SIZE = "argument --max-shard-size: expected a size such as 5GB, 500MB or 1048576"
NAME = "argument --name: {!r} is not a valid name"

# The commands' fixed parts; {lab item} and {tmp} are filled in per test (tmp: where outputs would go).
CONVERT = "convert hf-to-mcore {public_hf} {tmp}/out --num-experts 2"
EXPORT = "convert mcore-to-hf {merged} {tmp}/hf"
MERGE = "merge {anchor} {package} --out {tmp}/merged"
EVAL = "eval {merged} --data code={dataset}"
EMBED = "embed-domain {docs} {tmp}/e.safetensors --model {public_hf}"
SELECT = "select-proxy {docs} {docs} --out {tmp}/p.json --name code --embedder {public_hf}"
MIX = "router-mix {docs} {tmp}/missing.json --out {tmp}/mix.jsonl"
PACKAGE = "package-expert {owner} {tmp}/pkg"
UPCYCLE = "upcycle {public_hf} {tmp}/up --public-embedding {e0} --domain-embedding {e1}"
PARITY = "parity {public_hf}"
GEN = "generate {merged} --prompt hi"
AUDIT = "audit-extraction {merged} {docs}"
CALIBRATE = "calibrate-router {owner} --own-data {dataset} --public-data {dataset} --out {tmp}/cal"
ALIGN = "align-router {merged} --data {dataset} --out {tmp}/aligned"
SCALE = "scale-router {merged} --data {dataset} --out {tmp}/scaled"
EXCLUDE = "argument --exclude: {!r} is not a valid name"

# (id COMMAND-OPTION-..., command line, regex of the one error line; a final "$" stands for the end of
# the message proper, before the pointer to the command's --help)
SEE_HELP = r" \(see 'flexolmo [a-z-]+ --help'\)$"
CASES = [
    ("convert-top-k-0", f"{CONVERT} --top-k 0", f"argument --top-k: {INT_1}0$"),
    ("convert-top-k-negative", f"{CONVERT} --top-k -2", f"argument --top-k: {INT_1}-2$"),
    ("convert-top-k-text", f"{CONVERT} --top-k two", "argument --top-k: expected an integer, got 'two'"),
    ("convert-num-experts-0", "convert hf-to-mcore {public_hf} {tmp}/out --num-experts 0",
     f"argument --num-experts: {INT_1}0$"),
    *[(f"convert-max-shard-size-{name}", f"{EXPORT} --max-shard-size='{value}'", SIZE)
      for name, value in (("text", "abc"), ("zero", "0"), ("negative", "-5GB"), ("inf", "infGB"), ("nan", "nan"),
                          ("unit", "5XB"), ("empty", ""), ("fraction-of-a-byte", "0.5B"))],
    ("convert-mcore-to-hf-with-top-k", f"{EXPORT} --top-k 2", "--num-experts/--top-k only apply to hf-to-mcore"),
    ("merge-top-k-0", f"{MERGE} --top-k 0", f"argument --top-k: {INT_1}0$"),
    ("merge-top-k-negative", f"{MERGE} --top-k -1", f"argument --top-k: {INT_1}-1$"),
    ("plan-gpus-0", "plan expert-2x7b --gpus 0", f"argument --gpus: {INT_1}0$"),
    *[(f"eval-max-tokens-{value}", f"{EVAL} --max-tokens {value}", f"argument --max-tokens: {INT_1}{value}$")
      for value in (0, -5)],
    # was: --seq-len 1 reached the model, whose loss over no predicted token (nan) was blamed on its weights
    *[(f"eval-seq-len-{value}", f"{EVAL} --seq-len {value}", f"argument --seq-len: {WINDOW}{value}$")
      for value in (1, 0, -5)],
    ("eval-seq-len-float", f"{EVAL} --seq-len 8.5", "argument --seq-len: expected an integer, got '8.5'"),
    ("embed-domain-num-docs-0", f"{EMBED} --num-docs 0", f"argument --num-docs: {INT_1}0$"),
    ("embed-domain-max-tokens-0", f"{EMBED} --max-tokens 0", f"argument --max-tokens: {INT_1}0$"),
    ("embed-domain-seed-negative", f"{EMBED} --seed -1", f"argument --seed: {SEED}-1$"),
    ("select-proxy-fraction-0", f"{SELECT} --fraction 0", r"argument --fraction: must be in \(0, 1\], got 0$"),
    ("select-proxy-fraction-above-1", f"{SELECT} --fraction 1.5", r"argument --fraction: must be in \(0, 1\]"),
    ("select-proxy-fraction-negative", f"{SELECT} --fraction -0.1", r"argument --fraction: must be in \(0, 1\]"),
    ("select-proxy-fraction-nan", f"{SELECT} --fraction nan", f"argument --fraction: {FINITE}'nan'"),
    ("select-proxy-num-docs-0", f"{SELECT} --num-docs 0", f"argument --num-docs: {INT_1}0$"),
    ("select-proxy-max-owner-docs-0", f"{SELECT} --num-docs 5 --max-owner-docs 0",
     f"argument --max-owner-docs: {INT_1}0$"),
    ("select-proxy-min-probability-above-1", f"{SELECT} --num-docs 5 --min-probability 1.5",
     r"argument --min-probability: must be in \[0, 1\], got 1.5"),
    ("select-proxy-min-probability-negative", f"{SELECT} --num-docs 5 --min-probability -0.5",
     r"argument --min-probability: must be in \[0, 1\]"),
    ("select-proxy-min-probability-inf", f"{SELECT} --num-docs 5 --min-probability inf",
     f"argument --min-probability: {FINITE}'inf'"),
    ("select-proxy-seed-negative", f"{SELECT} --num-docs 5 --seed -1", f"argument --seed: {SEED}-1$"),
    ("select-proxy-name-slash", f"{SELECT} --num-docs 5 --name a/b", NAME.format("a/b")),
    ("select-proxy-fraction-and-num-docs", f"{SELECT} --fraction 0.5 --num-docs 5",
     "argument --num-docs: not allowed with argument --fraction"),
    ("router-mix-per-source-0", f"{MIX} --per-source 0", f"argument --per-source: {INT_1}0$"),
    ("router-mix-seed-text", f"{MIX} --seed x", "argument --seed: expected an integer, got 'x'"),
    ("package-expert-tokens-trained-negative", f"{PACKAGE} --name code --tokens-trained -5",
     "argument --tokens-trained: must be an integer >= 0, got -5$"),
    ("package-expert-expert-0", f"{PACKAGE} --name code --expert 0", f"argument --expert: {INT_1}0$"),
    *[(f"package-expert-name-{name}", f"{PACKAGE} --name='{value}'", re.escape(NAME.format(value)))
      for name, value in (("slash", "a/b"), ("parent", ".."), ("dots", "a..b"), ("hidden", ".x"), ("dash", "-x"),
                          ("space", "my code"), ("empty", ""), ("long", "x" * 65), ("backslash", "a\\b"))],
    ("upcycle-name-slash", f"{UPCYCLE} --name a/b", NAME.format("a/b")),
    ("upcycle-name-parent", f"{UPCYCLE} --name ../up", re.escape(NAME.format("../up"))),
    ("upcycle-router-bias-init-positive", f"{UPCYCLE} --router-bias-init 0.5",
     "argument --router-bias-init: must be <= 0, got 0.5$"),
    ("upcycle-router-bias-init-nan", f"{UPCYCLE} --router-bias-init nan",
     f"argument --router-bias-init: {FINITE}'nan'$"),
    ("upcycle-router-bias-init-text", f"{UPCYCLE} --router-bias-init low",
     "argument --router-bias-init: expected a number, got 'low'$"),
    ("upcycle-router-bias-init-and-none", f"{UPCYCLE} --router-bias-init -1 --no-router-bias",
     "argument --no-router-bias: not allowed with argument --router-bias-init"),
    ("parity-tokens-0", f"{PARITY} --tokens 0", f"argument --tokens: {INT_1}0$"),
    ("parity-batch-negative", f"{PARITY} --batch -1", f"argument --batch: {INT_1}-1$"),
    ("parity-tolerance-negative", f"{PARITY} --tolerance=-1e-3", "argument --tolerance: must be >= 0, got -0.001"),
    ("parity-tolerance-nan", f"{PARITY} --tolerance nan", f"argument --tolerance: {FINITE}'nan'"),
    ("parity-tolerance-inf", f"{PARITY} --tolerance inf", f"argument --tolerance: {FINITE}'inf'"),
    ("parity-seed-too-large", f"{PARITY} --seed {2**32}", f"argument --seed: {SEED}{2**32}$"),
    ("demo-seed-negative", "demo --workdir {tmp}/demo --seed -3", f"argument --seed: {SEED}-3$"),
    ("generate-max-new-tokens-0", f"{GEN} --max-new-tokens 0", f"argument --max-new-tokens: {INT_1}0$"),
    ("generate-temperature-negative", f"{GEN} --temperature=-1",
     r"argument --temperature: must be >= 0 \(0 = greedy\), got -1$"),
    ("generate-temperature-nan", f"{GEN} --temperature nan", f"argument --temperature: {FINITE}'nan'"),
    ("generate-top-p-0", f"{GEN} --temperature 1 --top-p 0", r"argument --top-p: must be in \(0, 1\], got 0$"),
    ("generate-seed-negative", f"{GEN} --temperature 1 --seed -1", f"argument --seed: {SEED}-1$"),
    ("generate-exclude-slash", f"{GEN} --exclude a/b", EXCLUDE.format("a/b")),
    ("generate-batch-size-0", f"{GEN} --batch-size 0", f"argument --batch-size: {INT_1}0$"),
    ("audit-extraction-exclude-parent", f"{AUDIT} --exclude ..", re.escape(EXCLUDE.format(".."))),
    *[(f"audit-extraction-{flag[2:]}-0", f"{AUDIT} {flag} 0", f"argument {flag}: {INT_1}0$")
      for flag in ("--num-docs", "--prefix-tokens", "--continuation-tokens", "--batch-size")],
    ("audit-extraction-samples-negative", f"{AUDIT} --samples -1",
     "argument --samples: must be an integer >= 0, got -1$"),
    ("audit-extraction-temperature-0", f"{AUDIT} --temperature 0", "argument --temperature: must be > 0, got 0$"),
    ("audit-extraction-top-p-above-1", f"{AUDIT} --top-p 1.5", r"argument --top-p: must be in \(0, 1\], got 1.5$"),
    ("audit-extraction-threshold-0", f"{AUDIT} --threshold 0", r"argument --threshold: must be in \(0, 1\], got 0$"),
    ("audit-extraction-seed-negative", f"{AUDIT} --seed -1", f"argument --seed: {SEED}-1$"),
    *[(f"calibrate-router-{flag[2:]}-{name}", f"{CALIBRATE} {flag}={value}", message.format(flag=flag, value=value))
      for flag in ("--regularization", "--public-weight")
      for name, value, message in (("0", "0", "argument {flag}: must be > 0, got {value}$"),
                                   ("negative", "-2", "argument {flag}: must be > 0, got {value}$"),
                                   ("nan", "nan", "argument {flag}: " + FINITE + "'{value}'"))],
    *[(f"calibrate-router-scale-{name}", f"{CALIBRATE} --scale={value}", message)
      for name, value, message in (("0", "0", f"argument --scale: {SCALE_RANGE}0$"),
                                   ("negative", "-2", f"argument --scale: {SCALE_RANGE}-2$"),
                                   ("nan", "nan", f"argument --scale: {FINITE}'nan'"),
                                   # was: the router logits overflowed and the model's weights were blamed
                                   ("huge", "1e300", f"argument --scale: {SCALE_RANGE}1e\\+300$"),
                                   ("above-bound", "1000.5", f"argument --scale: {SCALE_RANGE}1000.5$"))],
    *[(f"{command}-{flag[2:]}-0", f"{template} {flag} 0", f"argument {flag}: {INT_1}0$")
      for command, template in (("calibrate-router", CALIBRATE), ("align-router", ALIGN), ("scale-router", SCALE))
      for flag in ("--max-tokens", "--seq-len") if (command, flag) != ("scale-router", "--seq-len")],
    *[(f"scale-router-seq-len-{value}", f"{SCALE} --seq-len {value}", f"argument --seq-len: {WINDOW}{value}$")
      for value in (1, 0)],
    ("scale-router-sweeps-0", f"{SCALE} --sweeps 0", f"argument --sweeps: {INT_1}0$"),
    ("scale-router-grid-negative", f"{SCALE} --grid 1,-3", "argument --grid: scales must be >= 0, got -3$"),
    ("scale-router-grid-inf", f"{SCALE} --grid 1,inf", f"argument --grid: {FINITE}'inf'"),
    ("scale-router-grid-empty", f"{SCALE} --grid=", "argument --grid: expected a number, got ''"),
    ("scale-router-grid-huge", f"{SCALE} --grid 1,1e300", r"argument --grid: scales must be <= 1000, got 1e\+300$"),
    ("align-router-regularization-inf", f"{ALIGN} --regularization inf", f"argument --regularization: {FINITE}'inf'"),
    # usage mistakes: one line too, exit 2 returned (not raised as SystemExit)
    ("no-command", "", "^error: the following arguments are required: COMMAND"),
    ("unknown-option", f"{MERGE} --topk 2", "^error: unrecognized arguments: --topk 2"),
]


def _command_line(template: str, lab, tmp: Path) -> tuple[list[str], tuple[Path, ...]]:
    """The argv of a case, and the lab inputs it names (they must be unchanged after the refusal)."""
    items = {"public_hf": lab.public_hf, "merged": lab.merged, "anchor": lab.anchor, "package": lab.package,
             "owner": lab.owner, "docs": lab.docs, "dataset": lab.dataset, "e0": lab.embeddings[0],
             "e1": lab.embeddings[1]}
    argv = [token.format(tmp=tmp, **items) for token in shlex.split(template)]
    return argv, tuple(path for name, path in items.items() if "{" + name + "}" in template)


@pytest.mark.parametrize(("template", "match"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_option_value_is_refused(lab, capsys, tmp_path, template, match):
    argv, inputs = _command_line(template, lab, tmp_path)
    match = match[:-1] + SEE_HELP if match.endswith("$") else match
    assert_refused(argv, capsys, match=match, workdir=tmp_path, inputs=inputs)


def test_cases_cover_every_checked_option():
    """Every option with a parse-time check (a ``type=``) has a bad-value case above, whose id is
    ``COMMAND-OPTION-...``: a new option cannot go untested."""
    from flexolmo_plugin.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    ids = [case[0] for case in CASES]
    missing = [f"{command} {action.option_strings[0]}" for command, parser in commands.items()
               for action in parser._actions if action.type is not None and action.option_strings
               and not any(i.startswith(f"{command}-{action.option_strings[0][2:]}-") for i in ids)]
    assert not missing, f"options checked at parse time without a bad-value case: {missing}"


# -------------------------------------------------------------------- the library refuses them too
@pytest.mark.parametrize("top_k", [0, -1, True, 1.5])
def test_hf_to_mcore_refuses_a_top_k_that_is_not_a_count(lab, tmp_path, top_k):
    """``top_k=None`` means the default; ``top_k=0`` used to mean the default too (``top_k or ...``)."""
    with pytest.raises(ConfigError, match=r"top_k must be an integer >= 1"):
        hf_to_mcore(lab.public_hf, tmp_path / "out", num_experts=2, top_k=top_k)
    assert not list(tmp_path.iterdir())


def test_hf_to_mcore_top_k_none_is_the_default_and_an_explicit_one_is_kept(lab, tmp_path):
    from flexolmo_plugin.conversion.mcore_io import load_config

    hf_to_mcore(lab.public_hf, tmp_path / "default", num_experts=2)
    hf_to_mcore(lab.public_hf, tmp_path / "one", num_experts=2, top_k=1)
    assert load_config(tmp_path / "default")[0].top_k == 2
    assert load_config(tmp_path / "one")[0].top_k == 1


@pytest.mark.parametrize("num_experts", [0, -2])
def test_hf_to_mcore_refuses_a_number_of_experts_that_is_not_a_count(lab, tmp_path, num_experts):
    with pytest.raises(ConfigError, match=r"num_experts must be an integer >= 1"):
        hf_to_mcore(lab.public_hf, tmp_path / "out", num_experts=num_experts)


@pytest.mark.parametrize("max_shard_bytes", [0, -1])
def test_mcore_to_hf_refuses_a_shard_size_that_is_not_a_count(lab, tmp_path, max_shard_bytes):
    with pytest.raises(ConfigError, match=r"max_shard_bytes must be an integer >= 1"):
        mcore_to_hf(lab.merged, tmp_path / "hf", max_shard_bytes=max_shard_bytes)
    assert not list(tmp_path.iterdir())
