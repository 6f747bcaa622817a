"""Concurrent writers and SIGKILL for ``flexolmo prepare-data``, with real processes.

Two runs writing one output prefix used to share the fixed temporaries ``.PREFIX.bin.partial`` /
``.idx.partial``: both exited 0, and the dataset's ``.bin`` was one run's while its ``.idx`` was the
other's (every document wrong when read back).  Now each run writes files of its own and names them
only at the end, without ever replacing a name: exactly one run wins, the other exits 2 and leaves
the winner's files alone.

The race is made deterministic, not left to timing: each run is stopped (SIGSTOP) as soon as it
holds an output file open, and both are continued only once both do -- both are then past the
"output already exists" check, so they must meet where the files get their names.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.support import make_tokenizer

DOCUMENTS = 10_000  # enough that tokenizing takes a while (the writing window to catch), little enough to be quick
WORDS = "the quick brown fox jumps over lazy dog def add return lorem ipsum dolor sit amet 0 1 2 3".split()
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
TIMEOUT_S = 180


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tokenizer and two different inputs (so that a mixed dataset cannot pass for either)."""
    root = tmp_path_factory.mktemp("concurrency")
    tokenizer = make_tokenizer(root / "tokenizer")
    inputs = []
    for seed in (0, 1):
        rng = random.Random(seed)
        path = root / f"docs{seed}.jsonl"
        path.write_text("".join(json.dumps({"text": " ".join(rng.choices(WORDS, k=40))}) + "\n"
                                for _ in range(DOCUMENTS + seed)))
        inputs.append(path)
    return tokenizer, inputs[0], inputs[1]


def _start(source: Path, prefix: Path, tokenizer: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flexolmo_plugin", "prepare-data", str(source), str(prefix),
                             "--tokenizer", str(tokenizer), "--quiet"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _writing(pid: int, directory: Path) -> bool:
    """Whether process ``pid`` holds an output file open in ``directory``: an unnamed (``O_TMPFILE``)
    file, which ``/proc`` shows as ``#inode (deleted)``, or a hidden ``.partial`` file."""
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for descriptor in descriptors:
        try:
            target = os.readlink(descriptor)
        except OSError:
            continue
        if target.startswith(f"{directory}/") and (target.endswith(" (deleted)") or ".partial" in target):
            return True
    return False


def _wait_until_writing(procs: dict[str, subprocess.Popen], directory: Path, *, stop: bool) -> None:
    """Wait until every process holds an output file open (stopping each one there if ``stop``)."""
    waiting, deadline = dict(procs), time.monotonic() + TIMEOUT_S
    while waiting:
        assert time.monotonic() < deadline, f"{sorted(waiting)} never started writing"
        for name, proc in list(waiting.items()):
            if _writing(proc.pid, directory):
                if stop:
                    proc.send_signal(signal.SIGSTOP)
                del waiting[name]
            elif proc.poll() is not None:
                _, err = proc.communicate()
                pytest.fail(f"run {name} ended (exit {proc.returncode}) before it was caught writing; a larger "
                            f"input would make the window wider:\n{err}")
        time.sleep(0.002)


def _kill_all(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _expected(source: Path, tokenizer_dir: Path) -> tuple[list[int], np.ndarray]:
    """Document lengths and the concatenated token ids prepare-data must write for ``source``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts = [json.loads(line)["text"] for line in source.read_text().splitlines()]
    ids = [doc + [tokenizer.eos_token_id] for doc in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return [len(doc) for doc in ids], np.concatenate([np.asarray(doc) for doc in ids])


def test_two_runs_on_one_prefix_one_wins_the_other_is_refused_and_nothing_mixes(corpus, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokenizer, first, second = corpus
    prefix = tmp_path / "out"
    procs = {"first": _start(first, prefix, tokenizer), "second": _start(second, prefix, tokenizer)}
    try:
        _wait_until_writing(procs, tmp_path, stop=True)
        for proc in procs.values():
            proc.send_signal(signal.SIGCONT)
        results = {name: (proc.wait(timeout=TIMEOUT_S), *proc.communicate()) for name, proc in procs.items()}
    finally:
        _kill_all(procs.values())

    codes = sorted(code for code, _, _ in results.values())
    assert codes == [0, 2], results
    winner = next(name for name, (code, _, _) in results.items() if code == 0)
    loser_err = next(err for code, _, err in results.values() if code == 2)
    assert "Traceback" not in loser_err, loser_err
    errors = [line for line in loser_err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "appeared while this run was writing it" in errors[0], loser_err
    assert "nothing was replaced" in errors[0], loser_err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "out.checksums.json", "out.idx"]

    dataset = IndexedDataset(str(prefix))
    lengths = [len(dataset[i]) for i in range(len(dataset))]
    tokens = np.concatenate([dataset[i] for i in range(len(dataset))]).astype(np.int64)
    expected = {name: _expected(source, tokenizer) for name, source in (("first", first), ("second", second))}
    assert lengths == expected[winner][0]
    np.testing.assert_array_equal(tokens, expected[winner][1])
    assert lengths != next(e for name, e in expected.items() if name != winner)[0]  # the two really differ


def test_prepare_data_killed_while_writing_leaves_nothing_but_its_input(corpus, tmp_path):
    """SIGKILL runs no clean-up: only files that never had a name (``O_TMPFILE``) vanish with the process."""
    try:
        os.close(os.open(tmp_path, os.O_TMPFILE | os.O_WRONLY, 0o600))
    except (AttributeError, OSError) as error:
        if isinstance(error, OSError) and error.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        pytest.skip(f"no unnamed files (O_TMPFILE) on {tmp_path}'s file system: a killed run leaves a hidden "
                    ".partial- file there")
    tokenizer, first, _ = corpus
    source = shutil.copy2(first, tmp_path / "docs.jsonl")
    proc = _start(source, tmp_path / "out", tokenizer)
    try:
        _wait_until_writing({"run": proc}, tmp_path, stop=False)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=TIMEOUT_S) == -signal.SIGKILL
    finally:
        _kill_all([proc])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]
