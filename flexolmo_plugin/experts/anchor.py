"""The anchor of a FlexOlmo checkpoint, as named tensors with one SHA-256 each.

The anchor is everything an owner trains against and may not change: all shared weights
(embeddings, attention, norms, output layer), the public FFN (expert 0) and the public router row
r_pub.  Digests are computed per tensor from whole canonical tensors (so they do not depend on the
TP/EP layout a checkpoint was saved at); merge compares them one by one and names the first tensor
that differs.
"""

from __future__ import annotations

import hashlib
import re
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import torch

from conversion.mapping import entries

from ..anchoring import digest_tensors
from ..config import FlexOlmoConfig

_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")


def anchor_items(config: FlexOlmoConfig) -> Iterator[tuple[str, str, int | None]]:
    """``(anchor name, canonical tensor, router row or None)`` for every anchor tensor."""
    for entry in entries(config):
        name = entry.megatron
        expert = _EXPERT.search(name)
        if expert:
            if int(expert.group(1)) == 0:
                yield name, name, None
        elif name.endswith(".mlp.router.weight"):
            yield f"{name}[0]", name, 0
        else:
            yield name, name, None


def tensor_sha256(tensor: torch.Tensor) -> str:
    return digest_tensors({"t": tensor})


def anchor_hashes(config: FlexOlmoConfig, read) -> dict[str, str]:
    """Per-tensor anchor digests, in checkpoint order; ``read(canonical)`` returns a whole canonical
    tensor.  A helper thread hashes each tensor while the next one is read (SHA-256 is most of the
    cost of packaging and merging, and releases the GIL); two tensors at most are held."""
    out: dict[str, str] = {}
    pending: tuple[str, Future] | None = None
    with ThreadPoolExecutor(1, thread_name_prefix="anchor-sha256") as pool:
        for anchor_name, canonical, row in anchor_items(config):
            tensor = read(canonical)
            job = pool.submit(tensor_sha256, tensor[row] if row is not None else tensor)
            del tensor
            if pending is not None:
                out[pending[0]] = pending[1].result()
            pending = (anchor_name, job)
        if pending is not None:
            out[pending[0]] = pending[1].result()
    return out


def combined_digest(hashes: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(hashes):
        h.update(name.encode())
        h.update(hashes[name].encode())
    return h.hexdigest()


def first_difference(expected: dict[str, str], actual: dict[str, str]) -> str | None:
    """The first anchor tensor (in checkpoint order) whose digest differs, or None."""
    for name in list(expected) + [n for n in actual if n not in expected]:
        if expected.get(name) != actual.get(name):
            return name
    return None
