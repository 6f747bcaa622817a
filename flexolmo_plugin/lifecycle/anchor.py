"""The anchor of a FlexOlmo checkpoint, as named tensors with one SHA-256 each.

The anchor is everything an owner trains against and may not change: all shared weights
(embeddings, attention, norms, output layer), the public FFN (expert 0) and the public router row
r_pub.  Digests are computed per tensor from whole canonical tensors (so they do not depend on the
TP/EP layout a checkpoint was saved at); merge compares them one by one and names the first tensor
that differs.

Also the finiteness check every tool that writes weights (package-expert, merge, opt-out) applies to
each tensor as it streams past: a diverged training run leaves NaN/Inf in its checkpoint, and a
package or merge built from it would spread them to every model that uses the expert.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from flexolmo_plugin.conversion.checks import all_finite
from flexolmo_plugin.conversion.mapping import Role, entries
from flexolmo_plugin.conversion.slots import slots
from flexolmo_plugin.errors import FlexOlmoError
from flexolmo_plugin.model.config import FlexOlmoConfig

PUBLIC_EXPERT = 0


class NonFiniteWeightsError(FlexOlmoError):
    """A weight with NaN or ±Inf values, refused before it can be copied into a new output."""


def check_finite(tensor: torch.Tensor, name: str, source: str) -> torch.Tensor:
    """``tensor`` unchanged if every value is finite, else a refusal naming the tensor and where it
    came from.  One pass without a temporary (:func:`all_finite`), so it costs little next to the read;
    the bad values are counted only when reporting."""
    if not all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteWeightsError(f"{source}: tensor {name} has {bad} non-finite (NaN/Inf) values out of "
                                    f"{tensor.numel()}; refusing to copy weights that are not finite")
    return tensor


def anchor_items(config: FlexOlmoConfig) -> Iterator[tuple[str, str, int | None]]:
    """``(anchor name, canonical tensor, router row or None)`` for every anchor tensor: the shared
    weights, expert 0's FFN and router row 0 (r_pub)."""
    for entry in entries(config):
        role = entry.rule.role
        if role is Role.SHARED or (role is Role.EXPERT and entry.expert == PUBLIC_EXPERT):
            yield entry.megatron, entry.megatron, None
        elif role is Role.ROUTER_ROW:
            yield f"{entry.megatron}[{PUBLIC_EXPERT}]", entry.megatron, PUBLIC_EXPERT


def digest_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order (bitwise identity check)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # no copy; hashlib releases the GIL
    return h.hexdigest()


def anchor_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The anchor of a built model as canonical tensors held by this rank.

    TP/EP-sharded tensors appear as this rank's slices; use on a TP=EP=1 model (or a checkpoint
    reader) for a layout-independent digest.
    """
    out: dict[str, torch.Tensor] = {}
    for slot in slots(model):
        if slot.role is Role.SHARED or (slot.role is Role.EXPERT and slot.expert == PUBLIC_EXPERT):
            out[slot.canonical] = slot.param.detach()
        elif slot.role is Role.ROUTER_ROW and slot.expert == PUBLIC_EXPERT:
            out[f"{slot.canonical}[{PUBLIC_EXPERT}]"] = slot.param.detach()
    return out


def anchor_digest(model: nn.Module) -> str:
    return digest_tensors(anchor_tensors(model))


def tensor_sha256(tensor: torch.Tensor) -> str:
    return digest_tensors({"t": tensor})


def anchor_hashes(config: FlexOlmoConfig, read, *, source: str | None = None) -> dict[str, str]:
    """Per-tensor anchor digests, in checkpoint order; ``read(canonical)`` returns a whole canonical
    tensor.  A helper thread hashes each tensor while the next one is read (SHA-256 is most of the
    cost of packaging and merging, and releases the GIL); two tensors at most are held.

    With ``source`` (a label for messages), every anchor tensor must also be finite: merge copies
    the whole anchor into its output, so this refuses a diverged public model before anything is
    written, on the read the hashing needs anyway."""
    out: dict[str, str] = {}
    pending: tuple[str, Future] | None = None
    with ThreadPoolExecutor(1, thread_name_prefix="anchor-sha256") as pool:
        for anchor_name, canonical, row in anchor_items(config):
            tensor = read(canonical)
            tensor = tensor[row] if row is not None else tensor
            if source is not None:
                check_finite(tensor, anchor_name, source)
            job = pool.submit(tensor_sha256, tensor)
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


def describe_difference(expected: dict[str, str], actual: dict[str, str]) -> str | None:
    """The first differing anchor tensor with *its own* two digests (``absent`` where one side lacks
    it), or None: the combined digests only say that something differs, these say what."""
    name = first_difference(expected, actual)
    if name is None:
        return None

    def short(digest: str | None) -> str:
        return f"{digest[:12]}…" if digest else "absent"

    return f"{name} (package {short(actual.get(name))}, public {short(expected.get(name))})"
