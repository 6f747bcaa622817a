"""The end-to-end demo, reduced in size: the same pipeline as ``flexolmo demo`` (every owner trains in
its own process on Megatron-Bridge, proxies are selected owner-side, the coordinator's router step sees
only public text) -- for two seeds, and twice for one of them (determinism).

Every one of the demo's 15 checks is asserted, for two seeds: with the reduced size's calibration
(scale 2, public weight 1) seeds 0-6, 8-11 and 13 each passed all 15 on the 2-core VM, seeds 7 and 12
14 (an owner gate-weight check; "beats every single owner" by -0.006) (2026-12-03/04, docs/composition.md);
seeds 0 and 1 are the first two, not chosen from those results;
the narrowest margin in the two seeds run here is seed 1's "beats every single owner model" (+0.008 nats
over the single python model; seed 0: +0.039), so a change that costs the composition anything shows here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from flexolmo_plugin.demo.corpus import chunks
from flexolmo_plugin.demo.sizes import OWNERS

SEEDS = (0, 1)
# The three reduced demos (seeds 0 and 1, and seed 0 again for determinism) run at the same time, one
# thread each: 380 s on the 2-core VM (2026-12-03), where one reduced demo alone takes 160-210 s.  The
# suite's per-test limit (setup.cfg, 600 s) would count them in the first test, so the module has its
# own; a slow day of the VM has doubled demo times before (2026-12-02).
DEMO_TIMEOUT_S = 1500
pytestmark = pytest.mark.timeout(DEMO_TIMEOUT_S + 300)


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    """``{seed: (workdir, finished process)}`` for SEEDS, and ``"again"``: seed SEEDS[0] once more."""
    root = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = {}
    for key, seed in [*((s, s) for s in SEEDS), ("again", SEEDS[0])]:
        workdir, log = root / f"run-{key}", root / f"run-{key}.out"
        argv = [sys.executable, "-m", "flexolmo_plugin", "demo", "--workdir", str(workdir), "--size", "tiny",
                "--seed", str(seed), "--quiet"]
        with open(log, "w") as out:  # a file, not a pipe: three processes must never block on a full pipe
            runs[key] = (workdir, log, argv, subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env))
    deadline = time.monotonic() + DEMO_TIMEOUT_S
    try:
        for _, _, _, process in runs.values():
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for _, _, _, process in runs.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return {key: (workdir, subprocess.CompletedProcess(argv, process.returncode, log.read_text(), ""))
            for key, (workdir, log, argv, process) in runs.items()}


def _results(workdir):
    return json.loads((workdir / "eval" / "results.json").read_text())


@pytest.mark.multiprocess
@pytest.mark.parametrize("seed", SEEDS)
def test_demo_passes_every_check(demos, seed):
    workdir, done = demos[seed]
    assert "FlexOlmo demo finished" in done.stdout, done.stdout[-6000:]
    checks = _results(workdir)["checks"]
    assert len(checks) == 15
    assert not [text for text, ok in checks if not ok]
    assert done.returncode == 0


@pytest.mark.multiprocess
def test_same_seed_gives_identical_numbers(demos):
    workdir, _ = demos[SEEDS[0]]
    again, done = demos["again"]
    assert done.returncode in (0, 1), done.stdout[-4000:]
    first, second = _results(workdir), _results(again)
    assert first["losses"] == second["losses"]
    assert first["routing"] == second["routing"] and first["proxies"] == second["proxies"]


@pytest.mark.multiprocess
def test_final_model_beats_the_public_model_everywhere_it_should(demos):
    for seed in SEEDS:
        results = _results(demos[seed][0])
        losses = results["losses"]
        final, public = losses["final, after the router step"], losses["public model"]
        assert sum(final.values()) < sum(public.values()), (seed, losses)
        for owner in OWNERS:
            assert final[owner] < public[owner], (seed, owner, losses)
        assert results["physical_vs_runtime_opt_out"] <= 1e-5
        assert results["oracle"] and results["efficiency"] == results["efficiency"]  # reported (not NaN)


@pytest.mark.multiprocess
def test_every_logged_command_line_is_one_the_cli_accepts_with_the_settings_used(demos):
    """``logs/demo.log`` is how a user reproduces the demo by hand: each ``$ flexolmo ...`` line must parse
    with the real command line, and the upcycle lines must carry the bias start the owners trained with."""
    import shlex

    from flexolmo_plugin.cli.parser import build_parser
    from flexolmo_plugin.demo.sizes import SIZES

    workdir, _ = demos[SEEDS[0]]
    lines = [x[len("$ flexolmo "):] for x in (workdir / "logs" / "demo.log").read_text().splitlines()
             if x.startswith("$ flexolmo ")]
    parsed = [build_parser().parse_args(shlex.split(line)) for line in lines]
    upcycles = [args for args in parsed if args.func.__name__ == "cmd_upcycle"]
    assert len(upcycles) == len(OWNERS) + 1  # the owners' starts and the coordinator's public start
    assert all(a.router_bias_init == SIZES["tiny"].router_bias_init and not a.no_router_bias for a in upcycles)


@pytest.mark.multiprocess
def test_owner_text_stays_with_its_owner(demos):
    workdir, _ = demos[SEEDS[0]]
    log = (workdir / "logs" / "demo.log").read_text()
    for owner in OWNERS:  # each owner's training process is given its own data only
        line = next(x for x in log.splitlines() if x.startswith("$ flexolmo train expert") and f"/{owner}/" in x)
        others = [d for d in OWNERS if d != owner]  # public text is public: owners may replay it
        assert f"data/{owner}.train" in line and not any(f"data/{d}." in line for d in others), line
    calibrations = [x for x in log.splitlines() if x.startswith("$ flexolmo calibrate-router")]
    assert len(calibrations) == len(OWNERS)  # each owner: its own text and public text only
    for owner, line in zip(OWNERS, calibrations):
        assert f"/{owner}/" in line and not any(f"data/{d}." in line for d in OWNERS if d != owner), line
    routers = [x for x in log.splitlines() if x.startswith(("$ flexolmo train router-tune", "$ flexolmo align-router"))]
    assert routers and all("router-mix" in r and not any(f"data/{o}." in r for o in OWNERS) for r in routers), routers
    public_ids = {json.loads(x)["id"] for part in ("train", "pool")
                  for x in (workdir / "data" / f"public.{part}.jsonl").read_text().splitlines()}
    mix = [json.loads(x) for x in (workdir / "data" / "router-mix.jsonl").read_text().splitlines()]
    assert mix and all(row["id"] in public_ids for row in mix)  # router tuning: public documents only
    for owner in OWNERS:
        selection = json.loads((workdir / "packages" / f"{owner}-proxy.json").read_text())
        assert selection["selected"] and set(selection["selected"]) <= public_ids
        raw = (workdir / "packages" / f"{owner}-proxy.json").read_text()
        owner_file = workdir / "data" / f"{owner}.train.jsonl"
        owner_docs = [json.loads(x)["text"] for x in owner_file.read_text().splitlines()]
        assert not any(piece[:40] in raw for doc in owner_docs for piece in chunks(doc, 400) if len(piece) >= 40)


@pytest.mark.multiprocess
def test_artifacts_and_summary(demos):
    workdir, done = demos[SEEDS[0]]
    for name in ("routing-before.png", "routing-after.png"):
        assert (workdir / "eval" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (workdir / "eval" / "summary.md").read_text()
    assert "oracle: best single model per domain" in summary and "composition efficiency" in summary
    assert (workdir / "coordinator" / "final-hf" / "config.json").is_file()
    for owner in OWNERS:  # every package is signed by its owner and verified against the registered key
        assert (workdir / "packages" / owner / "signature.json").is_file()
    assert "authenticity was not checked" not in done.stdout + done.stderr
    assert "--trusted-keys" in (workdir / "logs" / "demo.log").read_text()
    attribution = _results(workdir)["attribution"]  # one generated output per domain, credited to the experts
    assert set(attribution) == {"public", *OWNERS} and "## Attribution" in summary
    for item in attribution.values():
        assert item["completion"] and set(item["shares"]) == {"public", *OWNERS}
        assert abs(sum(item["shares"].values()) - 1) < 1e-3
    records = [json.loads(x) for x in (workdir / "eval" / "attribution.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == [attribution[d]["prompt"] for d in attribution]
    assert "FlexOlmo demo finished" in done.stdout
