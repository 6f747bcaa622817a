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

Grouped experts (Megatron's ``TEGroupedMLP``, or any module that runs several experts in one
grouped GEMM, such as Transformer Engine's ``GroupedLinear``) cannot be frozen per expert: TE's
grouped linear takes ``requires_grad`` from ``weights[0]`` for every GEMM of the group (v2.18
``grouped_linear.py``), so a trainable owner expert behind a frozen public expert would silently
never train (and with a single packed weight there is no per-expert flag at all).  :func:`anchor`
refuses such a module when it holds more than one expert, and every policy ends with
:func:`check_grouped_experts`, which refuses any grouped module left with mixed ``requires_grad``.

:mod:`.anchor` fingerprints the anchor (all shared tensors, the public FFN and r_pub) so that merge
tooling can verify that an expert was trained against a given public model.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.transformer.moe.experts import TEGroupedMLP
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
    check_grouped_experts(model)
    return TrainableSet(tuple(sorted(trainable)), tuple(sorted(frozen)), counts[0], counts[1])


def anchor(model: nn.Module, *, owner_expert: int = 1) -> TrainableSet:
    """Freeze everything except expert ``owner_expert``'s FFN, router row and router bias."""
    num_experts = _num_experts(model)
    if not 0 < owner_expert < num_experts:
        raise ConfigError(f"owner_expert must be a non-public expert in [1, {num_experts - 1}], got {owner_expert}")
    _refuse_grouped_experts(model, owner_expert)
    return _apply(model, lambda s: s.expert == owner_expert and (_is_expert_ffn(s) or _is_router(s)))


def router_only(model: nn.Module) -> TrainableSet:
    """Router tuning (paper §3.3.3): only router rows (r_pub included) and biases train."""
    return _apply(model, _is_router)


def unfreeze_all(model: nn.Module) -> TrainableSet:
    return _apply(model, lambda s: True)


def _is_grouped(module: nn.Module) -> bool:
    """Does ``module`` run several experts' weights through one grouped GEMM?  Megatron's
    ``TEGroupedMLP`` (``InferenceGroupedMLP`` included) and any grouped linear (Transformer Engine's
    ``GroupedLinear`` and Megatron's ``TEGroupedLinear`` wrappers: ``num_gemms`` > 1)."""
    if isinstance(module, TEGroupedMLP):
        return True
    gemms = getattr(module, "num_gemms", None)
    return isinstance(gemms, int) and not isinstance(gemms, bool) and gemms > 1


def grouped_expert_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of each outermost grouped-experts module of ``model`` (see :func:`_is_grouped`)."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in unwrap(model).named_modules():
        if any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        if _is_grouped(module):
            found.append((name, module))
    return found


def _local_experts(module: nn.Module) -> int:
    count = getattr(module, "num_local_experts", None)
    return int(count if count is not None else getattr(module, "num_gemms", 1))


def _refuse_grouped_experts(model: nn.Module, owner_expert: int) -> None:
    """Anchoring needs per-expert ``requires_grad``; a grouped module holding several experts cannot
    carry it (refused on every rank alike: the owner's rank would mix, whichever rank that is)."""
    grouped = [(name or "<model>", _local_experts(m)) for name, m in grouped_expert_modules(model)]
    shared = [f"{name} ({count} experts in one grouped GEMM)" for name, count in grouped if count > 1]
    if shared:
        raise ConfigError(
            f"anchored training of expert {owner_expert} needs each expert frozen or trained on its own, but "
            f"these modules run several experts in one grouped GEMM: {', '.join(shared)}. Transformer Engine's "
            "grouped linear takes requires_grad from the first expert's weight for every expert, so the owner's "
            "expert would silently never train. Build the model with per-expert experts (FlexOlmo's "
            "PerExpertSequentialMLP spec, the default) or with one local expert per rank (EP = number of experts).")


def check_grouped_experts(model: nn.Module) -> None:
    """Refuse any grouped-experts module whose parameters mix ``requires_grad=True`` and ``False``.

    Transformer Engine's grouped linear computes every expert's weight gradient, or none, from
    ``weights[0].requires_grad``: a mixed module either never trains its trainable experts or
    computes gradients for its frozen ones.  Call after any change of ``requires_grad`` (every
    policy of this module does).
    """
    problems = []
    for name, module in grouped_expert_modules(model):
        flags = {n: p.requires_grad for n, p in module.named_parameters()}
        if len(set(flags.values())) > 1:
            trainable = [n for n, f in flags.items() if f]
            frozen = [n for n, f in flags.items() if not f]
            problems.append(f"{name or '<model>'} ({type(module).__name__}): trainable {trainable}, "
                            f"frozen {frozen}")
    if problems:
        raise ConfigError(
            "grouped experts with mixed requires_grad: Transformer Engine's grouped linear takes requires_grad "
            "from the first expert's weight for every expert, so part of this would silently not train (or "
            "train although frozen): " + "; ".join(problems) + ". Use per-expert experts (SequentialMLP) when "
            "experts of one rank must differ in what trains.")


def _num_experts(model: nn.Module) -> int:
    return unwrap(model).flexolmo_config.num_experts
