"""Run a FlexOlmo recipe on Megatron-Bridge's ``pretrain()`` loop (``flexolmo train``).

Arguments are Hydra-style ``key=value`` overrides: ``recipe.<arg>=...`` go to the recipe function
(e.g. ``recipe.init_from=ckpt/code-start recipe.data_paths=[data/code]``), everything else to the
resulting ``ConfigContainer`` (e.g. ``train.train_iters=100 optimizer.lr=3e-4``).  Works in a plain
process (a world of one) and under ``torchrun`` (one process per rank).

Checkpoints are Bridge's torch_dist checkpoints: each save goes to a new ``iter_*`` directory and
the ``latest`` tracker is updated only after it is complete, so an interrupted save never replaces
the last good checkpoint; rerunning with ``checkpoint.load=<save dir>`` resumes.

Every input is checked before anything is written (:func:`check_inputs`): the recipe arguments and
config keys exist, the start checkpoint, tokenizer and datasets are there and usable, and the data's
token ids fit the model's vocabulary.  A refusal is a :class:`~flexolmo_plugin.errors.ConfigError`
(one line, exit 2 from ``flexolmo train``), never a traceback from deep inside Bridge's loop.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import inspect
import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from flexolmo_plugin.compat import default_device, enable_bridge_compat
from flexolmo_plugin.conversion.atomic import temporary_name
from flexolmo_plugin.conversion.checksums import CHECKSUMS_FILE, write_directory_checksums
from flexolmo_plugin.conversion.mcore_io import CONFIG_FILE, save_config
from flexolmo_plugin.errors import ConfigError, FlexOlmoError
from flexolmo_plugin.model.dense_mixture import describe_expert_path
from flexolmo_plugin.recipes import registry
from flexolmo_plugin.recipes.inputs import check_inputs
from flexolmo_plugin.recipes.metrics import training_log_callback
from flexolmo_plugin.recipes.registry import RECIPE_PREFIX
from flexolmo_plugin.recipes.run_outputs import RunOutputs

# What a start checkpoint means for each freezing policy that needs one (``trainable="all"`` starts
# from Megatron's initialisation when it has none).
NEEDS_START = {"anchored": "the upcycled [public, owner] checkpoint (flexolmo upcycle)",
               "router": "the merged checkpoint (flexolmo merge)"}


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


def _checksums_callback():
    """``checksums.json`` in every checkpoint this run saves (as in every other output of our tools), so
    that package / merge / eval / convert verify it instead of warning that it is unverified.

    Bridge fires ``on_checkpoint_save`` after the save and its global barrier, on every rank; global rank 0
    hashes the whole ``iter_*`` directory (XXH3, a few GB/s: seconds per 7B checkpoint) while the others go
    on to the next iteration.  It covers the files from that moment on (transfers, later reads), not a
    write that failed silently before it."""
    from megatron.bridge.training.callbacks import Callback
    from megatron.bridge.training.utils.checkpoint_utils import get_checkpoint_name

    class Checksums(Callback):
        def on_checkpoint_save(self, context):
            if dist.is_initialized() and dist.get_rank() != 0:
                return
            directory = Path(get_checkpoint_name(context.state.cfg.checkpoint.save, context.state.train_state.step))
            if directory.is_dir() and not (directory / CHECKSUMS_FILE).exists():
                write_directory_checksums(directory)

    return Checksums()


def _recipe_arguments(recipe: str, function, kwargs: dict) -> None:
    """Refuse ``recipe.ARG`` names the recipe function does not take, and required ones left out,
    naming the valid ones (a bare ``TypeError`` from the call would be a traceback)."""
    parameters = inspect.signature(function).parameters
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        raise ConfigError(f"recipe {recipe!r} has no argument {', '.join(RECIPE_PREFIX + u for u in unknown)}; "
                          f"its arguments: {', '.join(parameters)}")
    missing = [n for n, p in parameters.items() if p.default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise ConfigError(f"recipe {recipe!r} needs {', '.join(f'{RECIPE_PREFIX}{m}=...' for m in missing)}")


def _override_key(override: str) -> str:
    """The dotted key of a Hydra override (``+key=v``, ``++key=v`` and ``~key`` included)."""
    return override.partition("=")[0].lstrip("+~")


def _lookup(config, key: str) -> tuple[bool, object]:
    """``(found, value)`` of a dotted ``key`` in the ``ConfigContainer``; raises :class:`ConfigError`
    naming the first part that does not exist and the valid names at that level.  Below a ``dict``
    field any key is accepted (such fields are free-form in Bridge)."""
    node, walked = config, []
    for part in key.split("."):
        if isinstance(node, dict):
            return False, None
        if not dataclasses.is_dataclass(node):
            where = ".".join(walked)
            raise ConfigError(f"unknown configuration key {key!r}: {where!r} is {node!r}, not a section with fields")
        names = [f.name for f in dataclasses.fields(node) if not f.name.startswith("_")]
        if part not in names:
            where = f"under {'.'.join(walked)!r}" if walked else "at the top level"
            raise ConfigError(f"unknown configuration key {key!r}; valid keys {where}: {', '.join(names)}")
        node = getattr(node, part)
        walked.append(part)
    return True, node


def _apply_config_overrides(config, overrides: list[str]):
    """Bridge's Hydra overrides, with every key checked first against the ``ConfigContainer``
    (Hydra's own message for an unknown key suggests ``+key=...``, which Bridge then cannot apply)
    and every number kept a number (Bridge copies ``train.train_iters=abc`` in as the string and
    fails inside the scheduler)."""
    from megatron.bridge.training.utils.omegaconf_utils import (
        OverridesError,
        process_config_with_overrides,
    )

    before = {}
    for override in overrides:
        key = _override_key(override)
        if key:
            before[key] = _lookup(config, key)
    try:
        config = process_config_with_overrides(config, cli_overrides=overrides)
    except OverridesError as error:
        cause = error.__cause__ or error
        raise ConfigError(f"cannot apply the overrides {overrides}: {str(cause).splitlines()[0]}") from None
    for key, (found, old) in before.items():
        if not found or isinstance(old, str) or not isinstance(old, (bool, int, float)):
            continue
        _, new = _lookup(config, key)
        if isinstance(new, str):
            expected = "true or false" if isinstance(old, bool) else "a number"
            raise ConfigError(f"{key}={new!r}: expected {expected} (it is {old!r} in this recipe)")
    return config


def check_start(recipe: str, config) -> None:
    """Refuse to train a recipe whose freezing policy needs a start checkpoint without one.

    Recipes build without ``init_from`` (Bridge's idiom: callable with no arguments; ``flexolmo
    plan`` sizes them), but anchored or router training from Megatron's random initialisation would
    train an expert or router against a public model that does not exist.
    """
    trainable = getattr(config.model, "trainable", "all")
    if trainable in NEEDS_START and not getattr(config.model, "init_from", None):
        raise ConfigError(f"recipe {recipe!r} needs {RECIPE_PREFIX}init_from=... ({NEEDS_START[trainable]})")


def build_config(recipe: str, overrides: list[str]):
    """The recipe's ``ConfigContainer`` with ``recipe.*`` arguments and config overrides applied:
    the recipe function called with the ``recipe.*`` arguments (none: its defaults), then the other
    ``key=value`` overrides applied by Bridge's ``process_config_with_overrides``."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    function = registry.recipe(recipe)
    recipe_args = [o[len(RECIPE_PREFIX) :] for o in overrides if o.startswith(RECIPE_PREFIX)]
    config_overrides = [o for o in overrides if not o.startswith(RECIPE_PREFIX)]
    try:
        kwargs = OmegaConf.to_container(OmegaConf.from_dotlist(recipe_args)) if recipe_args else {}
    except OmegaConfBaseException as error:
        raise ConfigError(f"cannot parse the recipe arguments {recipe_args}: {str(error).splitlines()[0]}") from None
    _recipe_arguments(recipe, function, kwargs)
    config = function(**kwargs)
    if config_overrides:
        config = _apply_config_overrides(config, config_overrides)
    return config


class _AbsentTransformerEngineImports(logging.Filter):
    """Drops Bridge's log record of a Transformer Engine symbol it could not import, where Transformer
    Engine is not installed.

    ``megatron.bridge.peft.utils`` probes ``FP8GlobalStateManager`` with ``safe_import_from``, which
    logs the full ``AttributeError`` traceback at INFO on a handler of its own, so every run on a
    machine without TE printed a "Traceback" although nothing failed (the symbol is only used when
    FP8 is on, which needs TE).  Only records about ``megatron.core.extensions.transformer_engine``
    below WARNING are dropped, and only when TE is absent: with TE installed the same record means a
    real incompatibility and stays visible.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno < logging.WARNING
                    and "from megatron.core.extensions.transformer_engine failed" in record.getMessage())


def silence_absent_transformer_engine_imports() -> None:
    """Install :class:`_AbsentTransformerEngineImports` on Bridge's import logger (idempotent; before
    ``megatron.bridge`` is imported, the logger object is the one its module will use)."""
    if importlib.util.find_spec("transformer_engine") is not None:
        return
    bridge_logger = logging.getLogger("megatron.bridge.utils.import_utils")
    if not any(isinstance(f, _AbsentTransformerEngineImports) for f in bridge_logger.filters):
        bridge_logger.addFilter(_AbsentTransformerEngineImports())


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
    temporary file and a rename, so a crash never leaves a torn file.  The dtype recorded is the one
    the saved weights will have once Bridge has applied the run's mixed precision (bf16 for a bf16
    run), not ``model.params_dtype`` as it stands before ``pretrain()``.
    """
    from flexolmo_plugin.recipes.precision import saved_params_dtype

    model = config.model
    flexolmo = model.to_flexolmo_config()
    target = Path(config.checkpoint.save)
    temporary = temporary_name(target / CONFIG_FILE)  # unique: ranks of two runs never share it
    temporary.mkdir()
    save_config(
        temporary,
        flexolmo,
        dtype=saved_params_dtype(config),
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
    """Train; returns the logging callback (its ``history`` holds the per-iteration records).

    Inputs are checked (:func:`check_inputs`) before the process group, the save directory or its
    ``flexolmo_config.json`` exist, so a refused run leaves nothing behind; a run that fails later but
    before it completed its first checkpoint removes what it added to the save directory again
    (:class:`RunOutputs`)."""

    silence_absent_transformer_engine_imports()
    enable_bridge_compat()
    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.pretrain import pretrain

    config = build_config(recipe, overrides)
    check_start(recipe, config)
    check_inputs(config)
    # one line for the log; refuses a forced expert path that cannot apply, before anything is written
    expert_path = describe_expert_path(config.model, config.model.expert_path)
    from flexolmo_plugin.recipes.precision import (
        check_container_precision,
        current_capability,
    )

    capability = current_capability()
    precision = check_container_precision(config, capability)  # e.g. mxfp8 overridden in on an H100
    if precision not in ("fp32", "bf16", "fp16") and (capability is None
                                                      or importlib.util.find_spec("transformer_engine") is None):
        raise ConfigError(f"precision {precision!r} runs on an NVIDIA GPU with Transformer Engine; this machine has "
                          f"{'no GPU' if capability is None else 'no Transformer Engine'}")
    save = config.checkpoint.save
    if save and Path(save).exists() and not Path(save).is_dir():
        raise ConfigError(f"checkpoint.save {save} exists and is not a directory")
    _init_process_group(config.dist.distributed_backend, config.dist.distributed_timeout_minutes)
    outputs = None  # rank 0 alone writes (and takes back) the save directory's files of its own
    if dist.get_rank() == 0:
        print(f"[flexolmo] {expert_path}", flush=True)
        outputs = RunOutputs(save) if save else None
    try:
        if outputs is not None:
            outputs.path.mkdir(parents=True, exist_ok=True)
            write_run_config(config, recipe)
        dist.barrier()
        log = training_log_callback()
        try:
            pretrain(config, forward_step, callbacks=[_warm_up_callback(), _checksums_callback(), log, *callbacks])
        except SystemExit as stop:  # Bridge exits this way at train.exit_interval
            if stop.code not in (0, None):
                raise
    except BaseException:
        if outputs is not None:
            outputs.undo()
        raise
    return log


def main(argv: list[str] | None = None) -> int:
    """Entry point the launchers start on every rank: ``python -m flexolmo_plugin.recipes.train RECIPE KEY=VALUE...``.

    Runs :func:`run` for any recipe of this module (the production ones included) under torchrun; exit
    code 0 on success, 2 with a one-line message for refused input (as ``flexolmo train``).  Kept
    separate from ``flexolmo train`` so that the launchers do not depend on the CLI's recipe list.
    """

    argv = sys.argv[1:] if argv is None else argv
    if not argv or "=" in argv[0]:
        print(
            "usage: python -m flexolmo_plugin.recipes.train RECIPE [recipe.ARG=VALUE | KEY=VALUE ...]", file=sys.stderr
        )
        return 2
    try:
        run(argv[0], argv[1:])
    except (FlexOlmoError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
