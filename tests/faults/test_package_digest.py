"""Merge's "the same expert twice" check compares the experts' weights, not how their files were written.

A package's content digest is a digest of its FFN tensors (name, dtype, shape, bytes, in name order): a
copy of a package re-saved by another safetensors writer (other tensor order, other header), renamed,
with its manifest's file hashes updated and its signature dropped, is still the same expert and merge
refuses it.
"""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file, save_file

from flexolmo_plugin.conversion.checks import file_sha256
from flexolmo_plugin.lifecycle.package import MANIFEST, load_package
from tests.faults.harness import assert_refused


def _reserialized(package, target, *, name, change=None):
    """``package`` re-saved tensor by tensor in reverse order, renamed ``name``, manifest re-hashed."""
    target.mkdir(parents=True)
    tensors = {}
    for file in package.glob("*.safetensors"):
        tensors.update(load_file(file))
    if change is not None:
        change(tensors)
    save_file(dict(reversed(sorted(tensors.items()))), target / "model.safetensors", metadata={"by": "another tool"})
    manifest = json.loads((package / MANIFEST).read_text())
    manifest["name"] = name
    manifest["files"] = {"model.safetensors": file_sha256(target / "model.safetensors")}
    (target / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return target


def test_a_re_serialized_renamed_copy_is_refused_as_the_same_expert(lab, capsys, tmp_path):
    copy = _reserialized(lab.package, tmp_path / "inputs" / "copy", name="code-copy")
    assert (copy / "model.safetensors").read_bytes() != next(lab.package.glob("*.safetensors")).read_bytes()
    assert_refused(["merge", lab.anchor, lab.package, copy, "--out", tmp_path / "merged"], capsys,
                   match=r"packages 'code' .* and 'code-copy' .* hold identical weights", workdir=tmp_path,
                   inputs=(lab.package, copy, lab.anchor))


def test_a_copy_with_only_its_router_row_changed_is_still_the_same_expert(lab, capsys, tmp_path):
    def nudge_router(tensors):
        for key in tensors:
            if "router" in key:
                tensors[key] = tensors[key] + 0.25

    copy = _reserialized(lab.package, tmp_path / "inputs" / "copy", name="code-copy", change=nudge_router)
    assert_refused(["merge", lab.anchor, lab.package, copy, "--out", tmp_path / "merged"], capsys,
                   match=r"hold identical weights", workdir=tmp_path, inputs=(lab.package, copy))


def test_the_digest_follows_the_ffn_weights(lab, tmp_path):
    def nudge_ffn(tensors):
        key = next(k for k in sorted(tensors) if "linear_fc2" in k)
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] += 1.0

    copies = [_reserialized(lab.package, tmp_path / "same", name="same"),
              _reserialized(lab.package, tmp_path / "other", name="other", change=nudge_ffn)]
    original, same, other = (load_package(p) for p in (lab.package, *copies))
    try:
        assert original.content_digest == same.content_digest != other.content_digest
        assert len(original.content_digest) == 64
    finally:
        for package in (original, same, other):
            package.close()
    assert torch.equal(load_file(copies[0] / "model.safetensors")["layers.0.linear_fc1.weight"],
                       load_file(next(lab.package.glob("*.safetensors")))["layers.0.linear_fc1.weight"])


def test_a_manifest_whose_model_lacks_a_field_is_refused(lab, capsys, tmp_path):
    package = tmp_path / "inputs" / "package"
    shutil.copytree(lab.package, package)
    manifest = json.loads((package / MANIFEST).read_text())
    del manifest["model"]["hidden_size"]
    (package / MANIFEST).write_text(json.dumps(manifest))
    assert_refused(["merge", lab.anchor, package, "--out", tmp_path / "merged"], capsys,
                   match=r"manifest\.json: malformed manifest: .*KeyError: 'hidden_size'", workdir=tmp_path,
                   inputs=(package,))
