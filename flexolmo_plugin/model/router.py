"""FlexOlmo's router: one *domain embedding* row per expert, softmax over all experts, top-k.

Why a ``TopKRouter`` subclass rather than the stock router:

* **Per-expert rows.**  A data owner trains only its own row r_i while the public row r_pub stays
  frozen.  Freezing must be ``requires_grad=False`` (so the optimizer and weight decay never see
  it), which needs one ``Parameter`` per row; Megatron's router is a single ``[E, H]`` Parameter.
  Checkpoints store each row under its own key (``...router.domain_embeddings.{e}``), so that a
  frozen row and a trained row never share a key (see :mod:`.experts` for why that matters);
  conversion tools assemble the ``[E, H]`` router matrix from them.
* **Optional learned bias** ``min(b_i, 0)`` on non-public experts (paper §3.4): a per-expert
  Parameter, absent for the public expert, clamped so that it can only lower a domain's logit.
  It stays fp32 under Megatron's ``Float16Module`` (which casts the whole model to bf16/fp16), as
  Megatron keeps its own ``expert_bias`` fp32: a bias rounded to bf16 would move a domain's logit
  by up to 2^-9 of its value and swallow small optimizer updates.  Megatron re-casts its bias (a
  buffer) in every forward; ours is a trained Parameter, so it is kept fp32 at the cast itself
  (before DDP builds its buffers), which keeps the Parameter, its fp32 gradient buffer and the
  optimizer's view of it consistent.
* **Runtime expert mask** (opt-out without a new checkpoint): masked experts get ``-inf`` logits,
  so the softmax runs over the remaining experts -- exactly what physically removing the expert
  and its row computes -- and they are never selected.  Megatron's dropless all-to-all dispatcher
  sizes its buffers for exactly top-k selections per token, so with it at least top-k experts
  must remain; the all-gather dispatcher (or a capacity factor) counts real selections and lets
  top-k shrink to the remaining experts, as physical opt-out does; so does the dense mixture path
  (:mod:`.dense_mixture`, top-k = E), which dispatches nothing.

Everything else -- fp32 gating GEMM, z-loss, aux losses, capacity -- is Megatron's own code path.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from megatron.core.transformer.moe.moe_utils import router_gating_linear
from megatron.core.transformer.moe.router import TopKRouter
from torch import nn

from flexolmo_plugin.errors import ConfigError

SUPPORTED_BALANCING = {"none", "aux_loss", "seq_aux_loss", "global_aux_loss"}
_HALF_DTYPES = (torch.bfloat16, torch.float16)


def _check_router_config(config) -> None:
    problems = []
    if config.moe_router_score_function != "softmax":
        problems.append(f"moe_router_score_function must be 'softmax' (got {config.moe_router_score_function!r})")
    if not config.moe_router_pre_softmax:
        problems.append("moe_router_pre_softmax must be True (softmax over all experts, then top-k)")
    if config.moe_router_topk_scaling_factor not in (None, 1.0):
        problems.append("moe_router_topk_scaling_factor must be None (FlexOlmo does not rescale)")
    if config.moe_router_num_groups or config.moe_router_group_topk:
        problems.append("group-limited routing is not FlexOlmo")
    if config.moe_router_enable_expert_bias:
        problems.append("moe_router_enable_expert_bias (aux-loss-free bias) is not FlexOlmo's bias; "
                        "use the domain bias of DomainEmbeddingRouter instead")
    if config.add_bias_linear:
        problems.append("add_bias_linear must be False (FlexOlmo has no biases)")
    types = config.moe_router_load_balancing_type
    types = types if isinstance(types, (list, tuple)) else [types]
    if not set(types) <= SUPPORTED_BALANCING:
        problems.append(f"moe_router_load_balancing_type {types} not in {sorted(SUPPORTED_BALANCING)}")
    if problems:
        raise ConfigError("DomainEmbeddingRouter: " + "; ".join(problems))


class DomainEmbeddingRouter(TopKRouter):
    """Top-k softmax router whose rows are the experts' domain embeddings (expert 0 = public).

    Plugged into Megatron's ``MoELayer`` through ``MoESubmodules(router=...)``.

    Args:
        config: the Megatron ``TransformerConfig`` (softmax pre-top-k routing, fp32, no scaling).
        pg_collection / is_mtp_layer: as for Megatron's ``TopKRouter``.
        domain_bias: add the learned bias ``min(b_i, 0)`` of each non-public expert.

    Raises:
        ConfigError: router settings that would not compute FlexOlmo's routing.
    """

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, *, domain_bias: bool = False):
        _check_router_config(config)
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        initial = self.weight.detach()
        del self.weight  # replaced by one Parameter per expert below
        sequence_parallel = bool(config.sequence_parallel)
        self.domain_embeddings = nn.ParameterList(
            nn.Parameter(initial[e].clone()) for e in range(self.num_experts))
        self.domain_biases = None
        if domain_bias:
            # Zero start: min(0, 0) = 0 leaves routing unchanged until training moves it.
            self.domain_biases = nn.ParameterList(
                nn.Parameter(torch.zeros(1, dtype=torch.float32)) for _ in range(self.num_experts - 1))
        for param in self.parameters():
            param.sequence_parallel = sequence_parallel  # replicated: grads summed over TP under SP
        self._excluded: torch.Tensor | None = None
        self.dense_mixture = False  # the MoE layer runs every expert on every token (no dispatcher)

    def _apply(self, fn, *args, **kwargs):
        """``Module._apply`` (``.to``, ``.cuda``, ``.bfloat16()``, ``.half()``...) with the domain biases
        kept fp32: a conversion to a 16-bit float restores their fp32 values (on the new device),
        as Megatron does for its ``expert_bias``; every other conversion applies to them as usual."""
        try:
            biases = list(self.domain_biases or ())
        except AttributeError:  # called before __init__ has set them
            biases = []
        before = [(b.data, None if b.grad is None else b.grad.data) for b in biases]  # _apply rebinds .data
        result = super()._apply(fn, *args, **kwargs)
        for bias, (data, grad) in zip(biases, before):
            if bias.dtype in _HALF_DTYPES and data.dtype == torch.float32:
                bias.data = data.to(device=bias.device)
                if grad is not None:
                    bias.grad = grad.to(device=bias.device)
        return result

    # ------------------------------------------------------------------ routing
    def router_matrix(self) -> torch.Tensor:
        """All rows stacked, ``[num_experts, hidden]`` (differentiable into each row)."""
        return torch.stack(list(self.domain_embeddings))

    def domain_bias_vector(self) -> torch.Tensor | None:
        """``[num_experts]`` fp32 logit offsets: 0 for the public expert, ``min(b_i, 0)`` otherwise."""
        if self.domain_biases is None:
            return None
        biases = torch.cat([b.float() for b in self.domain_biases]).clamp(max=0.0)
        return torch.cat([biases.new_zeros(1), biases])

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        logits = router_gating_linear(input, self.router_matrix(), None, torch.float32)
        bias = self.domain_bias_vector()
        if bias is not None:
            logits = logits + bias
        if self._excluded is not None:
            logits = logits.masked_fill(self._excluded.to(logits.device), float("-inf"))
        return logits

    @property
    def fixed_selection_count(self) -> bool:
        """Whether the token dispatcher requires exactly top-k selections per token (never on the dense
        mixture path, which dispatches nothing: set by :class:`~.dense_mixture.FlexOlmoMoELayer`)."""
        c = self.config
        return (not self.dense_mixture and c.moe_token_dispatcher_type != "allgather"
                and c.moe_expert_capacity_factor is None and not c.moe_router_padding_for_quantization)

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        # With a fixed count, at least top-k unmasked experts exist and win top-k (masked
        # probabilities are exactly 0); only an exact tie with an underflowed expert could pick a
        # masked one, at weight 0, which must then stay in the map to keep the count.
        if self._excluded is not None and not self.fixed_selection_count:
            keep = ~self._excluded.to(routing_map.device)
            routing_map = routing_map & keep
            probs = probs * keep.to(probs.dtype)  # already exactly 0 there; keeps the map consistent
        return probs, routing_map

    # ------------------------------------------------------------------ opt-out at run time
    def set_excluded_experts(self, experts: Iterable[int] | None) -> None:
        """Exclude experts (global indices) from routing until called again with ``None``/``[]``."""
        experts = sorted(set(experts or ()))
        if not experts:
            self._excluded = None
            return
        bad = [e for e in experts if not 0 <= e < self.num_experts]
        if bad:
            raise ConfigError(f"expert indices {bad} out of range for {self.num_experts} experts")
        if len(experts) == self.num_experts:
            raise ConfigError("cannot exclude every expert")
        remaining = self.num_experts - len(experts)
        if self.fixed_selection_count and remaining < self.topk:
            raise ConfigError(
                f"excluding {len(experts)} experts leaves {remaining} < top-k={self.topk}, but the "
                f"'{self.config.moe_token_dispatcher_type}' dispatcher routes exactly top-k experts per token; "
                "build the model with dispatcher='allgather' (top-k then shrinks to the remaining experts) "
                "or opt the experts out physically")
        mask = torch.zeros(self.num_experts, dtype=torch.bool)
        mask[experts] = True
        self._excluded = mask

    @property
    def excluded_experts(self) -> list[int]:
        return [] if self._excluded is None else self._excluded.nonzero().flatten().tolist()
