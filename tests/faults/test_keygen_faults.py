"""``flexolmo keygen --out PATH``: a path that names no file is refused in one line, nothing written."""

import re

import pytest

from tests.faults.harness import assert_refused, listing, run_cli


@pytest.mark.parametrize("out", ["", ".", "..", "/", "keys/"])
def test_a_key_path_that_names_a_directory_is_refused(tmp_path, capsys, monkeypatch, out):
    """Was: ValueError: PosixPath('.') has an empty name (a traceback)."""
    (tmp_path / "cwd" / "keys").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd")
    assert_refused(["keygen", "--out", out], capsys,
                   match=rf"key path {re.escape(repr(out))} names a directory, not a file: give DIR/NAME",
                   workdir=tmp_path)


def test_a_key_path_that_names_a_file_writes_the_pair(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["keygen", "--out", "owner.key"], capsys)
    assert code == 0, err
    assert listing(tmp_path) == {"owner.key", "owner.key.pub"}
