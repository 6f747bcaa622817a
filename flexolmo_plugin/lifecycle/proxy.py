"""Proxy data for router tuning (paper §3.3.3, §3.6): public documents that look like an owner's data.

Router tuning needs examples of every owner's domain, but an owner's text never leaves the owner.
So each owner, **on its own machine**, trains a small binary classifier (its documents vs public
documents) on document embeddings and scores every public document; it hands the coordinator only
the **identifiers of the public documents** most like its data (:func:`select_proxy`).  The
coordinator then mixes the public set and every owner's proxy set, each source sampled equally, into
the router-tuning data (:func:`router_mix`).

The classifier is scikit-learn's logistic regression on standardised embeddings; every public
document is scored by a model that did not see it in training (5-fold cross-fitting), so the score of
a public document says how owner-like it is, not whether it was a training negative.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from flexolmo_plugin.conversion.atomic import write_file_atomically
from flexolmo_plugin.conversion.checks import file_sha256
from flexolmo_plugin.lifecycle.data import DataError, iter_records
from flexolmo_plugin.lifecycle.domain_embedding import document_embeddings, sample_documents
from flexolmo_plugin.lifecycle.package import PackageError, check_name

FORMAT_VERSION = 1
KIND = "flexolmo-proxy-selection"


@dataclass(frozen=True)
class ProxySelection:
    owner: str
    selected: list[str]
    public_documents: int
    cross_validated_accuracy: float


def public_documents(path: str | os.PathLike, *, text_key: str = "text", id_key: str = "id") -> list[tuple[str, str]]:
    """``(identifier, text)`` of every public document: its ``id_key`` field when present, else
    ``line:N`` (its line number), which the coordinator's copy of the same file reproduces."""
    docs, seen = [], set()
    for number, record in iter_records(path):
        text = record.get(text_key)
        if not isinstance(text, str):
            raise DataError(f"{path}:{number}: expected an object with a string field {text_key!r}")
        identifier = str(record[id_key]) if id_key in record else f"line:{number}"
        if identifier in seen:
            raise DataError(f"{path}:{number}: duplicate document identifier {identifier!r}")
        seen.add(identifier)
        docs.append((identifier, text))
    if not docs:
        raise DataError(f"{path}: no public documents")
    return docs


def _proxy_count(total: int, fraction: float | None, num_docs: int | None) -> int:
    if (fraction is None) == (num_docs is None):
        raise DataError("give exactly one of --fraction and --num-docs")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise DataError(f"--fraction must be in (0, 1], got {fraction}")
        return max(1, round(fraction * total))
    if num_docs < 1:
        raise DataError(f"--num-docs must be >= 1, got {num_docs}")
    return min(num_docs, total)


def select_proxy(owner_path: str | os.PathLike, public_path: str | os.PathLike, out_path: str | os.PathLike, *,
                 embedder: str | os.PathLike, owner: str, fraction: float | None = None, num_docs: int | None = None,
                 max_owner_docs: int = 1000, min_probability: float = 0.5, method: str = "auto",
                 max_tokens: int = 256, text_key: str = "text", id_key: str = "id", seed: int = 0,
                 progress: bool = False) -> ProxySelection:
    """Write the identifiers of the public documents most like the owner's (``out_path``, JSON).

    Args:
        owner_path: the owner's documents (JSON Lines); read here, never written anywhere.
        public_path: the public documents (JSON Lines), the same file the coordinator holds.
        out_path: the selection (JSON): public identifiers, the public file's SHA-256, counts.
        embedder: local embedding model (a text encoder, or the public model: its hidden states).
        owner: the owner's expert name, recorded in the selection.
        fraction / num_docs: how many public documents to select (exactly one of them).
        max_owner_docs: owner documents sampled for the classifier.
        min_probability: a public document is selected only if the classifier gives it at least this
            probability of being the owner's (none qualifying is refused: no proxy exists).
    """
    out_path = Path(out_path)
    check_name(owner)  # it becomes the mix's "source" field: a plain expert name
    public = public_documents(public_path, text_key=text_key, id_key=id_key)
    wanted = _proxy_count(len(public), fraction, num_docs)
    if not 0 <= min_probability < 1:
        raise DataError(f"min_probability must be in [0, 1), got {min_probability}")
    owned = sample_documents(owner_path, num_docs=max_owner_docs, seed=seed, text_key=text_key)
    if len(owned) < 5 or len(public) < 5:
        raise DataError(f"the classifier needs at least 5 documents of each side, got {len(owned)} owner and "
                        f"{len(public)} public documents")
    vectors = document_embeddings(embedder, owned + [text for _, text in public], method=method,
                                  max_tokens=max_tokens, progress=progress).double().numpy()
    labels = np.array([1] * len(owned) + [0] * len(public))
    finite = np.isfinite(vectors).all(axis=1)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000))
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    probability = np.full(len(labels), np.nan)
    probability[finite] = cross_val_predict(classifier, vectors[finite], labels[finite], cv=folds,
                                            method="predict_proba")[:, 1]
    accuracy = float(((probability[finite] >= 0.5) == (labels[finite] == 1)).mean())
    scores = probability[len(owned):]
    order = [i for i in np.argsort(-np.nan_to_num(scores, nan=-1.0), kind="stable") if scores[i] >= min_probability]
    if not order:
        raise DataError(f"no public document resembles {owner!r}'s data (highest probability "
                        f"{np.nanmax(scores):.3f} < {min_probability}): there is no proxy for this domain in "
                        f"{public_path}")
    selected = [public[i][0] for i in order[:wanted]]
    payload = {"format_version": FORMAT_VERSION, "kind": KIND, "owner": owner,
               "public_file": {"name": Path(public_path).name, "sha256": file_sha256(public_path)},
               "id_key": id_key, "public_documents": len(public), "selected": selected,
               "classifier": {"model": "logistic regression on standardised document embeddings (scikit-learn)",
                              "embedder": Path(embedder).name, "owner_documents": len(owned),
                              "cross_validated_accuracy": round(accuracy, 4), "min_probability": min_probability}}
    write_file_atomically(out_path, (json.dumps(payload, indent=2) + "\n").encode())
    return ProxySelection(owner, selected, len(public), accuracy)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_selection(path: str | os.PathLike) -> dict:
    """A proxy selection as :func:`select_proxy` writes it, every field :func:`router_mix` uses checked:
    ``owner`` an expert name (it becomes the mix's ``source``), ``selected`` a non-empty list of distinct
    identifiers (select-proxy refuses to write an empty one: no proxy exists), ``public_file.sha256`` a
    SHA-256, ``id_key`` a string.  A refusal names the file and the field."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{path}: not a proxy selection ({reason})") from error
    if not isinstance(payload, dict) or payload.get("kind") != KIND:
        raise DataError(f"{path}: not a proxy selection (no \"kind\": {KIND!r})")
    version = payload.get("format_version")
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise DataError(f"{path}: not a proxy selection of format {FORMAT_VERSION} (format_version {_shown(version)})")

    def wrong(field: str, expected: str) -> DataError:
        value = payload
        for part in field.split("."):
            if not isinstance(value, dict):
                break
            value = value.get(part)
        return DataError(f"{path}: field {field!r} must be {expected}, got {_shown(value)}")

    missing = [f for f in ("owner", "selected", "public_file") if f not in payload]
    if missing:
        raise DataError(f"{path}: not a proxy selection (no field {missing[0]!r})")
    try:
        check_name(payload["owner"])
    except PackageError:
        raise wrong("owner", "the owner's expert name (1-64 letters, digits, '_', '.', '-'; starting alphanumeric, "
                    "no '..', not 'public')") from None
    selected = payload["selected"]
    if not isinstance(selected, list) or not all(isinstance(i, str) and i for i in selected):
        raise wrong("selected", "a list of public document identifiers (strings)")
    if not selected:
        raise DataError(f"{path}: field 'selected' is empty: {payload['owner']!r} selected no proxy documents "
                        "(select-proxy never writes an empty selection: rerun it, e.g. with a lower "
                        "--min-probability)")
    if len(set(selected)) != len(selected):
        seen: set[str] = set()
        repeated = next(i for i in selected if i in seen or seen.add(i))
        raise DataError(f"{path}: field 'selected' lists {_shown(repeated)} more than once")
    public_file = payload["public_file"]
    digest = public_file.get("sha256") if isinstance(public_file, dict) else None
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise wrong("public_file.sha256", "the public file's SHA-256 (64 lowercase hex digits)")
    if not isinstance(payload.get("id_key", "id"), str) or not payload.get("id_key", "id"):
        raise wrong("id_key", "the name of the public documents' identifier field (a string)")
    return payload


@dataclass(frozen=True)
class MixReport:
    documents: int
    per_source: dict[str, int]
    path: Path


def router_mix(public_path: str | os.PathLike, selections: list[str | os.PathLike], out_path: str | os.PathLike, *,
               public_sample: str | os.PathLike | None = None, per_source: int | None = None,
               text_key: str = "text", seed: int = 0) -> MixReport:
    """The router-tuning data: a public sample and every owner's proxy set, each source contributing
    ``per_source`` documents (default: the largest proxy set; smaller sets are repeated), shuffled,
    written as JSON Lines with a ``source`` field.  Every selection must refer to ``public_path``;
    the public sample comes from ``public_sample`` (default: ``public_path`` too)."""
    if not selections:
        raise DataError("router_mix needs at least one proxy selection")
    digest = file_sha256(public_path)
    id_key = None
    proxies: dict[str, list[str]] = {}
    for path in selections:
        payload = load_selection(path)
        if payload["public_file"]["sha256"] != digest:
            raise DataError(f"{path}: selected from another public file than {public_path} (SHA-256 differs)")
        if payload["owner"] in proxies:
            raise DataError(f"two proxy selections for {payload['owner']!r}")
        if id_key is not None and payload.get("id_key", "id") != id_key:
            raise DataError(f"{path}: identifies public documents by {payload.get('id_key', 'id')!r}, the other "
                            f"selections by {id_key!r}: select every proxy set with the same --id-key")
        proxies[payload["owner"]] = payload["selected"]
        id_key = payload.get("id_key", "id")
    public = public_documents(public_path, text_key=text_key, id_key=id_key or "id")
    texts = dict(public)
    unknown = [i for ids in proxies.values() for i in ids if i not in texts]
    if unknown:
        raise DataError(f"proxy identifiers not in {public_path}: {unknown[:5]}")
    per_source = max(len(ids) for ids in proxies.values()) if per_source is None else per_source
    if isinstance(per_source, bool) or not isinstance(per_source, int) or per_source < 1:
        raise DataError(f"per_source must be >= 1, got {per_source}")
    rng = random.Random(seed)
    sample = public if public_sample is None else public_documents(public_sample, text_key=text_key, id_key=id_key)
    texts.update((f"public-sample:{doc_id}", text) for doc_id, text in sample)
    rows = [(f"public-sample:{doc_id}", "public") for doc_id, _ in rng.sample(sample, min(per_source, len(sample)))]
    for owner, ids in proxies.items():
        picked = (ids * (per_source // len(ids) + 1))[:per_source]
        rows += [(doc_id, f"proxy:{owner}") for doc_id in picked]
    rng.shuffle(rows)
    lines = "".join(json.dumps({text_key: texts[doc_id], "source": source,
                                "id": doc_id.removeprefix("public-sample:")}) + "\n" for doc_id, source in rows)
    write_file_atomically(Path(out_path), lines.encode())
    counts = {source: sum(1 for _, s in rows if s == source) for source in ["public", *(f"proxy:{o}" for o in proxies)]}
    return MixReport(len(rows), counts, Path(out_path))

