"""Where each canonical (whole, globally indexed) FlexOlmo tensor lives in a possibly sharded model.

Loading HF weights, exporting, freezing and checking anchors all need the same answer to "which
slice of which canonical tensor is this local parameter?" under any TP/EP layout.  The answer is
derived from the mapping table (:mod:`.mapping`: each rule's parameter path and split):

* column-parallel weights are split along rows over their TP group, row-parallel ones along
  columns; the gated expert fc1 ``[gate; up]`` is split *per half* (each rank holds ``[gate_r; up_r]``);
* experts are split over EP ranks in contiguous blocks (``MoELayer.local_expert_indices``) and use
  the expert-TP group, everything else the TP group;
* router rows and biases are replicated, one Parameter per row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from megatron.core import parallel_state as ps
from torch import nn

from flexolmo_plugin.conversion.mapping import RULES, Role, Rule, Split
from flexolmo_plugin.model.build import unwrap


@dataclass(frozen=True)
class Slot:
    """One local parameter and how it is cut out of a canonical tensor."""

    canonical: str
    local_name: str
    param: nn.Parameter
    select: Callable[[torch.Tensor], torch.Tensor]
    expert: int | None = None  # global expert index for expert weights, router rows and biases
    role: Role = Role.SHARED


def _chunk(dim: int, rank: int, size: int):
    def select(t: torch.Tensor) -> torch.Tensor:
        if t.shape[dim] % size:
            raise ValueError(f"dimension {dim} of size {t.shape[dim]} does not split over {size} ranks")
        return t.chunk(size, dim=dim)[rank]
    return select


def _swiglu_chunk(rank: int, size: int):
    def select(t: torch.Tensor) -> torch.Tensor:
        gate, up = t.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    return select


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t


def _row(index: int):
    return lambda t: t[index]


def _selector(rule: Rule, groups: dict[str, tuple[int, int]]):
    rank, size = groups["etp" if rule.per_expert else "tp"]
    return {Split.NONE: _whole, Split.COLUMN: _chunk(0, rank, size), Split.ROW: _chunk(1, rank, size),
            Split.SWIGLU: _swiglu_chunk(rank, size)}[rule.split]


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
