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
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flexolmo_plugin.conversion.convert import PROVENANCE_FILE
from flexolmo_plugin.conversion.mapping import Role, entries_by_name
from flexolmo_plugin.conversion.mcore_io import CanonicalReader, load_config
from flexolmo_plugin.errors import FlexOlmoError
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


def read_record(directory: str | os.PathLike, *, required: bool = True) -> dict | None:
    path = Path(directory) / PROVENANCE
    if not path.is_file():
        if required:
            raise ProvenanceError(f"{directory}: no {PROVENANCE} (a model merged before provenance records existed, "
                                  "or not by 'flexolmo merge')")
        return None
    try:
        record = json.loads(path.read_text())
        if record["format_version"] != FORMAT_VERSION:
            raise ProvenanceError(f"{path}: unsupported format_version {record['format_version']!r}")
        for entry in [record["public"], *record["experts"], *record["removed"]]:
            entry["ffn_sha256"], entry["router_sha256"]  # noqa: B018
        for entry in [*record["experts"], *record["removed"]]:
            entry["name"], entry["owner_fingerprint"], entry["manifest_sha256"], entry["manifest"]  # noqa: B018
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise ProvenanceError(f"{path}: malformed provenance record ({type(error).__name__}: {error})") from None
    return record


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
