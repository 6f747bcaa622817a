"""The end-to-end demo, reduced in size: the same pipeline as ``flexolmo demo`` (every owner trains
in its own process on Megatron-Bridge), checked on what the full demo shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flexolmo_plugin.demo.corpus import DOMAINS, chunks
from flexolmo_plugin.demo.sizes import OWNERS

DEMO_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo") / "run"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-m", "flexolmo_plugin", "demo", "--workdir", str(workdir), "--size", "tiny",
                           "--quiet"], capture_output=True, text=True, env=env, timeout=DEMO_TIMEOUT_S)
    return workdir, done


@pytest.mark.multiprocess
def test_demo_runs_and_its_checks_pass(demo):
    workdir, done = demo
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((workdir / "eval" / "results.json").read_text())
    failed = [text for text, ok in results["checks"] if not ok]
    assert not failed, failed


@pytest.mark.multiprocess
def test_merged_model_beats_the_public_model_on_every_owner_domain(demo):
    workdir, _ = demo
    losses = json.loads((workdir / "eval" / "results.json").read_text())["losses"]
    for domain in OWNERS:
        assert losses["merged (all experts)"][domain] < losses["public model"][domain], (domain, losses)


@pytest.mark.multiprocess
def test_opting_an_owner_out_hurts_its_own_domain_most(demo):
    workdir, _ = demo
    losses = json.loads((workdir / "eval" / "results.json").read_text())["losses"]
    merged = losses["merged (all experts)"]
    for owner in OWNERS:
        rise = {d: losses[f"merged, {owner} opted out"][d] - merged[d] for d in DOMAINS}
        assert rise[owner] > max(v for d, v in rise.items() if d != owner), (owner, rise)


@pytest.mark.multiprocess
def test_hf_export_matches_and_artifacts_exist(demo):
    workdir, _ = demo
    results = json.loads((workdir / "eval" / "results.json").read_text())
    assert results["hf_max_abs_logit_diff"] <= 1e-4
    assert results["physical_vs_runtime_opt_out"] <= 1e-5
    for path in ("eval/routing.png", "eval/summary.md", "logs/demo.log", "coordinator/merged-hf/config.json",
                 "coordinator/merged-hf/tokenizer.json", *(f"packages/{o}/manifest.json" for o in OWNERS),
                 *(f"logs/train-{o}.log" for o in OWNERS)):
        assert (workdir / path).is_file(), path
    assert (workdir / "eval" / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = (workdir / "logs" / "demo.log").read_text()
    for command in ("$ flexolmo train public", "$ flexolmo train expert", "$ flexolmo merge", "$ flexolmo opt-out",
                    "$ flexolmo convert mcore-to-hf", "$ flexolmo package-expert", "$ flexolmo upcycle"):
        assert command in log, command


def test_owners_train_only_on_their_own_data(demo):
    workdir, _ = demo
    log = (workdir / "logs" / "demo.log").read_text()
    for owner in OWNERS:
        line = next(x for x in log.splitlines() if x.startswith("$ flexolmo train expert") and f"/{owner}/" in x)
        others = [d for d in DOMAINS if d != owner]
        assert f"data/{owner}.train" in line and not any(f"data/{d}." in line for d in others), line


def test_refuses_a_non_empty_workdir_and_changes_nothing(tmp_path):
    from flexolmo_plugin.cli import EXIT_BAD_INPUT, main

    (tmp_path / "keep.txt").write_text("mine")
    assert main(["demo", "--workdir", str(tmp_path), "--quiet"]) == EXIT_BAD_INPUT
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_chunks_cut_at_line_boundaries_and_lose_nothing():
    text = "".join(f"line {i} " + "x" * (i % 17) + "\n" for i in range(300))
    pieces = list(chunks(text, 200))
    assert "".join(pieces) == text
    assert all(len(p) <= 200 for p in pieces) and all(p.endswith("\n") for p in pieces)
