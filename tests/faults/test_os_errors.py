"""When the file system says no: disk full, file too large, read-only, no permission, a concurrent writer.

Each must end in one ``error:`` line naming the output path and the reason, exit 2, and nothing left
behind -- never a traceback (before, ``OSError: [Errno 28] No space left on device`` came out of
torch's checkpoint writer as a ``CheckpointException`` traceback, and the loser of two runs writing
one output saw ``OSError: [Errno 39] Directory not empty``).

How each fault is produced, most robust first:

* **file too large (EFBIG)**: ``RLIMIT_FSIZE`` lowered for the duration of one command, ``SIGXFSZ``
  ignored meanwhile (its default action kills the process); needs no privilege and no mount, so it
  always runs.  Both are restored afterwards, whatever happens.
* **no permission (EPERM/EACCES)**: an output under ``/sys``, where nobody, root included, may
  create anything; nothing can be left there to clean up.
* **disk full (ENOSPC)** and **read-only file system (EROFS)**: a small (or read-only) tmpfs mounted
  on a directory under the test's ``tmp_path``, unmounted afterwards; skipped with the reason where
  the test may not mount (not root, or no CAP_SYS_ADMIN in a container).
* **a concurrent writer**: two threads inside :func:`atomic_directory` for one output, held at a
  barrier until both have written everything, so that both reach the final move: the race is
  forced, not hoped for.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import threading
import uuid
from pathlib import Path

import pytest

from flexolmo_plugin.conversion import atomic
from flexolmo_plugin.conversion.atomic import OutputExistsError, atomic_directory, temporary_name
from tests.faults.harness import assert_refused

WRITERS = {  # commands that write a checkpoint directory, from the lab's inputs
    "convert-hf-to-mcore": (lambda lab, out: ["convert", "hf-to-mcore", lab.public_hf, out, "--num-experts", 2],
                            ("public_hf",)),
    "convert-mcore-to-hf": (lambda lab, out: ["convert", "mcore-to-hf", lab.merged, out], ("merged",)),
    "merge": (lambda lab, out: ["merge", lab.anchor, lab.package, "--out", out], ("anchor", "package")),
    "opt-out": (lambda lab, out: ["opt-out", lab.merged, "--drop", "code", "--out", out], ("merged",)),
    "package-expert": (lambda lab, out: ["package-expert", lab.owner, out, "--name", "code2"], ("owner",)),
    "upcycle": (lambda lab, out: ["upcycle", lab.public_hf, out, "--public-embedding", lab.embeddings[0],
                                  "--domain-embedding", lab.embeddings[1]], ("public_hf", "embeddings")),
}


def _refused(lab, capsys, command: str, out: Path, match: str, workdir: Path) -> str:
    build, names = WRITERS[command]
    inputs = []
    for name in names:
        value = getattr(lab, name)
        inputs += list(value) if isinstance(value, tuple) else [value]
    return assert_refused(build(lab, out), capsys, match=match, workdir=workdir, inputs=tuple(inputs))


# --------------------------------------------------------------------------- file too large (EFBIG)
@contextlib.contextmanager
def file_size_limit(limit: int):
    """Files of this process cannot grow beyond ``limit`` bytes (writes fail with EFBIG)."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_file_too_large_is_one_line_and_leaves_nothing(lab, capsys, tmp_path, command):
    out = tmp_path / "out"
    with file_size_limit(16 * 1024):  # every writer here writes a file larger than 16 KiB
        _refused(lab, capsys, command, out, rf"^error: cannot write {out}: File too large \(EFBIG; nothing was "
                 r"written\)$", tmp_path)


# ----------------------------------------------------------------------- no permission (EPERM/EACCES)
def test_output_where_nothing_may_be_created_is_one_line(lab, capsys, tmp_path):
    if not (Path("/sys/kernel").is_dir() and os.path.ismount("/sys")):
        pytest.skip("no sysfs mounted at /sys")
    out = Path("/sys") / f"flexolmo-test-{uuid.uuid4().hex[:8]}"
    _refused(lab, capsys, "convert-hf-to-mcore", out,
             rf"^error: cannot write {out}: (Operation not permitted \(EPERM|Permission denied \(EACCES); nothing "
             r"was written\)$", tmp_path)
    assert not out.exists()


def test_read_only_directory_is_one_line(lab, capsys, tmp_path):
    """A 0555 directory refuses writes -- except to root or a process with CAP_DAC_OVERRIDE, which
    writes anyway (so the test probes instead of asking who it runs as)."""
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o555)
    try:
        try:
            (parent / "probe").mkdir()
        except PermissionError:
            pass
        else:
            (parent / "probe").rmdir()
            pytest.skip("this process may write into a read-only (0555) directory (root or CAP_DAC_OVERRIDE); "
                        "the read-only tmpfs case covers it")
        _refused(lab, capsys, "merge", parent / "out",
                 rf"^error: cannot write {parent / 'out'}: Permission denied \(EACCES; nothing was written\)$",
                 tmp_path)
    finally:
        parent.chmod(0o755)


# ------------------------------------------------------------- disk full (ENOSPC), read-only (EROFS)
@contextlib.contextmanager
def tmpfs(directory: Path, options: str):
    """A tmpfs mounted on ``directory`` (skip the test if this process may not mount)."""
    directory.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "flexolmo-test", str(directory)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["mount failed"])[0]
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {reason}")
    try:
        yield directory
    finally:
        if subprocess.run(["umount", str(directory)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True, timeout=30)


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_disk_full_is_one_line_and_leaves_nothing(lab, capsys, tmp_path, command):
    with tmpfs(tmp_path / "small", "size=32k,mode=0755") as small:
        out = small / "out"
        _refused(lab, capsys, command, out, rf"^error: cannot write {out}: No space left on device \(ENOSPC; "
                 r"nothing was written\)$", small)
        assert not list(small.iterdir())
        # the space is free again: a small file fits
        (small / "probe").write_bytes(b"x" * 1024)


@pytest.mark.parametrize("command", ["convert-hf-to-mcore", "merge"])
def test_read_only_file_system_is_one_line(lab, capsys, tmp_path, command):
    with tmpfs(tmp_path / "ro", "ro,size=64k") as read_only:
        out = read_only / "out"
        _refused(lab, capsys, command, out, rf"^error: cannot write {out}: Read-only file system \(EROFS; "
                 r"nothing was written\)$", read_only)


# ------------------------------------------------------------------------------ concurrent writers
def _race(final: Path, writers: int = 2) -> tuple[list[str], list[BaseException]]:
    """``writers`` threads write different content into one output, all reaching the final move."""
    barrier = threading.Barrier(writers, timeout=30)
    winners: list[str] = []
    losers: list[BaseException] = []

    def write(label: str) -> None:
        try:
            with atomic_directory(final) as tmp:
                for i in range(20):
                    (tmp / f"part{i}").write_text(label)
                barrier.wait()  # every writer has passed the existence check and written everything
            winners.append(label)
        except BaseException as error:  # collected and checked below
            losers.append(error)

    threads = [threading.Thread(target=write, args=(f"writer{i}",)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return winners, losers


@pytest.fixture(params=["renameat2", "mkdir-then-rename"])
def move(request, monkeypatch):
    """Both ways of the final move: the atomic no-replace rename, and the fallback for file systems
    or C libraries without it."""
    if request.param == "renameat2" and atomic._RENAMEAT2 is None:
        pytest.skip("no renameat2 in this C library")
    if request.param != "renameat2":
        monkeypatch.setattr(atomic, "_RENAMEAT2", None)
    return request.param


def test_concurrent_writers_one_wins_the_other_is_refused(tmp_path, move):
    final = tmp_path / "out"
    winners, losers = _race(final, writers=3)
    assert len(winners) == 1, (winners, losers)
    assert len(losers) == 2 and all(isinstance(e, OutputExistsError) for e in losers), losers
    assert all("appeared while this run was writing it" in str(e) for e in losers)
    written = [p for p in final.iterdir() if p.name != "checksums.json"]
    contents = {p.read_text() for p in written}
    assert contents == set(winners) and len(written) == 20  # the winner's, whole, unmixed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the losers' temporaries are gone


def test_an_empty_directory_that_appears_meanwhile_is_not_replaced(tmp_path, move):
    """``os.rename`` onto an empty directory replaces it silently: someone's (empty) directory would
    have become our output.  Now the run is refused and the directory is left as it was."""
    final = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="appeared while this run was writing it"):
        with atomic_directory(final) as tmp:
            (tmp / "weights").write_bytes(b"w")
            final.mkdir()
            (tmp_path / "marker").touch()
    assert final.is_dir() and not list(final.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["marker", "out"]


def test_a_file_that_appears_meanwhile_is_not_replaced(tmp_path, move):
    final = tmp_path / "out"
    with pytest.raises(OutputExistsError):
        with atomic_directory(final) as tmp:
            (tmp / "weights").write_bytes(b"w")
            final.write_text("someone else's")
    assert final.read_text() == "someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_concurrent_converts_through_the_cli_leave_one_whole_output(lab, capsys, tmp_path):
    """The same race through ``flexolmo convert``, interleaved deterministically: when the first
    run is about to move its finished output into place, a second run converts the same model to
    the same path from start to end (it wins); then the first run moves, and must lose: exit 2, one
    line, its temporary gone, the winner's checkpoint intact.  (In one thread: Megatron's and
    torch's checkpoint writers are not meant to run in two threads of one process at once.)"""
    from flexolmo_plugin.cli import main
    from flexolmo_plugin.conversion.mcore_io import load_config

    out = tmp_path / "out"
    argv = [str(a) for a in ("convert", "hf-to-mcore", lab.public_hf, out, "--num-experts", 2, "--quiet")]
    original = atomic.move_into_place
    codes: list[int] = []

    def second_run_first(tmp: Path, final: Path) -> None:
        if not codes:  # the first run's move: let the second run complete before it
            codes.append(-1)
            codes.append(main(argv))
        original(tmp, final)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(atomic, "move_into_place", second_run_first)
        codes.append(main(argv))
    err = capsys.readouterr().err
    assert codes == [-1, 0, 2], (codes, err)
    assert err.count("error: ") == 1 and f"output {out} appeared while this run was writing it" in err, err
    assert load_config(out)[0].num_experts == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------------- temporaries
def test_temporary_names_are_unique_per_process_and_call(tmp_path):
    final = tmp_path / "out"
    names = {temporary_name(final).name for _ in range(100)}
    assert len(names) == 100
    assert all(name.startswith(f".out.partial-{os.getpid()}-") for name in names)


@pytest.mark.parametrize("failure", [RuntimeError("a bug"), KeyboardInterrupt(), OSError(28, "No space left")])
def test_atomic_directory_removes_its_temporary_on_any_failure(tmp_path, failure):
    with pytest.raises(type(failure)):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "file").write_bytes(b"x")
            raise failure
    assert not list(tmp_path.iterdir())
