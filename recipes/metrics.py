"""FlexOlmo's training metrics on Bridge's ``pretrain()`` loop: stdout, TensorBoard and W&B.

:func:`training_log_callback` is the Bridge callback :func:`flexolmo_plugin.recipes.train.run` installs.
Per iteration it measures, over the tokens of *every* rank:

* each expert's **routed share** -- the fraction of all routed (token, expert) slots that went to the
  expert, all MoE layers pooled.  The shares sum to 1; ``top_k x share`` is the fraction of tokens
  that reach the expert (1 for every expert when top-k = number of experts).
* each expert's **mean gate weight** -- its routing probability averaged over every router
  evaluation (token x layer), 0 where the expert was not selected.  Routing is a softmax over all
  experts with no renormalisation after top-k, so the weights sum to at most 1 (exactly 1 when
  every expert is active).
* model **TFLOPS per GPU** and **MFU** from :mod:`flexolmo_plugin.recipes.flops` (no weight-gradient
  GEMM for frozen weights, experts weighted by the measured shares).

The router statistics are summed over the whole world before they are divided: each rank's routers
see that rank's tokens (data-parallel and expert-parallel ranks have different micro-batches; with
sequence parallelism the tensor-parallel ranks hold different sequence slices; context-parallel
ranks hold different chunks; pipeline stages hold different layers), so the world sum counts every
(token, layer) router evaluation of the step; a replica that evaluates the same tokens again (TP
without sequence parallelism) scales numerator and denominator alike and leaves the ratios exact.

They are printed on rank 0 and written through Bridge's own writers -- ``state.tensorboard_logger``
(``logger.tensorboard_dir``; our recipes set ``<save_dir>/tb_logs`` as Bridge's recipes do) and
``state.wandb_logger`` (when ``logger.wandb_project`` is set) -- which exist on the last rank only,
under ``flexolmo/routed-share/<expert>``, ``flexolmo/gate-weight/<expert>``,
``flexolmo/tflops-per-gpu``, ``flexolmo/mfu`` (where the GPU's peak is tabulated) and
``flexolmo/tokens-per-s``.  The router z-loss is Megatron's own MoE metric, which Bridge's
``training_log`` writes as ``z_loss`` whenever ``moe_z_loss_coeff`` is set (the expert and
router-tuning recipes set it).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from flexolmo_plugin.compat import default_device, device_name
from flexolmo_plugin.model.build import unwrap

PREFIX = "flexolmo/"


class RouterStatistics:
    """Per-expert routed-slot counts, gate-weight sums and the number of router evaluations, from
    forward hooks on every router of this rank (accumulated on the router's device)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self._sums: torch.Tensor | None = None  # [counts (E), gate weights (E), evaluations (1)]
        self._handles = []

    def attach(self, models) -> None:
        for model in models:
            for layer in model.decoder.layers:
                self._handles.append(layer.mlp.router.register_forward_hook(self._hook))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, module, args, output):
        probs, routing_map = output[0].detach(), output[1]
        if self._sums is None:
            self._sums = torch.zeros(2 * self.num_experts + 1, dtype=torch.float64, device=probs.device)
        e = self.num_experts
        self._sums[:e] += routing_map.sum(0).to(torch.float64)
        self._sums[e:2 * e] += probs.sum(0).to(torch.float64)
        self._sums[2 * e] += probs.shape[0]

    def reset(self) -> None:
        if self._sums is not None:
            self._sums.zero_()

    def local(self) -> torch.Tensor:
        """This rank's sums (float64, on the CPU)."""
        if self._sums is None:
            return torch.zeros(2 * self.num_experts + 1, dtype=torch.float64)
        return self._sums.detach().to("cpu", copy=True)

    @staticmethod
    def world_sum(sums: torch.Tensor) -> torch.Tensor:
        """``sums`` summed over every rank (a no-op without a process group)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return sums.clone()
        reduced = sums.to(default_device(), copy=True)  # never reduce into the caller's tensor
        dist.all_reduce(reduced)
        return reduced.cpu()

    def ratios(self, sums: torch.Tensor) -> tuple[list[float], list[float], bool]:
        """``(shares, mean gate weights, any routed)`` of a sums vector."""
        e = self.num_experts
        counts, weights, evaluations = sums[:e], sums[e:2 * e], float(sums[2 * e])
        total = float(counts.sum())
        shares = (counts / total).tolist() if total else [0.0] * e
        gates = (weights / evaluations).tolist() if evaluations else [0.0] * e
        return shares, gates, total > 0


def write_scalars(state, scalars: dict[str, float], iteration: int) -> None:
    """``scalars`` through Bridge's TensorBoard and W&B writers (those that exist on this rank)."""
    writer = state.tensorboard_logger
    if writer is not None:
        for name, value in scalars.items():
            writer.add_scalar(name, value, iteration)
    wandb_writer = state.wandb_logger
    if wandb_writer is not None:
        wandb_writer.log(scalars, iteration)


def training_log_callback(*, print_fn=print):
    """A Bridge callback logging loss, tokens/s, TFLOPS/MFU and the routing of every expert (see the
    module docstring for the definitions and where they are written).

    ``callback.history`` keeps ``(iteration, loss, tokens_per_s, shares)``, ``callback.gate_weights``
    ``(iteration, mean gate weight per expert)`` and ``callback.throughput`` ``(iteration, tflops_per_gpu,
    mfu)`` (MFU None where the GPU's peak is not tabulated), all over the whole world;
    ``callback.local`` keeps this rank's own ``(iteration, shares, gate weights)``.
    """
    from megatron.bridge.training.callbacks import Callback

    class FlexOlmoTrainingLog(Callback):
        def __init__(self):
            self.history: list[tuple[int, float, float, list[float]]] = []
            self.throughput: list[tuple[int, float, float | None]] = []
            self.gate_weights: list[tuple[int, list[float]]] = []
            self.local: list[tuple[int, list[float], list[float]]] = []
            self._flops, self._stats, self._names, self._last = None, None, (), None
            self._all_active = False

        def on_train_start(self, context):
            models = [unwrap(chunk) for chunk in context.model]
            config = models[0].flexolmo_config
            self._names = config.expert_names or tuple(f"expert{i}" for i in range(config.num_experts))
            self._all_active = config.top_k == config.num_experts
            self._stats = RouterStatistics(config.num_experts)
            self._stats.attach(models)
            self._flops = _flop_counter(context.state.cfg, config)
            self._last = time.perf_counter()

        def on_train_step_start(self, context):
            self._stats.reset()  # only this step's training forwards (not evaluations or other callbacks)

        def on_train_step_end(self, context):
            now = time.perf_counter()
            seconds = max(now - self._last, 1e-9)
            cfg = context.state.cfg
            iteration = context.state.train_state.step + 1  # the counter advances after this event
            # only the last pipeline stage has the loss; every rank must still join the reduction below
            loss = float(context.loss_dict.get("lm loss", float("nan"))) if context.loss_dict else float("nan")
            tokens_per_s = cfg.train.global_batch_size * cfg.model.seq_length / seconds
            local = self._stats.local()
            shares, weights, routed = self._stats.ratios(self._stats.world_sum(local))
            self.local.append((iteration, *self._stats.ratios(local)[:2]))
            self.history.append((iteration, loss, tokens_per_s, shares))
            self.gate_weights.append((iteration, weights))
            tflops, mfu = self._flops(shares if routed else None, seconds)
            self.throughput.append((iteration, tflops, mfu))
            scalars = {f"{PREFIX}tflops-per-gpu": tflops, f"{PREFIX}tokens-per-s": tokens_per_s}
            if mfu is not None:
                scalars[f"{PREFIX}mfu"] = mfu
            for name, share, weight in zip(self._names, shares, weights):
                scalars[f"{PREFIX}routed-share/{name}"] = share
                scalars[f"{PREFIX}gate-weight/{name}"] = weight
            write_scalars(context.state, scalars, iteration)
            if not dist.is_initialized() or dist.get_rank() == 0:
                gates = ", ".join(f"{n} {100 * w:.1f}%" for n, w in zip(self._names, weights))
                # with every expert active (top-k = E) every token reaches every expert: the shares say
                # nothing, the mean gate weights say where the router sends the tokens
                routed_text = "" if self._all_active else " | routed tokens: " + ", ".join(
                    f"{n} {100 * s:.1f}%" for n, s in zip(self._names, shares))
                utilisation = f" | MFU {100 * mfu:.1f}%" if mfu is not None else ""
                print_fn(f"[flexolmo] iteration {iteration} | lm loss {loss:.6f} | {tokens_per_s:,.0f} tokens/s | "
                         f"{tflops:.2f} TFLOPS/GPU{utilisation} | mean gate weight: {gates}{routed_text}")
            self._stats.reset()
            self._last = time.perf_counter()

        def on_train_end(self, context):
            if self._stats is not None:
                self._stats.detach()
            writer = context.state.tensorboard_logger
            if writer is not None:
                writer.flush()

    return FlexOlmoTrainingLog()


def _flop_counter(cfg, config):
    """``(shares, seconds) -> (TFLOPS per GPU, MFU)`` for this run's model, batch and freezing policy
    (``shares``: the routed shares of the whole world, or None for uniform routing)."""
    from flexolmo_plugin.recipes.flops import (
        Trainable,
        peak_flops,
        step_flops,
        throughput,
    )
    from flexolmo_plugin.recipes.precision import precision_of

    model = cfg.model
    trainable = Trainable.policy(model.trainable, config.num_experts, model.owner_expert)
    gpus = dist.get_world_size() if dist.is_initialized() else 1
    peak = peak_flops(device_name(), precision_of(cfg.mixed_precision))

    def measure(shares, seconds):
        flops = step_flops(config, seq_length=model.seq_length, global_batch_size=cfg.train.global_batch_size,
                           trainable=trainable, expert_shares=shares).total
        return throughput(flops, seconds, num_gpus=gpus, peak_flops_per_gpu=peak)

    return measure
