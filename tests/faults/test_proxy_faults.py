"""``flexolmo router-mix`` on malformed proxy selections: one line naming the file and the field, no mix.

A selection is what an owner hands the coordinator; every field the mix uses is checked before anything is
read or written: the owner (it becomes each row's ``source``, so it must be a plain expert name), the
selected identifiers, the public file's digest and the identifier key.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from flexolmo_plugin.lifecycle.proxy import FORMAT_VERSION, KIND
from tests.faults.harness import assert_refused, run_cli

PUBLIC = [{"id": f"doc-{i}", "text": f"public document number {i}"} for i in range(12)]


def _selection(public, owner="python", **changes):
    payload = {"format_version": FORMAT_VERSION, "kind": KIND, "owner": owner,
               "public_file": {"name": public.name, "sha256": hashlib.sha256(public.read_bytes()).hexdigest()},
               "id_key": "id", "public_documents": len(PUBLIC), "selected": ["doc-1", "doc-4", "doc-7"],
               "classifier": {"cross_validated_accuracy": 0.9}}
    payload.update(changes)
    return payload


@pytest.fixture
def inputs(tmp_path):
    directory = tmp_path / "inputs"
    directory.mkdir()
    public = directory / "public.jsonl"
    public.write_text("".join(json.dumps(d) + "\n" for d in PUBLIC))
    good = directory / "cpp.json"
    good.write_text(json.dumps(_selection(public, owner="cpp", selected=["doc-2", "doc-3"])))
    return directory, public, good


CASES = {
    "empty_selection": (dict(owner="e", selected=[]), r"sel\.json: field 'selected' is empty: 'e' selected no proxy"),
    "owner_a_list": (dict(owner=["o"]), r"sel\.json: field 'owner' must be the owner's expert name.* got \['o'\]"),
    "owner_a_path_with_a_newline": (dict(owner="../evil name\n"),
                                    r"sel\.json: field 'owner' must be .*got '\.\./evil name\\n'"),
    "owner_public": (dict(owner="public"), r"sel\.json: field 'owner' must be .*got 'public'"),
    "selected_a_nested_list": (dict(selected=[["x"]]), r"sel\.json: field 'selected' must be a list of .*\[\['x'\]\]"),
    "selected_not_a_list": (dict(selected="doc-1"), r"sel\.json: field 'selected' must be a list"),
    "selected_twice": (dict(selected=["doc-1", "doc-1"]), r"sel\.json: field 'selected' lists 'doc-1' more than once"),
    "public_file_a_number": (dict(public_file=3), r"sel\.json: field 'public_file\.sha256' must be .*got 3"),
    "id_key_a_list": (dict(id_key=["id"]), r"sel\.json: field 'id_key' must be .*got \['id'\]"),
    "another_id_key": (dict(id_key="name"), r"sel\.json: identifies public documents by 'name', the other .*'id'"),
    "version_true": (dict(format_version=True), r"sel\.json: not a proxy selection of format 1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_router_mix_refuses_a_malformed_selection_in_one_line(case, inputs, capsys, tmp_path):
    directory, public, good = inputs
    changes, match = CASES[case]
    selection = directory / "sel.json"
    selection.write_text(json.dumps(_selection(public, **changes)))
    assert_refused(["router-mix", public, good, selection, "--out", tmp_path / "mix.jsonl"], capsys, match=match,
                   workdir=tmp_path, inputs=(directory,))


def test_a_selection_that_is_not_an_object_is_refused(inputs, capsys, tmp_path):
    directory, public, good = inputs
    selection = directory / "sel.json"
    selection.write_text("[1, 2]")
    assert_refused(["router-mix", public, selection, "--out", tmp_path / "mix.jsonl"], capsys,
                   match=r"sel\.json: not a proxy selection", workdir=tmp_path, inputs=(directory,))


def test_well_formed_selections_still_mix(inputs, capsys, tmp_path):
    directory, public, good = inputs
    selection = directory / "python.json"
    selection.write_text(json.dumps(_selection(public)))
    code, err = run_cli(["router-mix", public, good, selection, "--out", tmp_path / "mix.jsonl"], capsys)
    assert code == 0, err
    sources = [json.loads(line)["source"] for line in (tmp_path / "mix.jsonl").read_text().splitlines()]
    assert sorted(set(sources)) == ["proxy:cpp", "proxy:python", "public"] and len(sources) == 9
