"""What the routers of a FlexOlmo model decided, read from the real routers' outputs.

One mechanism for every consumer -- the evaluation's per-domain routing table
(:func:`flexolmo_plugin.lifecycle.evaluation.routing_counts`), and the per-sequence *attribution*
of ``flexolmo eval`` and ``flexolmo generate`` -- so that they cannot disagree about what a gate
weight is: a forward hook on each layer's ``DomainEmbeddingRouter`` receives Megatron's
``(probs, routing_map)`` (``[tokens, experts]``, tokens in Megatron's sequence-major ``[s, b]``
order, probabilities 0 for experts not selected, as the dispatcher uses them).

Attribution (FlexOlmo README: contributors "receive attributions whenever [their expert is] used for
inference"): per sequence, each expert's share of the routing mass -- its gate weight p_i summed over
layers and the sequence's tokens, divided by the total over experts, so the shares sum to 1.  This is
the mean gate weight over layers and tokens, normalised; top-k < E leaves some of the softmax mass to
unselected experts, which is no expert's contribution to the output and is therefore not counted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from flexolmo_plugin.model.build import unwrap

# (layer index, gate weights [tokens, experts], routing map [tokens, experts])
RouterCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


@contextlib.contextmanager
def router_outputs(model: nn.Module, callback: RouterCallback) -> Iterator[None]:
    """While active, ``callback(layer, probs, routing_map)`` runs after every router forward (this
    process's tokens; detached)."""
    handles = []
    for index, layer in enumerate(unwrap(model).decoder.layers):
        def hook(module, args, output, index=index):
            callback(index, output[0].detach(), output[1].detach())
        handles.append(layer.mlp.router.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def expert_names(model: nn.Module) -> tuple[str, ...]:
    """The experts' names as stored in the checkpoint (``expert0``, ... where it records none)."""
    config = unwrap(model).flexolmo_config
    return config.expert_names or tuple(f"expert{i}" for i in range(config.num_experts))


@contextlib.contextmanager
def gate_mass_per_sequence(model: nn.Module, batch: int) -> Iterator[list[torch.Tensor]]:
    """Yields a list that receives, for every forward run while active, one ``[seq, batch, experts]``
    float64 tensor: the gate weights of each position summed over layers (one entry per forward; the
    forward's ``batch`` must be the one given here)."""
    forwards: list[torch.Tensor] = []

    def collect(index: int, probs: torch.Tensor, routing_map: torch.Tensor) -> None:
        per_position = probs.to(torch.float64).cpu().reshape(-1, batch, probs.shape[-1])
        if index == 0:
            forwards.append(per_position.clone())
        else:
            forwards[-1] += per_position

    with router_outputs(model, collect):
        yield forwards


def shares(mass: torch.Tensor, names: tuple[str, ...]) -> dict[str, float]:
    """``{expert name: share}`` from one sequence's summed gate weights ``[experts]`` (sums to 1)."""
    total = float(mass.sum())
    if not total > 0:
        raise ValueError("no routing mass recorded for this sequence")
    return {name: float(value) / total for name, value in zip(names, mass.tolist())}
