"""Per-GPU memory estimate of a FlexOlmo recipe (``flexolmo plan``): will it fit an 80 GB H100?

Static memory (parameters, gradients, optimizer state) is counted exactly from the model's shape, the
parallel layout and the freezing policy, the way Megatron-Core allocates it:

* **parameters**: every local parameter, frozen or not, in the parameter dtype (BF16 under
  ``bf16_mixed``).  Dense tensors are split over TP (embedding and output layer by vocabulary rows,
  q/k/v/o and the q/k norms by heads); norms and router rows are replicated; each rank holds
  ``E / EP`` experts, each split over expert-TP.
* **gradients**: Megatron's DDP allocates a gradient buffer for *trainable* parameters only
  (frozen ones get none), FP32 when ``grad_reduce_in_fp32``, and not sharded even with the
  distributed optimizer (it reduce-scatters into the full buffer).
* **optimizer state**: per trainable parameter, Adam's two moments (``exp_avg_dtype``, FP32 by
  default), an FP32 main copy when the parameters are 16-bit, and an FP32 main gradient when the
  gradients are 16-bit; with the distributed optimizer sharded over the data-parallel group (the
  expert-data-parallel group for expert weights).  This is Megatron's table of bytes per parameter
  (``docs/source/api-guide/dist_optimizer.md``): BF16 params + FP32 grads = ``6 + 12/d``.

**Activations** of one micro-batch (PP = 1, so one micro-batch is in flight), counted like
Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", §4:
every tensor saved for the backward pass, in bytes per token), adapted to FlexOlmo's layer and to
what autograd really saves when weights are frozen.  Per layer and token, with ``T_sp`` the tokens
of a rank's sequence-parallel shard, ``q``/``kv`` the local query/key-value widths, ``a`` the local
heads, ``f' = f / ETP``, for 16-bit activations:

* attention (only if a gradient reaches it): the q/k/v projection's input ``2h`` (only when the
  attention weights train: a frozen Megatron/TE linear saves its weight, not its input); the q/k
  RMSNorms ``2(q+kv) + 8`` (16-bit input, FP32 ``rstd``: ``model/norms.py``); fused (flash) core
  attention ``2(q+2kv)`` (q, k, v after RoPE) ``+ 2q`` (its output, also the output projection's
  input) ``+ 4a`` (FP32 log-sum-exp); unfused attention adds the softmax output ``2as``
  (Korthikanti's ``5as/h`` term without dropout masks: FlexOlmo has no dropout);
* post-attention and post-MoE RMSNorm: ``2h + 4`` each (16-bit input, FP32 ``rstd``; their own
  backward recomputes the FP32 math -- Megatron's "layernorm" recompute covers only the identity
  input/pre-MLP slots; eager autograd kept ``8h``: the FP32 upcast and the normalised value);
* router: its input ``2h`` (Megatron's ``router_gating_linear`` saves it) and FP32 logits,
  probabilities and top-k probabilities ``12E``;
* experts, per routed token slot of a local expert (``k/E`` of the ``EP · ETP · T_sp`` tokens of
  the expert group reach each expert, i.e. exactly ``k/E`` for top-k = E): fc1's input ``2h`` and
  fc2's input ``2f'`` when that expert trains, the SwiGLU input ``4f'`` (fc1's output, saved by the
  fused weighted SwiGLU) whenever a gradient passes through the expert;
* the last stage adds the final RMSNorm (``2h + 4``), the output layer's input ``2h`` when it
  trains, and the loss: FP32 softmax ``4V/t`` saved by the vocabulary-parallel cross entropy plus
  the BF16 logits ``2V/t`` alive at that point (Korthikanti count ``4sbv/t``); forward-only
  evaluation keeps only this last term.

Residual adds and dropout with p = 0 save nothing; embeddings save only token ids.  Recompute:
``full`` keeps one ``2h`` input per recomputed chunk (``uniform``: every ``N`` layers; ``block``:
the first ``N`` layers individually) plus one chunk's activations while it is recomputed;
``selective`` drops what each module in ``recompute_modules`` recomputes (``moe``: everything of
the MoE but its input; ``moe_act``: fc2's input; ``core_attn``: log-sum-exp and the unfused
softmax; ``layernorm`` covers nothing here).  The estimate assumes routing as balanced as
top-k = E makes it; a skewed router makes the busiest expert's rank hold more.  A fixed
:data:`RESERVE` stands for the CUDA context, NCCL buffers and library workspaces; allocator
fragmentation is not modelled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from flexolmo_plugin.model.config import ConfigError, FlexOlmoConfig
from flexolmo_plugin.recipes.flops import Trainable

GiB = 2**30
H100_80GB = 81559 * 2**20  # nvidia-smi's total for an H100 80 GB (SXM/PCIe): 81559 MiB
RESERVE = int(2.5 * GiB)  # CUDA context (~0.5 GiB), NCCL buffers, cuBLAS/TE workspaces
_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
_RSTD = 4  # bytes per token of a memory-lean RMSNorm's saved fp32 1/rms (it saves that and its 16-bit input)


@dataclass(frozen=True, kw_only=True)
class Layout:
    """What the estimate needs of the parallel layout; ``world_size`` GPUs in all."""

    tensor_parallel: int = 1
    expert_parallel: int = 1
    expert_tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_parallel: bool = False
    world_size: int = 1

    def __post_init__(self):
        dense, expert = self.tensor_parallel * self.pipeline_parallel, self.expert_parallel * \
            self.expert_tensor_parallel * self.pipeline_parallel
        if self.world_size % dense or self.world_size % expert:
            raise ConfigError(f"{self.world_size} GPUs cannot hold TP x PP = {dense} and EP x expert-TP x PP = "
                              f"{expert} model-parallel groups")

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.tensor_parallel * self.pipeline_parallel)

    @property
    def expert_data_parallel(self) -> int:
        return self.world_size // (self.expert_parallel * self.expert_tensor_parallel * self.pipeline_parallel)


@dataclass(frozen=True, kw_only=True)
class Numerics:
    """Byte sizes Megatron allocates with: parameters, gradient buffer, Adam moments."""

    param_bytes: int = 2
    grad_bytes: int = 4
    moment_bytes: int = 4
    optimizer: str = "adam"
    distributed_optimizer: bool = True

    @property
    def state_bytes(self) -> int:
        """Optimizer bytes per trainable parameter (before sharding)."""
        moments = {"adam": 2, "sgd": 1}.get(self.optimizer, 2) * self.moment_bytes
        main_param = 4 if self.param_bytes < 4 else 0
        main_grad = 4 if self.grad_bytes < 4 else 0
        return moments + main_param + main_grad


@dataclass(frozen=True, kw_only=True)
class Activations:
    """What one micro-batch's activations depend on besides the model."""

    seq_length: int
    micro_batch_size: int = 1
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    recompute_modules: tuple[str, ...] = ()
    flash_attention: bool = True


@dataclass(frozen=True)
class ParameterCount:
    """Parameters held by one rank, split into trainable and frozen, dense and expert."""

    trainable_dense: int = 0
    frozen_dense: int = 0
    trainable_expert: int = 0
    frozen_expert: int = 0

    @property
    def trainable(self) -> int:
        return self.trainable_dense + self.trainable_expert

    @property
    def frozen(self) -> int:
        return self.frozen_dense + self.frozen_expert

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU (the rank that holds the most: the owner's expert, the last stage)."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    reserve: int
    counts: ParameterCount
    notes: tuple[str, ...] = field(default=())

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.reserve

    def fits(self, capacity: int = H100_80GB) -> bool:
        return self.total <= capacity

    def rows(self) -> list[tuple[str, int]]:
        return [("parameters", self.parameters), ("gradients", self.gradients), ("optimizer state", self.optimizer),
                ("activations", self.activations), ("reserve", self.reserve), ("total", self.total)]


def local_experts(config: FlexOlmoConfig, layout: Layout, trainable: Trainable) -> range:
    """The experts of the rank estimated: the EP block holding a trainable expert if one trains."""
    per_rank = config.num_experts // layout.expert_parallel
    first_trained = next((e for e, t in enumerate(trainable.experts) if t), 0)
    start = first_trained // per_rank * per_rank
    return range(start, start + per_rank)


def count_parameters(config: FlexOlmoConfig, layout: Layout, trainable: Trainable, *,
                     owner_expert: int | None = None) -> ParameterCount:
    """Local parameters of one rank (see :func:`local_experts`) by trainability.

    ``trainable.router`` covers all router rows and biases unless ``owner_expert`` is given (anchored
    training: only that expert's row and bias train).
    """
    h, tp, etp = config.hidden_size, layout.tensor_parallel, layout.expert_tensor_parallel
    e, f = config.num_experts, config.intermediate_size
    if config.num_experts % layout.expert_parallel or f % etp or config.padded_vocab_size % tp:
        raise ConfigError(f"layout TP {tp} / EP {layout.expert_parallel} / expert-TP {etp} does not split the model")
    q, kv = config.query_width // tp, config.key_width // tp
    counts = {"trainable_dense": 0, "frozen_dense": 0, "trainable_expert": 0, "frozen_expert": 0}

    def add(n: int, train: bool, expert: bool = False) -> None:
        counts[f"{'trainable' if train else 'frozen'}_{'expert' if expert else 'dense'}"] += n

    vocab = config.padded_vocab_size // tp
    add(vocab * h, trainable.embedding)
    add(vocab * h, trainable.output)
    add(h, trainable.norms)  # final norm
    rows = range(e)
    biases = range(1, e) if config.router_bias else range(0)
    for _ in range(config.num_layers):
        add(h * (q + 2 * kv) + q * h + q + kv, trainable.attention)  # qkv, proj, q/k norms
        add(2 * h, trainable.norms)  # post-attention and post-MoE norms
        for row in rows:
            add(h, trainable.router and (owner_expert is None or row == owner_expert))
        for bias in biases:
            add(1, trainable.router and (owner_expert is None or bias == owner_expert))
        for expert in local_experts(config, layout, trainable):
            add((h * 2 * f + f * h) // etp, trainable.experts[expert], expert=True)
    return ParameterCount(**counts)


def _layer_activations(config: FlexOlmoConfig, layout: Layout, act: Activations, trainable: Trainable,
                       live: bool) -> tuple[float, bool]:
    """Bytes one layer saves for backward (and whether its output carries a gradient)."""
    tp, etp = layout.tensor_parallel, layout.expert_tensor_parallel
    tokens = act.seq_length * act.micro_batch_size
    t_sp = tokens / tp if layout.sequence_parallel else tokens
    h, e, k = config.hidden_size, config.num_experts, config.top_k
    q, kv, heads = config.query_width / tp, config.key_width / tp, config.num_attention_heads / tp
    f = config.intermediate_size / etp
    modules = set(act.recompute_modules) if act.recompute_granularity == "selective" else set()
    total = 0.0
    # attention
    qkv_live = live or trainable.attention
    if trainable.attention:
        total += 2 * h * t_sp
    if qkv_live:
        total += (2 * (q + kv) + 2 * _RSTD) * tokens  # q/k norms: 16-bit input, fp32 rstd
        total += (2 * (q + 2 * kv) + 2 * q) * tokens  # q, k, v after RoPE; attention output
        if "core_attn" not in modules:
            total += 4 * heads * tokens + (0 if act.flash_attention else 2 * heads * act.seq_length * tokens)
        total += (2 * h + _RSTD) * t_sp  # post-attention norm
    mid_live = qkv_live or trainable.norms
    # MoE
    experts_live = mid_live or trainable.router or any(trainable.experts)
    if experts_live:
        if "moe" in modules:
            total += 2 * h * t_sp
        else:
            total += (2 * h + 12 * e) * t_sp  # router input, fp32 logits / probabilities
            slots = k / e * layout.expert_parallel * etp * t_sp  # token slots of each local expert
            for expert in local_experts(config, layout, trainable):
                trains = trainable.experts[expert]
                per_slot = 4 * f  # SwiGLU input (fc1's output)
                if trains:
                    per_slot += 2 * h + (0 if "moe_act" in modules else 2 * f)
                total += per_slot * slots
        total += (2 * h + _RSTD) * t_sp  # post-MoE norm
    return total, experts_live


def activation_bytes(config: FlexOlmoConfig, layout: Layout, act: Activations, trainable: Trainable) -> float:
    """Activation bytes of one micro-batch on one rank (formulas in the module docstring)."""
    tokens = act.seq_length * act.micro_batch_size
    if not trainable.any:  # forward only: nothing is kept past its layer; the logits and loss peak last
        return 6.0 * config.padded_vocab_size / layout.tensor_parallel * tokens
    t_sp = tokens / layout.tensor_parallel if layout.sequence_parallel else tokens
    h, layers = config.hidden_size, config.num_layers
    per_layer, live = [], trainable.embedding
    for _ in range(layers):
        size, live = _layer_activations(config, layout, act, trainable, live)
        per_layer.append(size)
    if act.recompute_granularity == "full":
        n = max(1, min(act.recompute_num_layers or 1, layers))
        if act.recompute_method == "block":
            stored = n * 2 * h * t_sp + sum(per_layer[n:]) + max(per_layer[:n])
        else:  # uniform (Megatron's default method)
            chunks = math.ceil(layers / n)
            stored = chunks * 2 * h * t_sp + max(sum(per_layer[i:i + n]) for i in range(0, layers, n))
    else:
        stored = sum(per_layer)
    vocab = config.padded_vocab_size / layout.tensor_parallel
    final = (2 * h + _RSTD) * t_sp if live else 0.0
    output_input = 2 * h * t_sp if trainable.output else 0.0
    loss = (4 + 2) * vocab * tokens
    return stored + final + output_input + loss


def estimate(config: FlexOlmoConfig, layout: Layout, numerics: Numerics, act: Activations, trainable: Trainable, *,
             owner_expert: int | None = None, reserve: int = RESERVE) -> MemoryEstimate:
    """The per-GPU estimate of the rank that holds the most (see the module docstring)."""
    counts = count_parameters(config, layout, trainable, owner_expert=owner_expert)
    if numerics.distributed_optimizer:
        optimizer = numerics.state_bytes * (math.ceil(counts.trainable_dense / layout.data_parallel)
                                            + math.ceil(counts.trainable_expert / layout.expert_data_parallel))
    else:
        optimizer = numerics.state_bytes * counts.trainable
    notes = []
    if act.recompute_granularity == "selective" and set(act.recompute_modules) - {"core_attn", "moe", "moe_act"}:
        notes.append(f"recompute modules {sorted(set(act.recompute_modules) - {'core_attn', 'moe', 'moe_act'})} "
                     "save nothing in this estimate (FlexOlmo's input/pre-MLP norms are identities)")
    return MemoryEstimate(
        parameters=numerics.param_bytes * counts.total,
        gradients=numerics.grad_bytes * counts.trainable,
        optimizer=optimizer,
        activations=int(math.ceil(activation_bytes(config, layout, act, trainable))),
        reserve=reserve,
        counts=counts,
        notes=tuple(notes),
    )


# ------------------------------------------------------------------------------- from a recipe
def _mixed_precision(container):
    mp = container.mixed_precision
    if isinstance(mp, str):
        from megatron.bridge.training.mixed_precision import get_mixed_precision_config

        mp = get_mixed_precision_config(mp)
    return mp


def numerics_of(container) -> Numerics:
    """Parameter / gradient / optimizer bytes of a Bridge ``ConfigContainer`` (its mixed-precision
    config applies to the model when training starts, so it decides over ``model.params_dtype``)."""
    mp = _mixed_precision(container)
    params_dtype = mp.params_dtype if mp is not None and mp.params_dtype is not None else container.model.params_dtype
    param_bytes = _BYTES[params_dtype]
    reduce_fp32 = mp.grad_reduce_in_fp32 if mp is not None else container.ddp.grad_reduce_in_fp32
    grad_bytes = 4 if (reduce_fp32 or param_bytes == 4) else param_bytes
    optimizer = container.optimizer
    moment_bytes = _BYTES.get(getattr(optimizer, "exp_avg_dtype", torch.float32), 4)
    return Numerics(param_bytes=param_bytes, grad_bytes=grad_bytes, moment_bytes=moment_bytes,
                    optimizer=optimizer.optimizer, distributed_optimizer=bool(optimizer.use_distributed_optimizer))


def layout_of(container, world_size: int | None = None) -> Layout:
    """The container's parallel layout on ``world_size`` GPUs (default: the smallest that holds it)."""
    model = container.model
    tp, ep = model.tensor_model_parallel_size, model.expert_model_parallel_size
    etp = model.expert_tensor_parallel_size or tp
    pp = model.pipeline_model_parallel_size
    if world_size is None:
        world_size = math.lcm(tp * pp, ep * etp * pp)
    return Layout(tensor_parallel=tp, expert_parallel=ep, expert_tensor_parallel=etp, pipeline_parallel=pp,
                  sequence_parallel=bool(model.sequence_parallel), world_size=world_size)


def activations_of(container, *, flash_attention: bool = True) -> Activations:
    model = container.model
    return Activations(seq_length=model.seq_length, micro_batch_size=container.train.micro_batch_size,
                       recompute_granularity=model.recompute_granularity, recompute_method=model.recompute_method,
                       recompute_num_layers=model.recompute_num_layers,
                       recompute_modules=tuple(model.recompute_modules or ()), flash_attention=flash_attention)


def estimate_container(container, world_size: int | None = None, *, flash_attention: bool = True):
    """``(config, layout, numerics, trainable, estimate)`` of a recipe's ``ConfigContainer``."""
    model = container.model
    config = model.to_flexolmo_config()
    layout = layout_of(container, world_size)
    if layout.pipeline_parallel != 1:
        raise ConfigError("the memory estimate covers pipeline parallelism 1 only")
    numerics = numerics_of(container)
    skip_train = bool(getattr(container.validation, "skip_train", False))
    policy = "none" if skip_train else model.trainable
    trainable = Trainable.policy(policy, config.num_experts, model.owner_expert)
    owner = model.owner_expert if policy == "anchored" else None
    result = estimate(config, layout, numerics, activations_of(container, flash_attention=flash_attention),
                      trainable, owner_expert=owner)
    if skip_train:  # forward-only evaluation: Bridge still builds the (router-only) optimizer
        train_only = Trainable.policy(model.trainable, config.num_experts, model.owner_expert)
        static = estimate(config, layout, numerics, activations_of(container), train_only)
        result = MemoryEstimate(result.parameters, static.gradients, static.optimizer, result.activations,
                                result.reserve, static.counts, result.notes)
    return config, layout, numerics, trainable, result


def describe(recipe: str, container, world_size: int | None = None, *, capacity: int = H100_80GB,
             flash_attention: bool = True) -> tuple[str, bool]:
    """The text ``flexolmo plan`` prints, and whether it fits ``capacity``."""
    config, layout, numerics, trainable, result = estimate_container(container, world_size,
                                                                     flash_attention=flash_attention)
    model = container.model
    c = result.counts
    mode = "forward only" if not trainable.any else model.trainable + (
        f" (owner expert {model.owner_expert})" if model.trainable == "anchored" else "")
    recompute = model.recompute_granularity or "none"
    if model.recompute_granularity == "full":
        recompute += f" ({model.recompute_method or 'uniform'}, {model.recompute_num_layers or 1} layers)"
    elif model.recompute_granularity == "selective":
        recompute += f" ({', '.join(model.recompute_modules or ())})"
    sharded = (f"distributed optimizer: sharded over DP {layout.data_parallel} / expert-DP "
               f"{layout.expert_data_parallel}") if numerics.distributed_optimizer else "optimizer not sharded"
    lines = [
        f"plan for {recipe}: {config.num_experts} expert(s), top-{config.top_k}, {config.num_layers} layers, hidden "
        f"{config.hidden_size}, FFN {config.intermediate_size}, vocabulary {config.padded_vocab_size} (padded)",
        f"layout: {layout.world_size} GPUs; TP {layout.tensor_parallel}, EP {layout.expert_parallel}, expert-TP "
        f"{layout.expert_tensor_parallel}, PP {layout.pipeline_parallel}, sequence parallel "
        f"{'on' if layout.sequence_parallel else 'off'}; DP {layout.data_parallel}, expert-DP "
        f"{layout.expert_data_parallel}",
        f"numerics: {numerics.param_bytes}-byte parameters, {numerics.grad_bytes}-byte gradients, "
        f"{numerics.optimizer} state {numerics.state_bytes} bytes per trainable parameter; {sharded}",
        f"trains: {mode}; this rank holds {c.total:,} parameters ({c.trainable:,} trainable, {c.frozen:,} frozen)",
        f"activations: micro-batch {container.train.micro_batch_size} x {model.seq_length} tokens, recompute "
        f"{recompute}, {'fused (flash)' if flash_attention else 'unfused'} attention",
        "per-GPU memory:",
    ]
    lines += [f"  {name:<16} {value / GiB:8.2f} GiB" for name, value in result.rows()]
    fits = result.fits(capacity)
    lines.append(f"  {'capacity':<16} {capacity / GiB:8.2f} GiB (H100 80 GB)")
    lines += [f"note: {n}" for n in result.notes]
    if fits and result.total > 0.95 * capacity:
        lines.append("note: within 5% of the capacity; allocator fragmentation (not modelled) may still run out")
    return "\n".join(lines), fits
