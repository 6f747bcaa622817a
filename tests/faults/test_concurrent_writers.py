"""Two runs writing the same output at once: exactly one wins, the other exits 2 with a message, and
the output is the winner's, whole.  And a run killed with SIGKILL leaves no output at all."""

import os
import subprocess
import sys

import pytest
import torch

import flexolmo_plugin as fp
from tests.faults.harness import HIDDEN, digests
from tests.support import kill_when

ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
IDS = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(3))


def _start(argv):
    return subprocess.Popen([sys.executable, "-m", "flexolmo_plugin", *map(str, argv)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _race(argv_a, argv_b, timeout=240):
    procs = [_start(argv_a), _start(argv_b)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append((proc.returncode, err))
    return results


@pytest.mark.parametrize("command", ["merge", "convert"])
def test_concurrent_writers_to_one_output(command, lab, tmp_path):
    out = tmp_path / "out"
    argv = {"merge": ["merge", lab.anchor, lab.package, "--out", out, "--quiet"],
            "convert": ["convert", "mcore-to-hf", lab.merged, out, "--quiet"]}[command]
    results = _race(argv, argv)
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "error:" in loser and "Traceback" not in loser and str(out) in loser, loser
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "a temporary output was left behind"
    if command == "merge":  # the output is one whole merge: its logits are the sequential merge's
        reference = fp.logits(fp.from_mcore(lab.merged), IDS)
        assert torch.equal(fp.logits(fp.from_mcore(out), IDS), reference)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(out)
        assert model.config.hidden_size == HIDDEN


def test_killed_merge_leaves_no_output(lab, tmp_path):
    out = tmp_path / "out"
    before = digests(lab.anchor, lab.package)
    proc = _start(["merge", lab.anchor, lab.package, "--out", out, "--quiet"])
    kill_when(proc, lambda: any(p.name.startswith(".out.partial") for p in tmp_path.iterdir()), what="merge")
    assert not out.exists()
    assert digests(lab.anchor, lab.package) == before
