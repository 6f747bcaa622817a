"""Model FLOPs of a FlexOlmo training (or forward-only) step, aware of frozen weights.

MFU is usually computed with "6 × parameters" style formulas (Megatron-Bridge's
``num_floating_point_operations``): forward, input-gradient (dgrad) and weight-gradient (wgrad)
GEMMs all cost the same.  FlexOlmo's anchored training and router tuning freeze most weights, and
a frozen weight needs **no wgrad GEMM**; where no trainable parameter lies upstream of a GEMM (the
attention of layer 0 when embeddings and attention are frozen) it needs no dgrad either, because
autograd never propagates a gradient there.  Counting those would inflate TFLOPS/GPU by up to 1.5×,
so this module counts, per token and per GEMM:

* forward: ``2·m·n`` for a ``m → n`` projection; core attention (QKᵀ and AV) with the causal
  average of ``s/2`` keys per query, as Megatron-Bridge does;
* dgrad: the same again iff the GEMM's input carries a gradient (a trainable parameter precedes
  it); core attention's backward is twice its forward when its inputs carry a gradient;
* wgrad: the same again iff the weight is trainable.

Routed experts are weighted by the share of token slots they receive (``top_k`` slots per token,
uniform ``top_k / num_experts`` when no measured shares are given).  The router GEMM
(``hidden → num_experts``) is counted too; norms, softmax and elementwise work are not (as usual).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flexolmo_plugin.model.config import ConfigError, FlexOlmoConfig

POLICIES = ("all", "anchored", "router", "none")

# Dense peak throughput (no sparsity) per GPU, in FLOP/s: NVIDIA H100 SXM datasheet.
PEAK_FLOPS = {
    ("h100", "bf16"): 989.4e12,
    ("h100", "fp8"): 1978.9e12,
}


@dataclass(frozen=True, kw_only=True)
class Trainable:
    """Which weights receive gradients (norm weights carry no GEMM and only matter as 'upstream')."""

    embedding: bool
    attention: bool  # q/k/v/o projections and the q/k norms
    norms: bool  # the post-attention / post-MoE / final RMSNorm weights
    router: bool  # any router row (the stacked router GEMM's wgrad is computed whole)
    experts: tuple[bool, ...]  # per expert FFN
    output: bool

    @classmethod
    def policy(cls, name: str, num_experts: int, owner_expert: int = 1) -> Trainable:
        """The trainable set of a :mod:`recipes.provider` freezing policy (``none``: forward only)."""
        if name not in POLICIES:
            raise ConfigError(f"trainable policy {name!r}; expected one of {POLICIES}")
        everything = name == "all"
        if name == "anchored" and not 0 < owner_expert < num_experts:
            raise ConfigError(
                f"owner_expert must be in [1, {num_experts - 1}] for anchored training, got {owner_expert}"
            )
        experts = tuple(everything or (name == "anchored" and e == owner_expert) for e in range(num_experts))
        return cls(
            embedding=everything,
            attention=everything,
            norms=everything,
            router=name in ("all", "anchored", "router"),
            experts=experts,
            output=everything,
        )

    @property
    def any(self) -> bool:
        return self.embedding or self.attention or self.norms or self.router or any(self.experts) or self.output


@dataclass(frozen=True, kw_only=True)
class FlopCount:
    """FLOPs per step split by kind; ``total`` is what MFU divides by."""

    forward: float
    dgrad: float
    wgrad: float

    @property
    def total(self) -> float:
        return self.forward + self.dgrad + self.wgrad

    def __add__(self, other: FlopCount) -> FlopCount:
        return FlopCount(
            forward=self.forward + other.forward, dgrad=self.dgrad + other.dgrad, wgrad=self.wgrad + other.wgrad
        )

    def scaled(self, factor: float) -> FlopCount:
        return FlopCount(forward=self.forward * factor, dgrad=self.dgrad * factor, wgrad=self.wgrad * factor)


def _gemm(flops: float, *, grad_in: bool, trainable: bool) -> FlopCount:
    return FlopCount(forward=flops, dgrad=flops if grad_in else 0.0, wgrad=flops if trainable else 0.0)


def flops_per_token(
    config: FlexOlmoConfig, *, seq_length: int, trainable: Trainable, expert_shares: Sequence[float] | None = None
) -> FlopCount:
    """FLOPs of one token of a ``seq_length`` sequence through forward and (needed) backward.

    ``expert_shares``: fraction of all routed token slots each expert received (sums to 1, e.g.
    the training log's routed shares); default uniform.
    """
    d, f, e, k = config.hidden_size, config.intermediate_size, config.num_experts, config.top_k
    q_width = config.num_attention_heads * config.kv_channels
    kv_width = config.num_key_value_heads * config.kv_channels
    if seq_length < 1:
        raise ConfigError(f"seq_length must be positive, got {seq_length}")
    if len(trainable.experts) != e:
        raise ConfigError(f"trainable.experts has {len(trainable.experts)} entries for {e} experts")
    shares = [1.0 / e] * e if expert_shares is None else [float(s) for s in expert_shares]
    if len(shares) != e or any(s < 0 for s in shares) or abs(sum(shares) - 1.0) > 1e-6:
        raise ConfigError(f"expert_shares must be {e} non-negative fractions summing to 1, got {expert_shares}")
    slots = [k * s for s in shares]  # expert-token evaluations per token

    total = FlopCount(forward=0.0, dgrad=0.0, wgrad=0.0)
    live = trainable.embedding  # does the residual stream carry a gradient here?
    for _ in range(config.num_layers):
        # attention: qkv projection, core attention, output projection
        total += _gemm(2 * d * (q_width + 2 * kv_width), grad_in=live, trainable=trainable.attention)
        qkv_live = live or trainable.attention
        core = 2 * 2 * q_width * (seq_length / 2)  # QKᵀ and AV over s/2 keys on average (causal)
        total += FlopCount(forward=core, dgrad=2 * core if qkv_live else 0.0, wgrad=0.0)
        total += _gemm(2 * q_width * d, grad_in=qkv_live, trainable=trainable.attention)
        live = qkv_live or trainable.norms
        # MoE: router, then each expert's SwiGLU FFN (fc1: d -> 2f, fc2: f -> d) on its token slots
        total += _gemm(2 * d * e, grad_in=live, trainable=trainable.router)
        for slot, expert_trainable in zip(slots, trainable.experts):
            total += _gemm(2 * d * 2 * f * slot, grad_in=live, trainable=expert_trainable)
            total += _gemm(2 * f * d * slot, grad_in=live or expert_trainable, trainable=expert_trainable)
        live = live or trainable.router or trainable.norms or any(t and s > 0 for t, s in zip(trainable.experts, slots))
    total += _gemm(2 * d * config.padded_vocab_size, grad_in=live or trainable.norms, trainable=trainable.output)
    if not trainable.any:  # forward only (inference / evaluation)
        total = FlopCount(forward=total.forward, dgrad=0.0, wgrad=0.0)
    return total


def step_flops(
    config: FlexOlmoConfig,
    *,
    seq_length: int,
    global_batch_size: int,
    trainable: Trainable,
    expert_shares: Sequence[float] | None = None,
) -> FlopCount:
    """FLOPs of one optimizer step over ``global_batch_size`` sequences of ``seq_length`` tokens."""
    per_token = flops_per_token(config, seq_length=seq_length, trainable=trainable, expert_shares=expert_shares)
    return per_token.scaled(global_batch_size * seq_length)


def throughput(
    flops: float, seconds: float, *, num_gpus: int, peak_flops_per_gpu: float | None
) -> tuple[float, float | None]:
    """``(TFLOPS per GPU, MFU)``; MFU is None when the peak is unknown (e.g. on CPU)."""
    if seconds <= 0 or num_gpus < 1:
        raise ValueError(f"need positive time and GPU count, got {seconds} s on {num_gpus} GPUs")
    per_gpu = flops / seconds / num_gpus
    return per_gpu / 1e12, (per_gpu / peak_flops_per_gpu if peak_flops_per_gpu else None)


def peak_flops(device_name: str | None, precision: str) -> float | None:
    """Datasheet dense peak for a CUDA device name (``torch.cuda.get_device_name()``), else None.

    ``precision``: "bf16" or an "fp8-*" recipe name.  Only H100 is tabulated; other devices report
    TFLOPS without an MFU rather than an MFU against a guessed peak.
    """
    if not device_name:
        return None
    kind = "fp8" if precision.startswith("fp8") else "bf16"
    name = device_name.lower()
    if "h100" in name:
        return PEAK_FLOPS[("h100", kind)]
    return None
