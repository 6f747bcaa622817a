"""The provenance record of a merged model: which signed packages it holds, which were removed, and when.

``merge`` writes ``provenance.json`` into the checkpoint directory (covered by its ``checksums.json``)::

    {"format_version": 1, "merged_at": UTC ISO time, "anchor_sha256": HEX, "public": {"ffn_sha256", "router_sha256"},
     "experts": [{"name", "owner_fingerprint" (null: unsigned), "public_key", "manifest_sha256", "manifest" (its
                  exact text, so the signature can be checked again), "signature", "ffn_sha256", "router_sha256"}],
     "removed": [the same fields + "removed_at"]}

``ffn_sha256`` is one SHA-256 over the expert's FFN tensors as stored (name, dtype, shape, bytes, tensor by
tensor), ``router_sha256`` the same over its router rows (and biases).  ``opt-out`` moves an expert from
``experts`` to ``removed``, stamped with the time; ``mcore-to-hf`` copies the file into the export.

:func:`verify_model` (``flexolmo verify``) recomputes the digests from the tensors actually present: every
expert present must be in the record with its FFN digest, every removed one absent by name and by content.
The owners' signatures vouch for their packages; the record itself (which digests belong to which signed
package) is the coordinator's statement.  Router tuning after the merge legitimately changes router rows:
a differing router digest is reported, not failed.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flexolmo_plugin.conversion.convert import PROVENANCE_FILE
from flexolmo_plugin.conversion.mapping import Role, entries_by_name
from flexolmo_plugin.conversion.mcore_io import CanonicalReader, load_config
from flexolmo_plugin.errors import FlexOlmoError
from flexolmo_plugin.lifecycle.package import PackageError, check_name
from flexolmo_plugin.lifecycle.signing import check_trusted, verify_signature
from flexolmo_plugin.model.config import FlexOlmoConfig

PROVENANCE = PROVENANCE_FILE
FORMAT_VERSION = 1
_ROLES = (Role.EXPERT, Role.ROUTER_ROW, Role.ROUTER_BIAS)


class ProvenanceError(FlexOlmoError):
    """A model without a readable provenance record."""


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def tensor_digest(tensor: torch.Tensor) -> str:
    tensor = tensor.detach().contiguous()
    hasher = hashlib.sha256(f"{str(tensor.dtype).removeprefix('torch.')}|{tuple(tensor.shape)}|".encode())
    hasher.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return hasher.hexdigest()


def _combine(parts: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{n}:{parts[n]}\n" for n in sorted(parts)).encode()).hexdigest()


class ExpertDigests:
    """Per-expert digests of a model's tensors, fed one canonical tensor at a time (as written by merge /
    opt-out, or as read back by verify), each cast to the checkpoint's dtype as the writer stores it.
    Tensors are named by their package names, which do not depend on the expert's index."""

    def __init__(self, config: FlexOlmoConfig, dtype: torch.dtype):
        self.by_name, self.dtype = entries_by_name(config), dtype
        self.ffn: dict[int, dict[str, str]] = defaultdict(dict)
        self.router: dict[int, dict[str, str]] = defaultdict(dict)

    def names(self) -> list[str]:
        return [n for n, e in self.by_name.items() if e.rule.role in _ROLES]

    def add(self, name: str, tensor: torch.Tensor) -> None:
        entry = self.by_name.get(name)
        if entry is None or entry.rule.role not in _ROLES:
            return
        tensor = tensor.to(self.dtype)
        if entry.rule.role is Role.EXPERT:
            self.ffn[entry.expert][entry.package()] = tensor_digest(tensor)
        else:
            first = 0 if entry.rule.role is Role.ROUTER_ROW else 1  # biases exist for experts 1..n
            for offset, row in enumerate(tensor):
                self.router[first + offset][entry.package()] = tensor_digest(row)

    def wrap(self, source):
        """``source`` for a checkpoint writer, digesting what it hands out."""
        def digested(name: str) -> torch.Tensor:
            tensor = source(name)
            self.add(name, tensor)
            return tensor
        return digested

    def of(self, expert: int) -> dict[str, str]:
        return {"ffn_sha256": _combine(self.ffn[expert]), "router_sha256": _combine(self.router[expert])}


def merge_record(packages, digests: ExpertDigests, anchor_sha256: str) -> dict:
    """The record merge writes: the public expert and one entry per package (expert i = package i-1)."""
    experts = []
    for index, package in enumerate(packages, start=1):
        signature = package.signature or {}
        experts.append({"name": package.name, "owner_fingerprint": signature.get("fingerprint"),
                        "public_key": signature.get("public_key"), "manifest_sha256": package.manifest_sha256,
                        "manifest": package.manifest_bytes.decode("utf-8"), "signature": signature.get("signature"),
                        **digests.of(index)})
    return {"format_version": FORMAT_VERSION, "merged_at": utc_now(), "anchor_sha256": anchor_sha256,
            "public": digests.of(0), "experts": experts, "removed": []}


def opt_out_record(record: dict, drop: list[str]) -> dict:
    """The record with the experts in ``drop`` moved to ``removed``, stamped with the time."""
    when = utc_now()
    removed = [{**e, "removed_at": when} for e in record["experts"] if e["name"] in drop]
    return {**record, "experts": [e for e in record["experts"] if e["name"] not in drop],
            "removed": list(record.get("removed", [])) + removed}


def write_record(directory: Path, record: dict) -> None:
    (Path(directory) / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Fields:
    """Type checks of one record's fields, each refusal naming the field (``experts[0].name``)."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, expected: str, value: object) -> None:
        raise ProvenanceError(f"{self.path}: malformed provenance record: {where} must be {expected}, "
                              f"got {_shown(value)}")

    def get(self, entry: dict, key: str, where: str, *, optional: bool = False) -> object:
        if key not in entry:
            if optional:
                return None
            raise ProvenanceError(f"{self.path}: malformed provenance record: no {where}")
        return entry[key]

    def object(self, value: object, where: str) -> dict:
        if not isinstance(value, dict):
            self.fail(where, "a JSON object", value)
        return value

    def array(self, value: object, where: str) -> list:
        if not isinstance(value, list):
            self.fail(where, "a JSON array", value)
        return value

    def text(self, entry: dict, key: str, where: str, *, optional: bool = False, nullable: bool = False) -> None:
        value = self.get(entry, key, where, optional=optional)
        if not (isinstance(value, str) or (value is None and (optional or nullable))):
            self.fail(where, "a string" + (" or null" if nullable else ""), value)

    def digest(self, entry: dict, key: str, where: str, *, optional: bool = False, nullable: bool = False) -> None:
        value = self.get(entry, key, where, optional=optional)
        if not ((isinstance(value, str) and _HEX64.fullmatch(value)) or (value is None and (optional or nullable))):
            self.fail(where, "64 lowercase hex digits (a SHA-256)" + (" or null" if nullable else ""), value)

    def name(self, entry: dict, where: str) -> str:
        value = self.get(entry, "name", where)
        try:
            return check_name(value)
        except PackageError:
            self.fail(where, "an expert name (1-64 letters, digits, '_', '.', '-'; starting alphanumeric, "
                      "no '..', not 'public')", value)

    def entry(self, value: object, where: str, *, removed: bool) -> str:
        entry = self.object(value, where)
        name = self.name(entry, f"{where}.name")
        self.digest(entry, "owner_fingerprint", f"{where}.owner_fingerprint", nullable=True)
        for key in ("public_key", "signature"):
            self.text(entry, key, f"{where}.{key}", optional=True)
        self.digest(entry, "manifest_sha256", f"{where}.manifest_sha256")
        self.text(entry, "manifest", f"{where}.manifest")
        for key in ("ffn_sha256", "router_sha256"):
            self.digest(entry, key, f"{where}.{key}")
        if removed:
            self.text(entry, "removed_at", f"{where}.removed_at", optional=True)
        return name


def check_record(record: object, path: Path) -> dict:
    """``record`` if every field :func:`verify_model` and ``opt-out`` read has the right type and form,
    else a :class:`ProvenanceError` naming the file and the first wrong field."""
    fields = _Fields(path)
    fields.object(record, "the record")
    version = fields.get(record, "format_version", "format_version")
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise ProvenanceError(f"{path}: unsupported format_version {_shown(version)}")
    fields.text(record, "merged_at", "merged_at")
    fields.digest(record, "anchor_sha256", "anchor_sha256", optional=True)
    public = fields.object(fields.get(record, "public", "public"), "public")
    for key in ("ffn_sha256", "router_sha256"):
        fields.digest(public, key, f"public.{key}")
    names = []
    for index, entry in enumerate(fields.array(fields.get(record, "experts", "experts"), "experts")):
        name = fields.entry(entry, f"experts[{index}]", removed=False)
        if name in names:
            raise ProvenanceError(f"{path}: malformed provenance record: expert {name!r} is recorded twice")
        names.append(name)
    for index, entry in enumerate(fields.array(fields.get(record, "removed", "removed"), "removed")):
        fields.entry(entry, f"removed[{index}]", removed=True)
    return record


def read_record(directory: str | os.PathLike, *, required: bool = True) -> dict | None:
    """The provenance record of ``directory``, every field checked (:func:`check_record`); None when
    there is none and it is not ``required``."""
    path = Path(directory) / PROVENANCE
    if not path.is_file():
        if required:
            raise ProvenanceError(f"{directory}: no {PROVENANCE} (a model merged before provenance records existed, "
                                  "or not by 'flexolmo merge')")
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise ProvenanceError(f"{path}: malformed provenance record ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''})") from None
    return check_record(record, path)


@dataclass
class Verification:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        verdict = ["consistent: every expert present is accounted for, every removed one is absent"] \
            if self.consistent else [f"INCONSISTENT: {p}" for p in self.problems]
        return "\n".join(self.lines + verdict)


def _check_entry(entry: dict, trusted: dict[str, str] | None, anchor_sha256: str | None) -> list[str]:
    """The entry's own consistency: manifest hash, signature, (given a registry) the signer, and that
    what the owner signed names this expert and this model's anchor (a signed manifest of another
    package, or of another public model, must not vouch for this entry)."""
    name, problems = entry["name"], []
    manifest = str(entry["manifest"]).encode("utf-8")
    if hashlib.sha256(manifest).hexdigest() != entry["manifest_sha256"]:
        problems.append(f"{name!r}: the recorded manifest does not hash to the recorded manifest_sha256")
    try:
        signed = json.loads(manifest)
        signed_name, signed_anchor = signed["name"], signed["anchor"]["sha256"]
    except (ValueError, KeyError, TypeError):
        problems.append(f"{name!r}: the recorded manifest is not an expert package manifest")
    else:
        if signed_name != name:
            problems.append(f"{name!r}: the recorded manifest is the package of {signed_name!r}")
        if anchor_sha256 is not None and signed_anchor != anchor_sha256:
            problems.append(f"{name!r}: the recorded manifest was made for another public model (anchor "
                            f"{str(signed_anchor)[:16]}…, this model's {anchor_sha256[:16]}…)")
    signature = None
    if entry["owner_fingerprint"] is not None:
        record = {"format_version": 1, "algorithm": "ed25519", "public_key": entry.get("public_key"),
                  "fingerprint": entry["owner_fingerprint"], "manifest_sha256": entry["manifest_sha256"],
                  "signature": entry.get("signature")}
        try:
            signature = verify_signature(record, manifest, f"{name!r}")
        except FlexOlmoError as error:
            problems.append(str(error))
    if trusted is not None:
        try:
            check_trusted(name, signature, trusted, f"{name!r}")
        except FlexOlmoError as error:
            problems.append(str(error))
    return problems


def verify_model(model_dir: str | os.PathLike, trusted: dict[str, str] | None = None) -> Verification:
    """Re-check ``model_dir``'s provenance record against its tensors (and, given ``trusted``, its signers)."""
    record = read_record(model_dir)
    config, dtype, _ = load_config(model_dir)
    names = list(config.expert_names or ())
    if not names:
        raise ProvenanceError(f"{model_dir}: the checkpoint records no expert names")
    digests = ExpertDigests(config, dtype)
    reader = CanonicalReader(model_dir)
    for name in digests.names():
        digests.add(name, reader.read(name))
    report = Verification()
    report.lines.append(f"provenance of {model_dir}: merged {record['merged_at']}, anchor "
                        f"{str(record.get('anchor_sha256'))[:16]}…")
    recorded = {e["name"]: e for e in record["experts"]}
    present = {name: digests.of(i) for i, name in enumerate(names)}
    for index, name in enumerate(names):
        found = present[name]
        entry = record["public"] if index == 0 else recorded.get(name)
        if entry is None:
            report.problems.append(f"expert {name!r} is in the model but not in the provenance record")
            report.lines.append(f"  {name:<16} NOT IN THE RECORD")
            continue
        ffn_ok = entry["ffn_sha256"] == found["ffn_sha256"]
        if not ffn_ok:
            report.problems.append(f"expert {name!r}: its FFN weights differ from those recorded at merge time")
        router = "router as merged" if entry["router_sha256"] == found["router_sha256"] else \
            "router changed since the merge (router tuning?)"
        owner = "public model" if index == 0 else \
            f"owner key {entry['owner_fingerprint'][:16]}…" if entry["owner_fingerprint"] else "UNSIGNED"
        if index:
            report.problems.extend(_check_entry(entry, trusted, record.get("anchor_sha256")))
            owner += f", manifest {entry['manifest_sha256'][:16]}…"
        report.lines.append(f"  {name:<16} {owner}; FFN {'matches' if ffn_ok else 'DIFFERS'}; {router}")
    for name in sorted(set(recorded) - set(names)):
        report.problems.append(f"expert {name!r} is in the record but not in the model (and not recorded as removed)")
    ffn_present = {d["ffn_sha256"]: n for n, d in present.items()}
    for entry in record["removed"]:
        name = entry["name"]
        where = {name} & set(names)
        if entry["ffn_sha256"] in ffn_present:  # its weights under another name
            where.add(ffn_present[entry["ffn_sha256"]])
        if where:
            report.problems.append(f"removed expert {name!r} is still present (as {sorted(set(where))})")
        owner = entry["owner_fingerprint"][:16] + "…" if entry["owner_fingerprint"] else "unsigned"
        report.lines.append(f"  removed {name!r} at {entry.get('removed_at')} (owner key {owner}): "
                            f"{'STILL PRESENT' if where else 'absent'}")
    return report
