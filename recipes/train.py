"""Run a FlexOlmo recipe on Megatron-Bridge's ``pretrain()`` loop (``flexolmo train``).

Arguments are Hydra-style ``key=value`` overrides: ``recipe.<arg>=...`` go to the recipe function
(e.g. ``recipe.init_from=ckpt/code-start recipe.data_paths=[data/code]``), everything else to the
resulting ``ConfigContainer`` (e.g. ``train.train_iters=100 optimizer.lr=3e-4``).  Works in a plain
process (a world of one) and under ``torchrun`` (one process per rank).

Checkpoints are Bridge's torch_dist checkpoints: each save goes to a new ``iter_*`` directory and
the ``latest`` tracker is updated only after it is complete, so an interrupted save never replaces
the last good checkpoint; rerunning with ``checkpoint.load=<save dir>`` resumes.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from flexolmo_plugin.compat import default_device, device_name, enable_bridge_compat
from flexolmo_plugin.conversion.mcore_io import CONFIG_FILE, save_config
from flexolmo_plugin.errors import ConfigError
from flexolmo_plugin.model.build import unwrap
from flexolmo_plugin.recipes import registry

RECIPE_PREFIX = "recipe."


def training_log_callback(*, print_fn=print):
    """A Bridge callback logging loss, tokens/s and each expert's share of routed tokens.

    Shares come from forward hooks on the routers (this rank's tokens, all layers pooled), so they
    show directly whether the owner's expert is being used.  ``callback.history`` keeps
    ``(iteration, loss, tokens_per_s, shares)`` for programmatic use.

    Model TFLOPS per GPU and MFU use :mod:`flexolmo_plugin.recipes.flops`, which counts no weight-gradient
    GEMM for frozen weights and weights the experts by this step's routed shares (Bridge's own
    formula would credit anchored training with work it never does); ``callback.throughput`` keeps
    ``(iteration, tflops_per_gpu, mfu)``, MFU being None where the GPU's peak is not tabulated.
    """
    from megatron.bridge.training.callbacks import Callback


    class FlexOlmoTrainingLog(Callback):
        def __init__(self):
            self.history: list[tuple[int, float, float, list[float]]] = []
            self.throughput: list[tuple[int, float, float | None]] = []
            self._flops = None
            self.gate_weights: list[tuple[int, list[float]]] = []  # (iteration, mean gate weight per expert)
            self._handles, self._counts, self._weights, self._names, self._last = [], None, None, (), None
            self._all_active = False

        def on_train_start(self, context):
            models = [unwrap(chunk) for chunk in context.model]
            config = models[0].flexolmo_config
            self._names = config.expert_names or tuple(f"expert{i}" for i in range(config.num_experts))
            self._counts = torch.zeros(config.num_experts, dtype=torch.float64)
            self._weights = torch.zeros(config.num_experts, dtype=torch.float64)
            self._all_active = config.top_k == config.num_experts
            self._top_k = config.top_k

            def hook(module, args, output):
                self._counts += output[1].sum(0).to(torch.float64).cpu()
                self._weights += output[0].detach().sum(0).to(torch.float64).cpu()

            self._handles = [layer.mlp.router.register_forward_hook(hook)
                             for model in models for layer in model.decoder.layers]
            self._flops = _flop_counter(context.state.cfg, config)
            self._last = time.perf_counter()

        def on_train_step_end(self, context):
            now = time.perf_counter()
            cfg = context.state.cfg
            iteration = context.state.train_state.step + 1  # the counter advances after this event
            loss = float(context.loss_dict["lm loss"])
            tokens_per_s = cfg.train.global_batch_size * cfg.model.seq_length / max(now - self._last, 1e-9)
            total = self._counts.sum().item()
            shares = (self._counts / total).tolist() if total else [0.0] * len(self._counts)
            self.history.append((iteration, loss, tokens_per_s, shares))
            evaluations = total / self._top_k  # token x layer router evaluations this step
            weights = (self._weights / evaluations).tolist() if evaluations else [0.0] * len(shares)
            self.gate_weights.append((iteration, weights))
            tflops, mfu = self._flops(shares if total else None, max(now - self._last, 1e-9))
            self.throughput.append((iteration, tflops, mfu))
            if not dist.is_initialized() or dist.get_rank() == 0:
                gates = ", ".join(f"{n} {100 * w:.1f}%" for n, w in zip(self._names, weights))
                # with every expert active (top-k = E) every token reaches every expert: the shares say
                # nothing, the mean gate weights say where the router sends the tokens
                routed = "" if self._all_active else " | routed tokens: " + ", ".join(
                    f"{n} {100 * s:.1f}%" for n, s in zip(self._names, shares))
                utilisation = f" | MFU {100 * mfu:.1f}%" if mfu is not None else ""
                print_fn(f"[flexolmo] iteration {iteration} | lm loss {loss:.6f} | {tokens_per_s:,.0f} tokens/s | "
                         f"{tflops:.2f} TFLOPS/GPU{utilisation} | mean gate weight: {gates}{routed}")
            self._counts.zero_()
            self._weights.zero_()
            self._last = time.perf_counter()

        def on_train_end(self, context):
            for handle in self._handles:
                handle.remove()
            self._handles = []

    return FlexOlmoTrainingLog()


def _flop_counter(cfg, config):
    """``(shares, seconds) -> (TFLOPS per GPU, MFU)`` for this run's model, batch and freezing policy.

    Routed shares are this rank's; with data parallelism ranks see statistically identical batches.
    """

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


def warm_up_process_groups(*, print_fn=print) -> list[str]:
    """One small collective on each model-parallel group, so that NCCL builds every communicator
    before step 1 (lazily created expert-parallel communicators otherwise appear inside the first
    all-to-all, where a slow or broken link looks like a training hang).  Returns the groups warmed.
    """


    getters = {"tensor": ps.get_tensor_model_parallel_group, "data": ps.get_data_parallel_group,
               "expert": ps.get_expert_model_parallel_group, "expert-tensor": ps.get_expert_tensor_parallel_group,
               "expert-data": ps.get_expert_data_parallel_group}
    warmed = []
    for name, getter in getters.items():
        try:
            group = getter()
        except (AssertionError, RuntimeError):
            continue  # not initialised in this layout
        if group is None:
            continue
        probe = torch.ones(1, device=default_device())
        dist.all_reduce(probe, group=group)
        if int(probe.item()) != dist.get_world_size(group):
            raise RuntimeError(f"warm-up all-reduce over the {name} group returned {probe.item()}")
        if name == "expert" and dist.get_backend(group) == "nccl":
            size = dist.get_world_size(group)
            dist.all_to_all_single(
                torch.empty(size, device=default_device()), torch.ones(size, device=default_device()), group=group
            )
        warmed.append(name)
    if dist.get_rank() == 0:
        print_fn(f"[flexolmo] warmed process groups: {', '.join(warmed)}")
    return warmed


def _warm_up_callback():
    from megatron.bridge.training.callbacks import Callback

    class WarmUp(Callback):
        def on_train_start(self, context):
            self.warmed = warm_up_process_groups()

    return WarmUp()


def build_config(recipe: str, overrides: list[str]):
    """The recipe's ``ConfigContainer`` with ``recipe.*`` arguments and config overrides applied."""
    from omegaconf import OmegaConf

    function = registry.recipe(recipe)
    recipe_args = [o[len(RECIPE_PREFIX) :] for o in overrides if o.startswith(RECIPE_PREFIX)]
    config_overrides = [o for o in overrides if not o.startswith(RECIPE_PREFIX)]
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    kwargs = OmegaConf.to_container(OmegaConf.from_dotlist(recipe_args)) if recipe_args else {}
    config = function(**kwargs)
    if config_overrides:
        from megatron.bridge.training.utils.omegaconf_utils import (
            process_config_with_overrides,
        )

        config = process_config_with_overrides(config, cli_overrides=config_overrides)
    return config


def _init_process_group(backend: str, timeout_minutes: int = 10) -> None:

    if dist.is_initialized():
        return
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun / srun
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def write_run_config(config, recipe: str) -> None:
    """Write ``flexolmo_config.json`` into the save directory before training starts.

    Every flexolmo tool (package-expert, merge, eval, convert, upcycle, from_mcore) then accepts the
    save directory itself and reads its latest complete ``iter_*`` checkpoint.  Written through a
    temporary file and a rename, so a crash never leaves a torn file.
    """

    model = config.model
    flexolmo = model.to_flexolmo_config()
    target = Path(config.checkpoint.save)
    temporary = target / f".{CONFIG_FILE}.tmp"
    temporary.mkdir(exist_ok=True)
    save_config(
        temporary,
        flexolmo,
        dtype=model.params_dtype,
        extra={
            "source": {
                "format": "megatron-bridge",
                "recipe": recipe,
                "trainable": model.trainable,
                "init_from": model.init_from,
            }
        },
    )
    os.replace(temporary / CONFIG_FILE, target / CONFIG_FILE)
    temporary.rmdir()


def run(recipe: str, overrides: list[str], *, callbacks=()):
    """Train; returns the logging callback (its ``history`` holds the per-iteration records)."""

    enable_bridge_compat()
    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.pretrain import pretrain

    config = build_config(recipe, overrides)
    _init_process_group(config.dist.distributed_backend, config.dist.distributed_timeout_minutes)
    if dist.get_rank() == 0 and config.checkpoint.save:
        Path(config.checkpoint.save).mkdir(parents=True, exist_ok=True)
        write_run_config(config, recipe)
    dist.barrier()
    from flexolmo_plugin.recipes.precision import (
        check_container_precision,
        current_capability,
    )

    check_container_precision(config, current_capability())  # e.g. mxfp8 overridden in on an H100
    log = training_log_callback()
    try:
        pretrain(config, forward_step, callbacks=[_warm_up_callback(), log, *callbacks])
    except SystemExit as stop:  # Bridge exits this way at train.exit_interval
        if stop.code not in (0, None):
            raise
    return log


def main(argv: list[str] | None = None) -> int:
    """Entry point the launchers start on every rank: ``python -m flexolmo_plugin.recipes.train RECIPE KEY=VALUE...``.

    Runs :func:`run` for any recipe of this module (the production ones included) under torchrun; exit
    code 0 on success.  Kept separate from ``flexolmo train`` so that the launchers do not depend on the
    CLI's recipe list.
    """

    argv = sys.argv[1:] if argv is None else argv
    if not argv or "=" in argv[0]:
        print(
            "usage: python -m flexolmo_plugin.recipes.train RECIPE [recipe.ARG=VALUE | KEY=VALUE ...]", file=sys.stderr
        )
        return 2
    run(argv[0], argv[1:])
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
