"""The dense mixture path: when top-k equals the number of experts, run every expert on every token.

FlexOlmo's mixture is ``MoE(h) = Σ_{i ∈ TopK(p)} p_i · FFN_i(h)`` with ``p`` the fp32 softmax over
*all* experts and no renormalisation.  With top-k = E -- anchored training (2 of 2), router tuning
(E of E), the released FlexOlmo-7x7B-1T-RT serving config (7 of 7), the one-expert public model --
every token visits every expert, so Megatron's token dispatch (permute, all-to-all, unpermute and the
device-to-host copies that size them) moves tokens only to bring them back unchanged.  The dense
mixture computes the same sum directly:

* the router is Megatron's own call (:meth:`MoELayer.route`), so the probabilities, the z-loss and any
  load-balancing loss are exactly the dispatcher path's;
* each local expert runs on all tokens with its probability column as Megatron's ``per_token_scale``
  (applied after the activation, as the dispatcher path does), and the outputs are summed -- no
  permutation, no token dispatch, no host sync; a frozen expert (``requires_grad=False``) computes
  no weight gradient, as ever;
* across tensor/expert parallel ranks the tokens are all-gathered over Megatron's ``tp_ep`` group and
  the partial sums reduce-scattered back -- Megatron's all-gather dispatcher's collectives, minus its
  permutation.  An all-reduce of partial outputs would be wrong: the ranks of an expert-parallel
  group hold *different* tokens (they are data-parallel ranks of the attention), and each token
  needs the experts of every rank.  Expert-TP linears leave their partial sums to this
  reduce-scatter, exactly as they do under the dispatcher.

The path is chosen per layer from the ``TransformerConfig`` (:func:`select_expert_path`): ``"auto"``
takes the dense mixture whenever top-k = E and nothing in the configuration needs the dispatcher;
``"dense"`` / ``"dispatcher"`` force one (tests, benchmarks).  Parameters and checkpoints are the same
on both paths; :func:`set_expert_path` switches a built model.
"""

from __future__ import annotations

from typing import Literal

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import (
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_align_size_for_quantization
from torch import nn

from flexolmo_plugin.errors import ConfigError

ExpertPath = Literal["auto", "dense", "dispatcher"]
EXPERT_PATHS = ("auto", "dense", "dispatcher")
_ALL_STAGES = ["route", "expert_compute", "postprocess"]


def dense_mixture_blockers(config) -> list[str]:
    """Why the dense mixture would not compute what the dispatcher path computes (empty: it would)."""
    problems = []
    topk, experts = config.moe_router_topk, config.num_moe_experts
    if topk != experts:
        problems.append(f"top-k ({topk}) < number of experts ({experts}): each token visits only some experts")
    if config.moe_expert_capacity_factor is not None:
        problems.append("moe_expert_capacity_factor drops tokens (the dense mixture is dropless)")
    if config.moe_shared_expert_intermediate_size or config.moe_latent_size:
        problems.append("shared experts / latent projections are not FlexOlmo")
    if config.moe_apply_probs_on_input:
        problems.append("moe_apply_probs_on_input scales inputs instead of outputs")
    if config.transformer_impl == "inference_optimized":
        problems.append("transformer_impl='inference_optimized' brings its own inference dispatcher")
    for name in ("overlap_moe_expert_parallel_comm", "delay_wgrad_compute",
                 "overlap_dispatch_backward_with_experts_wgrad"):
        if getattr(config, name, False):
            problems.append(f"{name} overlaps the token dispatcher's communication")
    return problems


def select_expert_path(config, requested: str = "auto") -> str:
    """``"dense"`` or ``"dispatcher"``: the path a FlexOlmo MoE layer built from ``config`` takes.

    Raises:
        ConfigError: an unknown ``requested`` path, or ``"dense"`` where it would compute something else.
    """
    if requested not in EXPERT_PATHS:
        raise ConfigError(f"expert_path must be one of {EXPERT_PATHS}, got {requested!r}")
    blockers = dense_mixture_blockers(config)
    if requested == "dense" and blockers:
        raise ConfigError("expert_path='dense' is not valid here: " + "; ".join(blockers))
    if requested == "dispatcher" or blockers:
        return "dispatcher"
    return "dense"


def describe_expert_path(config, requested: str = "auto") -> str:
    """One line for run logs: which expert path the model's MoE layers take, and why."""
    path = select_expert_path(config, requested)
    k, e = config.moe_router_topk, config.num_moe_experts
    why = "forced" if requested != "auto" else "automatic"
    if path == "dense":
        return (f"expert path: dense mixture (top-{k} of {e}: every expert on every token, no token dispatch, "
                f"no host sync; {why})")
    return f"expert path: token dispatcher '{config.moe_token_dispatcher_type}' (top-{k} of {e}; {why})"


class FlexOlmoMoELayer(MoELayer):
    """Megatron's ``MoELayer`` with the dense mixture path (module docstring) taken when it applies.

    Args:
        config / submodules / *args / **kwargs: as for Megatron's ``MoELayer``.
        expert_path: ``"auto"``, ``"dense"`` or ``"dispatcher"`` (:func:`select_expert_path`).

    Raises:
        ConfigError: ``expert_path`` unknown, or ``"dense"`` where it does not apply.
    """

    def __init__(self, config, submodules=None, *args, expert_path: str = "auto", **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        self.set_expert_path(expert_path)

    @property
    def expert_path(self) -> str:
        """The path this layer takes: ``"dense"`` or ``"dispatcher"``."""
        return self._expert_path

    def set_expert_path(self, requested: str) -> str:
        """Select the path (``"auto"``, ``"dense"``, ``"dispatcher"``); returns the one taken.

        The router learns whether tokens are dispatched: without dispatch, a run-time expert mask may
        leave fewer than top-k experts (:attr:`DomainEmbeddingRouter.fixed_selection_count`).  A switch
        back to the dispatcher that the current mask would not survive is refused, and nothing changes.
        """
        path = select_expert_path(self.config, requested)
        router = self.router
        before = getattr(router, "dense_mixture", None)
        if before is not None:
            router.dense_mixture = path == "dense"
            excluded = router.excluded_experts
            try:
                router.set_excluded_experts(excluded)  # re-checks the mask against the new path
            except ConfigError:
                router.dense_mixture = before
                raise
        self._expert_path = path
        return path

    def forward(self, hidden_states: torch.Tensor, intermediate_tensors=None, padding_mask=None):
        if (self._expert_path != "dense" or intermediate_tensors is not None
                or self.fwd_execution_map != _ALL_STAGES):  # CUDA-graph partial capture: Megatron's own path
            return super().forward(hidden_states, intermediate_tensors, padding_mask)
        if self.training and self.attn_tp_group.size() > 1 and not self.config.sequence_parallel:
            raise ValueError("MoE with tensor parallelism needs sequence parallelism in training "
                             "(as Megatron's MoELayer requires)")
        if padding_mask is not None:  # [b, s] -> [s, b], as MoELayer.forward does
            padding_mask = padding_mask.transpose(0, 1).bool()
        if self.moe_layer_recompute and self.training:
            output = tensor_parallel.checkpoint(self._dense_mixture, False, hidden_states, padding_mask)
        else:
            output = self._dense_mixture(hidden_states, padding_mask)
        return output, None

    def _dense_mixture(self, hidden_states: torch.Tensor, padding_mask) -> torch.Tensor:
        """``Σ_e p_e · FFN_e(h)`` over the local experts, combined over the ``tp_ep`` group."""
        shape = hidden_states.shape
        probs, _ = self.route(hidden_states, padding_mask)  # [tokens, E] fp32, aux losses attached
        tokens = hidden_states.reshape(-1, shape[-1])
        group = self.token_dispatcher.tp_ep_group
        spread = group is not None and group.size() > 1
        if spread:  # every rank's tokens, in rank order (the all-gather dispatcher's layout)
            tokens = gather_from_sequence_parallel_region(tokens, group=group)
            probs = gather_from_sequence_parallel_region(probs, group=group)
        first = self.local_expert_indices[0]
        local_probs = probs[:, first:first + self.num_local_experts]
        count = tokens.shape[0]
        align = get_align_size_for_quantization(self.config)  # FP8/FP4 GEMMs: token count a multiple of it
        if align and count % align:
            pad = align - count % align  # zero tokens at weight 0, cut off below (SequentialMLP's own padding)
            tokens = torch.cat([tokens, tokens.new_zeros(pad, tokens.shape[1])])
            local_probs = torch.cat([local_probs, local_probs.new_zeros(pad, local_probs.shape[1])])
        # An expert opted out at run time gets probability 0 everywhere; it is skipped, not multiplied by 0:
        # its weights may be anything (a diverged expert is excluded precisely because they are NaN/Inf).
        excluded = set(self.router.excluded_experts)  # [] without a mask (no host work then)
        output = None
        for i, expert in enumerate(self.experts.local_experts):
            if first + i in excluded:
                continue
            out, bias = expert(tokens, local_probs[:, i])  # probabilities applied as the dispatcher applies them
            if bias is not None:
                raise ConfigError("FlexOlmo experts have no biases")
            out = out.to(probs.dtype)  # sum (and reduce) in fp32, as Megatron's all-gather combine does
            output = out if output is None else output + out
        if output is None:  # every local expert is opted out: this rank contributes nothing
            output = tokens.new_zeros(tokens.shape).to(probs.dtype)
        output = output[:count]
        if spread:
            if torch.is_grad_enabled() and not output.requires_grad:
                # Keep the collective's backward symmetric: a rank whose experts, inputs and router are all
                # frozen would otherwise skip the all-gather its peers wait for in backward.
                output = output.detach().requires_grad_()
            output = reduce_scatter_to_sequence_parallel_region(output, group=group)
        return output.to(hidden_states.dtype).view(shape)


def moe_layers(model: nn.Module) -> list[FlexOlmoMoELayer]:
    """The FlexOlmo MoE layers of ``model`` (any wrapper), in module order."""
    return [m for m in model.modules() if isinstance(m, FlexOlmoMoELayer)]


def set_expert_path(model: nn.Module, requested: str) -> list[str]:
    """Select the expert path of every FlexOlmo MoE layer of ``model``; returns the paths taken."""
    layers = moe_layers(model)
    if not layers:
        raise ConfigError("no FlexOlmo MoE layer in this model")
    return [layer.set_expert_path(requested) for layer in layers]
