"""A malformed provenance record: ``verify`` and ``opt-out`` refuse it in one line naming the field.

Every field of ``provenance.json`` is checked for its type and form when the record is read, so a record
with a field of the wrong type (rewritten and re-sealed, its checksums consistent) is bad input (exit 2),
never a traceback out of the verification (exit 1 would read as "check failed").
"""

from __future__ import annotations

import json
import shutil

import pytest

from flexolmo_plugin.conversion.checksums import CHECKSUMS_FILE, write_directory_checksums
from flexolmo_plugin.lifecycle.provenance import PROVENANCE
from tests.faults.harness import assert_refused, run_cli


def _drop_merged_at(record):
    del record["merged_at"]


def _fingerprint_a_number(record):
    record["experts"][0]["owner_fingerprint"] = 5


def _name_a_list(record):
    record["experts"][0]["name"] = ["x"]


def _name_with_a_newline(record):
    record["experts"][0]["name"] = "code\nconsistent"


def _manifest_sha256_a_number(record):
    record["experts"][0]["manifest_sha256"] = 5


def _manifest_not_text(record):
    record["experts"][0]["manifest"] = {"name": "code"}


def _ffn_digest_not_hex(record):
    record["public"]["ffn_sha256"] = "zz"


def _experts_not_a_list(record):
    record["experts"] = {"code": {}}


def _expert_not_an_object(record):
    record["experts"] = ["code"]


def _expert_recorded_twice(record):
    record["experts"].append(dict(record["experts"][0]))


def _removed_entry_incomplete(record):
    record["removed"] = [{"name": "math"}]


def _version_true(record):
    record["format_version"] = True  # == 1 in Python, but not a version


def _not_an_object(record):
    return ["not", "a", "record"]


CASES = {
    _drop_merged_at: r"no merged_at",
    _fingerprint_a_number: r"experts\[0\]\.owner_fingerprint must be 64 lowercase hex .* got 5",
    _name_a_list: r"experts\[0\]\.name must be an expert name .* got \['x'\]",
    _name_with_a_newline: r"experts\[0\]\.name must be an expert name .*'code\\nconsistent'",
    _manifest_sha256_a_number: r"experts\[0\]\.manifest_sha256 must be 64 lowercase hex .* got 5",
    _manifest_not_text: r"experts\[0\]\.manifest must be a string",
    _ffn_digest_not_hex: r"public\.ffn_sha256 must be 64 lowercase hex",
    _experts_not_a_list: r"experts must be a JSON array",
    _expert_not_an_object: r"experts\[0\] must be a JSON object, got 'code'",
    _expert_recorded_twice: r"expert 'code' is recorded twice",
    _removed_entry_incomplete: r"no removed\[0\]\.owner_fingerprint",
    _version_true: r"unsupported format_version True",
    _not_an_object: r"the record must be a JSON object",
}


def _rewritten(lab, tmp_path, change):
    """The lab's merged model with its record changed by ``change`` and the checksums re-sealed."""
    model = tmp_path / "inputs" / "merged"
    shutil.copytree(lab.merged, model)
    record = json.loads((model / PROVENANCE).read_text())
    record = change(record) or record
    (model / PROVENANCE).write_text(json.dumps(record))
    (model / CHECKSUMS_FILE).unlink()
    write_directory_checksums(model)
    return model


@pytest.mark.parametrize("change", list(CASES), ids=lambda change: change.__name__.strip("_"))
def test_verify_refuses_a_malformed_record_in_one_line(change, lab, capsys, tmp_path):
    model = _rewritten(lab, tmp_path, change)
    assert_refused(["verify", model], capsys, match=rf"provenance\.json: .*{CASES[change]}", workdir=tmp_path,
                   inputs=(model,))


def test_opt_out_refuses_a_malformed_record_and_writes_nothing(lab, capsys, tmp_path):
    model = _rewritten(lab, tmp_path, _fingerprint_a_number)
    assert_refused(["opt-out", model, "--drop", "code", "--out", tmp_path / "out"], capsys,
                   match=r"owner_fingerprint must be", workdir=tmp_path, inputs=(model,))


def test_the_lab_record_still_verifies(lab, capsys):
    code, _ = run_cli(["verify", lab.merged], capsys)
    assert code == 0
