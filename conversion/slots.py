"""Where each canonical (whole, globally indexed) FlexOlmo tensor lives in a possibly sharded model.

Loading HF weights, exporting, freezing and checking anchors all need the same answer to "which
slice of which canonical tensor is this local parameter?" under any TP/EP layout.  The answer is
derived from the mapping table (:mod:`.mapping`: each rule's parameter path and split):

* column-parallel weights are split along rows over their TP group, row-parallel ones along
  columns; the gated expert fc1 ``[gate; up]`` is split *per half* (each rank holds ``[gate_r; up_r]``);
* experts are split over EP ranks in contiguous blocks (``MoELayer.local_expert_indices``) and use
  the expert-TP group, everything else the TP group;
* router rows and biases are replicated, one Parameter per row.

Megatron-Bridge asks the same question parameter by parameter under Bridge's names (global layer and
expert numbers): :func:`param_sources` is that view of the table, :func:`shard` / :func:`unshard` the
one implementation of the TP cut that both :func:`slots` and the bridges use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from megatron.core import parallel_state as ps
from torch import nn

from flexolmo_plugin.conversion.mapping import RULES, Entry, Role, Rule, Split, entries
from flexolmo_plugin.errors import FlexOlmoError
from flexolmo_plugin.model.build import unwrap
from flexolmo_plugin.model.config import FlexOlmoConfig


@dataclass(frozen=True)
class Slot:
    """One local parameter and how it is cut out of a canonical tensor."""

    canonical: str
    local_name: str
    param: nn.Parameter
    select: Callable[[torch.Tensor], torch.Tensor]
    expert: int | None = None  # global expert index for expert weights, router rows and biases
    role: Role = Role.SHARED


def shard(tensor: torch.Tensor, split: Split, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s part (of ``size``) of a canonical tensor cut as ``split`` says."""
    if split is Split.NONE or size == 1:
        return tensor
    if split is Split.SWIGLU:
        gate, up = tensor.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    dim = 0 if split is Split.COLUMN else 1
    if tensor.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {tensor.shape[dim]} does not split over {size} ranks")
    return tensor.chunk(size, dim=dim)[rank]


def unshard(parts: list[torch.Tensor], split: Split) -> torch.Tensor:
    """Inverse of :func:`shard`: the canonical tensor from every rank's part, in rank order."""
    if split is Split.NONE or len(parts) == 1:
        return parts[0]
    if split is Split.SWIGLU:
        halves = [part.chunk(2, dim=0) for part in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=0 if split is Split.COLUMN else 1)


def _row(index: int):
    return lambda t: t[index]


def _selector(rule: Rule, groups: dict[str, tuple[int, int]]):
    rank, size = groups["etp" if rule.per_expert else "tp"]
    return lambda t: shard(t, rule.split, rank, size)


def _places(rule: Rule, layer, num_experts: int) -> list[tuple[int | None, dict]]:
    """``(global expert, extra template fields)`` of each local parameter of ``rule`` in ``layer``."""
    if rule.per_expert:
        return [(e, {"expert": e, "local_expert": j}) for j, e in enumerate(layer.mlp.local_expert_indices)]
    if rule.role is Role.ROUTER_ROW:
        return [(e, {"row": e}) for e in range(num_experts)]
    if rule.role is Role.ROUTER_BIAS:
        return [(j + 1, {"row": j}) for j in range(num_experts - 1)]
    return [(None, {})]


def slots(model: nn.Module) -> Iterator[Slot]:
    """Every local parameter of a FlexOlmo ``GPTModel`` with its canonical tensor and slicer."""
    model = unwrap(model)
    config = model.flexolmo_config
    groups = {"tp": (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
              "etp": (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size())}
    layers = [(local, layer.layer_number - 1, layer) for local, layer in enumerate(model.decoder.layers)]
    for rule in RULES:
        if not rule.present(config):
            continue
        selector = _selector(rule, groups)
        for local, index, layer in (layers if rule.per_layer else [(None, None, None)]):
            for expert, fields in _places(rule, layer, config.num_experts):
                canonical = rule.name(layer=index, expert=expert)
                local_name = (rule.param or rule.megatron).format(layer=local, **fields)
                select = _row(fields["row"]) if rule.rows else selector
                yield Slot(canonical, local_name, model.get_parameter(local_name), select, expert=expert,
                           role=rule.role)


def check_complete(model: nn.Module) -> None:
    """Fail if the model has parameters that :func:`slots` does not account for.

    Guards against a Megatron upgrade (or a spec change) adding a weight that loaders would then
    silently leave at its random initial value.
    """
    covered = {id(s.param) for s in slots(model)}
    missing = [name for name, p in unwrap(model).named_parameters() if id(p) not in covered]
    if missing:
        raise RuntimeError(f"parameters without a canonical mapping: {missing}")


# ---------------------------------------------------------------------- per-parameter view (Megatron-Bridge)
@dataclass(frozen=True)
class ParamSource:
    """One Megatron parameter, named as Megatron-Bridge names it (global layer and expert numbers,
    whatever the rank holds), with the canonical tensor it is cut from and the HF tensors that make it.

    Bridge converts parameter by parameter, while the table describes canonical tensors; the router
    is the one place where they differ (one ``Parameter`` per row: ``row`` is the row of ``entry``'s
    canonical tensor this parameter holds).  ``hf`` is empty for what has no HF tensor: the learned
    router bias, and the router of the dense OLMo-2 model (one expert, so any row routes everything to it).
    """

    param: str
    entry: Entry
    hf: tuple[str, ...]
    row: int | None = None


def _param_name(entry: Entry, row: int | None) -> str:
    template = entry.rule.param or entry.rule.megatron
    return template.format(layer=entry.layer, expert=entry.expert, local_expert=entry.expert, row=row)


def param_sources(config: FlexOlmoConfig, *, dense: bool = False) -> Iterator[ParamSource]:
    """Every parameter a FlexOlmo model with ``config`` can have, generated from :data:`RULES`.

    The learned router bias is included whether or not ``config`` has one (an HF config never says,
    yet a trained model may carry it, and an exporter must see it to refuse dropping it silently).
    ``dense``: the HF names are the OLMo-2 dense model's (``config`` must then have one expert).
    """
    if dense and config.num_experts != 1:
        raise FlexOlmoError(f"an OLMo-2 dense model is a FlexOlmo with one expert, not {config.num_experts}")
    full = config.replace(router_bias=True) if config.num_experts > 1 else config
    for entry in entries(full):
        hf = entry.dense() if dense else entry.hf
        if entry.rule.rows:
            rows = entry.shape(full)[0]
            for row in range(rows):
                yield ParamSource(_param_name(entry, row), entry, hf if entry.rule.role is Role.ROUTER_ROW else (), row)
        else:
            yield ParamSource(_param_name(entry, None), entry, hf)


def other_expert(source: ParamSource, expert: int, *, dense: bool = False) -> ParamSource:
    """The same FFN parameter of another expert (same layer): expert parallelism gathers experts
    that another rank holds under the name of the one this rank holds."""
    rule = source.entry.rule
    fill = {"layer": source.entry.layer, "expert": expert}
    entry = Entry(rule, rule.megatron.format(**fill), tuple(h.format(**fill) for h in rule.hf), source.entry.layer,
                  expert)
    return ParamSource(_param_name(entry, None), entry, entry.dense() if dense else entry.hf)
