"""Signed expert packages, the coordinator's key registry, and the merged model's provenance record."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import stat

import pytest
import torch

from flexolmo_plugin.cli import main
from flexolmo_plugin.conversion.checksums import CHECKSUMS_FILE, write_directory_checksums
from flexolmo_plugin.lifecycle.package import load_package, package_expert
from flexolmo_plugin.lifecycle.provenance import PROVENANCE
from flexolmo_plugin.lifecycle.signing import SIGNATURE, keygen
from tests.faults.harness import assert_refused, run_cli
from tests.flexolmo_plugin.experts.helpers import make_owner


@dataclasses.dataclass(frozen=True)
class World:
    code_key: object  # Path of the private key of the 'code' owner
    math_key: object
    stranger_key: object
    code: object  # package 'code' signed by its owner
    math: object  # package 'math' (other weights) signed by its owner
    keys: object  # trusted keys: code -> code_key.pub (PEM), math -> fingerprint
    fingerprints: dict


@pytest.fixture(scope="module")
def world(lab, tmp_path_factory):
    root = tmp_path_factory.mktemp("signing")
    fingerprints = {}
    for who in ("code", "math", "stranger"):
        fingerprints[who], _, _ = keygen(root / f"{who}.key")
    package_expert(lab.owner, root / "code", name="code", sign_key=root / "code.key")
    math_owner = make_owner(lab.anchor, root / "math_owner", seed=11)
    package_expert(math_owner, root / "math", name="math", sign_key=root / "math.key")
    keys = root / "keys.json"
    keys.write_text(json.dumps({"code": (root / "code.key.pub").read_text(), "math": fingerprints["math"]}))
    return World(root / "code.key", root / "math.key", root / "stranger.key", root / "code", root / "math", keys,
                 fingerprints)


def test_keygen_writes_a_private_key_only_its_owner_can_read(tmp_path, capsys):
    capsys.readouterr()
    assert main(["keygen", "--out", str(tmp_path / "k")]) == 0
    out = capsys.readouterr().out
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in (tmp_path / "k").read_bytes() and b"PUBLIC KEY" in (tmp_path / "k.pub").read_bytes()
    from cryptography.hazmat.primitives import serialization

    public = serialization.load_pem_public_key((tmp_path / "k.pub").read_bytes())
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert hashlib.sha256(raw).hexdigest() in out
    assert_refused(["keygen", "--out", tmp_path / "k"], capsys, match="already exists", workdir=tmp_path)


def test_signed_round_trip_merge_verify_and_hf_export(lab, world, tmp_path, capsys):
    signature = json.loads((world.code / SIGNATURE).read_text())
    assert signature["fingerprint"] == world.fingerprints["code"]
    package = load_package(world.code)
    assert package.signature["fingerprint"] == world.fingerprints["code"]
    package.close()
    out = tmp_path / "merged"
    code, err = run_cli(["merge", lab.anchor, world.code, world.math, "--out", out, "--quiet",
                         "--trusted-keys", world.keys], capsys)
    assert code == 0 and "warning" not in err, err
    record = json.loads((out / PROVENANCE).read_text())
    assert PROVENANCE in json.loads((out / CHECKSUMS_FILE).read_text())["files"]
    assert [e["name"] for e in record["experts"]] == ["code", "math"]
    manifest_bytes = (world.code / "manifest.json").read_bytes()
    assert record["experts"][0]["manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    assert record["experts"][0]["owner_fingerprint"] == world.fingerprints["code"]
    assert record["experts"][0]["signature"] == signature["signature"]
    capsys.readouterr()
    assert main(["verify", str(out), "--trusted-keys", str(world.keys)]) == 0
    printed = capsys.readouterr().out
    assert "consistent" in printed and world.fingerprints["math"][:16] in printed
    from flexolmo_plugin.conversion.convert import mcore_to_hf

    mcore_to_hf(out, tmp_path / "hf")
    assert (tmp_path / "hf" / PROVENANCE).read_bytes() == (out / PROVENANCE).read_bytes()


def test_merge_without_trusted_keys_warns_once(lab, world, tmp_path, capsys):
    code, err = run_cli(["merge", lab.anchor, world.code, "--out", tmp_path / "m", "--quiet"], capsys)
    assert code == 0
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "authenticity" in warnings[0], err


def _merge_refused(lab, world, packages, capsys, tmp_path, match, keys=None):
    argv = ["merge", lab.anchor, *packages, "--out", tmp_path / "out", "--quiet",
            "--trusted-keys", keys or world.keys]
    return assert_refused(argv, capsys, match=match, workdir=tmp_path, inputs=(*packages, lab.anchor))


def test_tampered_manifest_is_refused(lab, world, tmp_path, capsys):
    package = shutil.copytree(world.code, tmp_path / "pkg")
    manifest = json.loads((package / "manifest.json").read_text())
    manifest["tokens_trained"] = 10**12
    (package / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    _merge_refused(lab, world, [package], capsys, tmp_path, r"package 'code'.*signature does not match the manifest")


def test_swapped_tensor_file_is_refused(lab, world, tmp_path, capsys):
    package = shutil.copytree(world.code, tmp_path / "pkg")
    weights = sorted(p.name for p in package.iterdir() if p.suffix == ".safetensors")[0]
    shutil.copy2(world.math / weights, package / weights)  # another owner's weights under this name
    _merge_refused(lab, world, [package], capsys, tmp_path, rf"{weights}: SHA-256 does not match the manifest")
    # ... and fixing the manifest's hash to match breaks the signature
    manifest = json.loads((package / "manifest.json").read_text())
    manifest["files"][weights] = hashlib.sha256((package / weights).read_bytes()).hexdigest()
    (package / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    _merge_refused(lab, world, [package], capsys, tmp_path, r"package 'code'.*signature does not match")


def test_package_re_signed_by_someone_else_is_refused(lab, world, tmp_path, capsys):
    package_expert(lab.owner, tmp_path / "resigned", name="code", sign_key=world.stranger_key)
    _merge_refused(lab, world, [tmp_path / "resigned"], capsys, tmp_path,
                   rf"package 'code'.*signed by key {world.fingerprints['stranger'][:16]}.*not by 'code''s registered")


def test_signature_claiming_the_owners_key_but_made_with_another_is_refused(lab, world, tmp_path, capsys):
    forged = shutil.copytree(world.code, tmp_path / "forged")
    package_expert(lab.owner, tmp_path / "by_stranger", name="code", sign_key=world.stranger_key)
    record = json.loads((forged / SIGNATURE).read_text())
    record["signature"] = json.loads((tmp_path / "by_stranger" / SIGNATURE).read_text())["signature"]
    (forged / SIGNATURE).write_text(json.dumps(record))
    _merge_refused(lab, world, [forged], capsys, tmp_path, r"package 'code'.*signature does not match")


def test_unsigned_package_under_trusted_keys_is_refused(lab, world, tmp_path, capsys):
    _merge_refused(lab, world, [lab.package], capsys, tmp_path, r"package 'code'.*unsigned")


def test_one_key_registered_under_two_names_is_refused(lab, world, tmp_path, capsys):
    keys = tmp_path / "dup.json"
    keys.write_text(json.dumps({"code": world.fingerprints["code"],
                                "math": (world.code_key.with_name("code.key.pub")).read_text()}))
    _merge_refused(lab, world, [world.code], capsys, tmp_path, r"registered under two names, 'code' and 'math'",
                   keys=keys)


def test_verify_after_opt_out_shows_the_removed_expert_and_none_of_its_bytes(lab, world, tmp_path, capsys):
    merged, dropped = tmp_path / "merged", tmp_path / "without_math"
    assert run_cli(["merge", lab.anchor, world.code, world.math, "--out", merged, "--quiet",
                    "--trusted-keys", world.keys], capsys)[0] == 0
    assert run_cli(["opt-out", merged, "--drop", "math", "--out", dropped, "--quiet"], capsys)[0] == 0
    capsys.readouterr()
    assert main(["verify", str(dropped), "--trusted-keys", str(world.keys)]) == 0
    printed = capsys.readouterr().out
    assert "removed 'math' at " in printed and "absent" in printed and "consistent" in printed, printed
    record = json.loads((dropped / PROVENANCE).read_text())
    assert [e["name"] for e in record["experts"]] == ["code"]
    assert record["removed"][0]["name"] == "math" and record["removed"][0]["removed_at"].endswith("+00:00")
    package = load_package(world.math)
    windows = []
    for key in ("layers.0.linear_fc1.weight", "layers.1.linear_fc2.weight", "layers.1.router_row"):
        raw = package.get(key).contiguous().view(torch.uint8).numpy().tobytes()
        windows += [raw[i:i + 64] for i in range(0, len(raw) - 64, max(64, len(raw) // 8))]
    package.close()
    blobs = [p.read_bytes() for p in dropped.rglob("*") if p.is_file()]
    assert windows and not any(w in blob for w in windows for blob in blobs)


def test_verify_fails_when_the_record_and_the_tensors_disagree(lab, world, tmp_path, capsys):
    merged = tmp_path / "merged"
    assert run_cli(["merge", lab.anchor, world.code, world.math, "--out", merged, "--quiet"], capsys)[0] == 0
    record = json.loads((merged / PROVENANCE).read_text())
    record["experts"] = record["experts"][:1]  # 'math' left out of the record
    record["experts"][0]["ffn_sha256"] = "0" * 64
    (merged / PROVENANCE).write_text(json.dumps(record))
    (merged / CHECKSUMS_FILE).unlink()
    write_directory_checksums(merged)  # a record rewritten consistently with the checksums: only verify sees it
    capsys.readouterr()
    assert main(["verify", str(merged)]) == 1
    printed = capsys.readouterr().out
    assert "'code': its FFN weights differ" in printed and "'math' is in the model but not in" in printed, printed


def test_verify_rejects_a_record_whose_signed_manifest_is_another_packages(lab, world, tmp_path, capsys):
    """A signature is only evidence for the package it was made over: 'math' in the record carrying
    the code owner's signed manifest (valid signature, wrong package) is inconsistent."""
    merged = tmp_path / "merged"
    assert run_cli(["merge", lab.anchor, world.code, world.math, "--out", merged, "--quiet"], capsys)[0] == 0
    record = json.loads((merged / PROVENANCE).read_text())
    code_entry, math_entry = record["experts"]
    for field in ("manifest", "manifest_sha256", "signature", "owner_fingerprint", "public_key"):
        math_entry[field] = code_entry[field]
    (merged / PROVENANCE).write_text(json.dumps(record))
    (merged / CHECKSUMS_FILE).unlink()
    write_directory_checksums(merged)
    capsys.readouterr()
    assert main(["verify", str(merged)]) == 1
    printed = capsys.readouterr().out
    assert "'math': the recorded manifest is the package of 'code'" in printed, printed


def test_verify_refuses_bad_input(lab, tmp_path, capsys):
    assert_refused(["verify", lab.anchor], capsys, match=r"no provenance\.json", workdir=tmp_path,
                   inputs=(lab.anchor,))
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    assert_refused(["verify", lab.merged, "--trusted-keys", bad], capsys, match="expected a JSON object",
                   workdir=tmp_path)


def test_a_name_registered_twice_in_the_key_file_is_refused(lab, world, tmp_path, capsys):
    """JSON allows a repeated key and json.loads keeps the last: a registry must not."""
    keys = tmp_path / "keys.json"
    first, second = world.fingerprints["code"], world.fingerprints["stranger"]
    keys.write_text(f'{{"code": "{first}", "code": "{second}"}}')
    assert_refused(["merge", lab.anchor, world.code, "--out", tmp_path / "merged", "--trusted-keys", keys], capsys,
                   match=r"'code' is registered more than once", workdir=tmp_path, inputs=(world.code,))
