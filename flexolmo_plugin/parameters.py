"""Where each canonical (whole, globally indexed) FlexOlmo tensor lives in a possibly sharded model.

Loading HF weights, exporting, and checking anchors all need the same answer to "which slice of
which canonical tensor is this local parameter?" under any TP/EP layout:

* column-parallel weights (QKV, expert fc1, output layer, embeddings, q/k norms) are split along
  rows over their TP group, row-parallel ones (attention output, expert fc2) along columns;
* the gated expert fc1 ``[gate; up]`` is split *per half* (each rank holds ``[gate_r; up_r]``);
* experts are split over EP ranks in contiguous blocks (``MoELayer.local_expert_indices``);
* expert weights use the expert-TP group, everything else the TP group;
* router rows are replicated, one Parameter per expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from .model import unwrap


@dataclass(frozen=True)
class Slot:
    """One local parameter and how it is cut out of a canonical tensor."""

    canonical: str
    local_name: str
    param: nn.Parameter
    select: Callable[[torch.Tensor], torch.Tensor]
    expert: int | None = None  # global expert index for expert weights and router rows


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


def _groups():
    from megatron.core import parallel_state as ps

    return {
        "tp": (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
        "etp": (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()),
    }


def slots(model: nn.Module) -> Iterator[Slot]:
    """Every local parameter of a FlexOlmo ``GPTModel`` with its canonical tensor and slicer."""
    model = unwrap(model)
    groups = _groups()
    tp_rank, tp = groups["tp"]
    etp_rank, etp = groups["etp"]
    column, row = _chunk(0, tp_rank, tp), _chunk(1, tp_rank, tp)

    yield Slot("embedding.word_embeddings.weight", "embedding.word_embeddings.weight",
               model.embedding.word_embeddings.weight, column)
    for local_index, layer in enumerate(model.decoder.layers):
        g = layer.layer_number - 1
        prefix, cprefix = f"decoder.layers.{local_index}", f"decoder.layers.{g}"
        attn = layer.self_attention
        for name, param, select in (
            ("self_attention.linear_qkv.weight", attn.linear_qkv.weight, column),
            ("self_attention.q_layernorm.weight", attn.q_layernorm.weight, column),
            ("self_attention.k_layernorm.weight", attn.k_layernorm.weight, column),
            ("self_attention.linear_proj.weight", attn.linear_proj.weight, row),
            ("post_self_attn_layernorm.weight", layer.post_self_attn_layernorm.weight, _whole),
            ("post_mlp_layernorm.weight", layer.post_mlp_layernorm.weight, _whole),
        ):
            yield Slot(f"{cprefix}.{name}", f"{prefix}.{name}", param, select)
        router = layer.mlp.router
        for e, param in enumerate(router.domain_embeddings):
            yield Slot(f"{cprefix}.mlp.router.weight", f"{prefix}.mlp.router.domain_embeddings.{e}",
                       param, _row(e), expert=e)
        if router.domain_biases is not None:
            for j, param in enumerate(router.domain_biases):
                yield Slot(f"{cprefix}.mlp.router.domain_bias", f"{prefix}.mlp.router.domain_biases.{j}",
                           param, _row(j), expert=j + 1)
        for j, expert_module in enumerate(layer.mlp.experts.local_experts):
            e = layer.mlp.local_expert_indices[j]
            local = f"{prefix}.mlp.experts.local_experts.{j}"
            yield Slot(f"{cprefix}.mlp.experts.{e}.linear_fc1.weight", f"{local}.linear_fc1.weight",
                       expert_module.linear_fc1.weight, _swiglu_chunk(etp_rank, etp), expert=e)
            yield Slot(f"{cprefix}.mlp.experts.{e}.linear_fc2.weight", f"{local}.linear_fc2.weight",
                       expert_module.linear_fc2.weight, _chunk(1, etp_rank, etp), expert=e)
    yield Slot("decoder.final_layernorm.weight", "decoder.final_layernorm.weight",
               model.decoder.final_layernorm.weight, _whole)
    yield Slot("output_layer.weight", "output_layer.weight", model.output_layer.weight, column)


def check_complete(model: nn.Module) -> None:
    """Fail if the model has parameters that :func:`slots` does not account for.

    Guards against a Megatron upgrade (or a spec change) adding a weight that loaders would then
    silently leave at its random initial value.
    """
    covered = {id(s.param) for s in slots(model)}
    missing = [name for name, p in unwrap(model).named_parameters() if id(p) not in covered]
    if missing:
        raise RuntimeError(f"parameters without a canonical mapping: {missing}")
