"""Load HF FlexOlmo safetensors into a Megatron FlexOlmo model at whatever TP/EP layout it has.

Each rank reads only the tensors whose slices it holds (experts of other EP ranks are skipped),
builds the canonical Megatron tensor with the mapping table, cuts out its slice and copies it in.
Every local parameter must be filled exactly once; the learned router bias, which HF ``flex_olmo``
cannot store, is set to zero (no effect on routing), which is what an HF model computes.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from flexolmo_plugin.conversion.hf_layout import HFWeights
from flexolmo_plugin.conversion.mapping import Role, entries
from flexolmo_plugin.conversion.safetensors_reader import (
    CheckpointFormatError,
    SafetensorsCheckpoint,
)
from flexolmo_plugin.conversion.slots import check_complete, slots
from flexolmo_plugin.model.build import unwrap


@dataclass(frozen=True)
class ImportReport:
    tensors_read: int
    parameters_filled: int
    router_biases_zeroed: int


def load_hf_weights(model: nn.Module, hf_dir: str | os.PathLike) -> ImportReport:
    """Copy the HF checkpoint in ``hf_dir`` into ``model`` (any layout); validates everything first."""
    config = unwrap(model).flexolmo_config
    check_complete(model)
    pending = defaultdict(list)
    for slot in slots(model):
        pending[slot.canonical].append(slot)
    filled = read = 0
    with SafetensorsCheckpoint.open(hf_dir) as checkpoint:
        weights = HFWeights(checkpoint, config)
        with torch.no_grad():
            for entry in entries(config):
                if not entry.hf:
                    continue  # the learned router bias: no HF tensor, zeroed below
                targets = pending.pop(entry.megatron, None)
                if not targets:
                    continue  # e.g. an expert owned by another EP rank
                canonical = weights.canonical(entry)
                read += len(entry.hf)
                for slot in targets:
                    local = slot.select(canonical)
                    if tuple(local.shape) != tuple(slot.param.shape):
                        raise CheckpointFormatError(
                            f"{entry.megatron}: slice for {slot.local_name} has shape {list(local.shape)}, "
                            f"parameter has {list(slot.param.shape)}")
                    slot.param.copy_(local)
                    filled += 1
    zeroed = 0
    for remaining in pending.values():
        if remaining[0].role is not Role.ROUTER_BIAS:
            raise CheckpointFormatError(
                f"{hf_dir}: nothing in the mapping fills {[s.local_name for s in remaining]}")
        with torch.no_grad():
            for slot in remaining:
                slot.param.zero_()
                zeroed += 1
    return ImportReport(tensors_read=read, parameters_filled=filled, router_biases_zeroed=zeroed)
