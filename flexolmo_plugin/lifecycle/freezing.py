"""Anchoring: a data owner trains only its own expert against the frozen public model.

In FlexOlmo expert training (paper §3.3.1) everything the owner inherits from the public model stays
fixed -- embeddings, attention with its q/k norms, every norm, the output layer, the public FFN and
the public router row r_pub -- and only the owner's FFN, router row r_i and bias b_i learn.  Because
every owner trains against the *same* frozen anchor, independently trained experts compose when
merged.

Frozen means ``requires_grad=False``: Megatron's DDP then allocates no gradient buffer for the tensor
and its optimizer never sees it, so neither updates nor weight decay can move it (a gradient mask
would still let decoupled weight decay drift it).  Each expert is its own module (``SequentialMLP``)
and each router row its own Parameter, so this works under any EP layout: on ranks that do not hold
the owner's expert, only its router row trains.

:mod:`.anchor` fingerprints the anchor (all shared tensors, the public FFN and r_pub) so that merge
tooling can verify that an expert was trained against a given public model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from flexolmo_plugin.conversion.mapping import Role
from flexolmo_plugin.conversion.slots import Slot, slots
from flexolmo_plugin.errors import ConfigError
from flexolmo_plugin.model.build import unwrap

PUBLIC_EXPERT = 0


@dataclass(frozen=True)
class TrainableSet:
    """What a freezing policy left trainable on this rank (canonical names, deduplicated)."""

    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    trainable_parameters: int
    frozen_parameters: int


def _is_router(slot: Slot) -> bool:
    return slot.role in (Role.ROUTER_ROW, Role.ROUTER_BIAS)


def _is_expert_ffn(slot: Slot) -> bool:
    return slot.role is Role.EXPERT


def _apply(model: nn.Module, keep) -> TrainableSet:
    trainable, frozen = set(), set()
    counts = [0, 0]
    for slot in slots(model):
        train = bool(keep(slot))
        slot.param.requires_grad_(train)
        label = slot.canonical if slot.expert is None or _is_expert_ffn(slot) else f"{slot.canonical}[{slot.expert}]"
        (trainable if train else frozen).add(label)
        counts[0 if train else 1] += slot.param.numel()
    return TrainableSet(tuple(sorted(trainable)), tuple(sorted(frozen)), counts[0], counts[1])


def anchor(model: nn.Module, *, owner_expert: int = 1) -> TrainableSet:
    """Freeze everything except expert ``owner_expert``'s FFN, router row and router bias."""
    num_experts = _num_experts(model)
    if not 0 < owner_expert < num_experts:
        raise ConfigError(f"owner_expert must be a non-public expert in [1, {num_experts - 1}], got {owner_expert}")
    return _apply(model, lambda s: s.expert == owner_expert and (_is_expert_ffn(s) or _is_router(s)))


def router_only(model: nn.Module) -> TrainableSet:
    """Router tuning (paper §3.3.3): only router rows (r_pub included) and biases train."""
    return _apply(model, _is_router)


def unfreeze_all(model: nn.Module) -> TrainableSet:
    return _apply(model, lambda s: True)


def _num_experts(model: nn.Module) -> int:
    return unwrap(model).flexolmo_config.num_experts
