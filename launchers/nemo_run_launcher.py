"""Launch a FlexOlmo recipe with NeMo-Run: torchrun on every node, locally or on Slurm (pyxis containers).

What runs on each node is NeMo-Run's torchrun launcher over ``run.Script(path=ENTRY, m=True,
entrypoint="python")``, i.e. ``torchrun ... -m flexolmo_plugin.recipes.train RECIPE ARGS``: the
*installed* module, so the job needs no path of this checkout inside the container, only an image (or
node environment) where this package is installed (``pip install --no-deps -e .`` or the wheel, as for
any GPU use; README "Installing").  No code is packaged (NeMo-Run's pass-through ``Packager``);
``--mount HOST:CONTAINER`` makes data and checkpoint directories visible inside the container, and
recipe paths (``recipe.data_paths``, ``recipe.init_from``, ``recipe.save_dir``) are container paths.

    python launchers/nemo_run_launcher.py expert-2x7b --nodes 2 --account A --partition P \\
        --container-image nvcr.io/nvidia/nemo:25.09 --mount /lustre/ckpt:/ckpt --mount /lustre/data:/data \\
        --env HF_HOME=/data/hf --env WANDB_API_KEY -- recipe.init_from=/ckpt/code-start \\
        recipe.data_paths=[/data/code] recipe.save_dir=/ckpt/code-run recipe.precision=fp8-blockwise
    python launchers/nemo_run_launcher.py expert --executor local --gpus-per-node 2 --dry-run -- ...

``--dry-run`` prints what NeMo-Run would submit (the sbatch script, or the local torchrun command)
without submitting.  ``--env K=V`` sets a variable in the job, ``--env K`` passes this shell's value
on; the NCCL settings of :data:`NCCL_ENV` are always set.  ``nemo-run`` is imported only to submit or
dry-run (it is in requirements/lock-cpu.txt and the ``nemo-run`` extra).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field

from flexolmo_plugin.errors import ConfigError
from flexolmo_plugin.recipes.registry import RECIPE_PREFIX, RECIPES, check_name

# The module torchrun starts on every rank: the installed package (valid in any container that has it).
ENTRY = "flexolmo_plugin.recipes.train"
# Fail fast instead of hanging on a broken collective; long InfiniBand retry timeout for large clusters;
# Megatron's TP/SP overlap needs one CUDA connection per device (launchers/torchrun_slurm.sh sets the same).
NCCL_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1", "NCCL_IB_TIMEOUT": "22",
            "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, kw_only=True)
class LaunchPlan:
    """One job: which recipe, on how many nodes, with which overrides, where; checked when built."""

    recipe: str
    nodes: int = 1
    gpus_per_node: int = 8
    overrides: tuple[str, ...] = ()
    executor: str = "slurm"  # "slurm" or "local"
    account: str | None = None
    partition: str | None = None
    container_image: str | None = None
    container_mounts: tuple[str, ...] = ()  # HOST:CONTAINER[:FLAGS], as pyxis' --container-mounts
    time: str = "04:00:00"
    job_dir: str | None = None  # Slurm: where NeMo-Run writes the sbatch script and logs (shared file system)
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        try:
            check_name(self.recipe)
        except ConfigError as error:
            raise ValueError(str(error)) from None
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"nodes and gpus_per_node must be positive, got {self.nodes}, {self.gpus_per_node}")
        if self.executor not in ("slurm", "local"):
            raise ValueError(f"executor must be 'slurm' or 'local', got {self.executor!r}")
        bad = [o for o in self.overrides if "=" not in o]
        if bad:
            raise ValueError(f"overrides must look like key=value, got {bad}")
        owned = [o for o in self.overrides
                 if o.split("=", 1)[0] in (f"{RECIPE_PREFIX}nodes", f"{RECIPE_PREFIX}gpus_per_node")]
        if owned:
            raise ValueError(f"{owned}: set nodes / gpus_per_node on the plan, the launcher passes them to the recipe")
        for name, value in self.env.items():
            # NeMo-Run writes ``export NAME=VALUE`` into the sbatch script without quoting
            if not _ENV_NAME.fullmatch(name) or shlex.quote(value) != value:
                raise ValueError(f"--env {name}={value!r}: names must be identifiers and values free of spaces and "
                                 "shell characters (NeMo-Run writes them unquoted into the job script)")
        for mount in self.container_mounts:
            parts = mount.split(":")
            if len(parts) not in (2, 3) or not all(p.startswith("/") for p in parts[:2]):
                raise ValueError(f"--mount {mount!r}: expected /host/path:/container/path[:flags]")
        if self.executor == "local":
            if self.nodes != 1:
                raise ValueError("the local executor runs on this machine: nodes must be 1")
            if self.container_image or self.container_mounts:
                raise ValueError("containers and mounts need the slurm executor (the local one runs on this machine)")
        elif not (self.account and self.partition):
            raise ValueError("the slurm executor needs account and partition")
        elif self.container_mounts and not self.container_image:
            raise ValueError("--mount needs --container-image (mounts are container mounts)")


def recipe_arguments(plan: LaunchPlan) -> list[str]:
    """Arguments of ``python -m flexolmo_plugin.recipes.train``: the recipe, the cluster shape it must
    check, the overrides."""
    arguments = [plan.recipe, *plan.overrides]
    if "nodes" in _production_arguments(plan.recipe):
        arguments[1:1] = [f"{RECIPE_PREFIX}nodes={plan.nodes}", f"{RECIPE_PREFIX}gpus_per_node={plan.gpus_per_node}"]
    return arguments


def _production_arguments(recipe: str) -> tuple[str, ...]:
    """The production recipes (``recipes/production.py``) take the cluster shape; the phase recipes do not.
    Read from the registry's module names, so that planning a launch imports no Megatron-Bridge."""
    return ("nodes", "gpus_per_node") if RECIPES[recipe].split(":")[0].endswith(".production") else ()


def environment(plan: LaunchPlan) -> dict[str, str]:
    return {**NCCL_ENV, **plan.env}


class LaunchError(RuntimeError):
    """This machine cannot submit the plan (no nemo-run, no torchrun for a local run): one line, exit 2."""


def _nemo_run():
    try:
        import nemo_run
    except ImportError as error:
        raise LaunchError("launching through NeMo-Run needs the 'nemo-run' package (pip install -e .[nemo-run]); "
                          "launchers/torchrun_slurm.sh needs nothing extra") from error
    return nemo_run


def task(plan: LaunchPlan):
    """``python -m flexolmo_plugin.recipes.train ARGS`` as a NeMo-Run script (torchrun runs ``-m``)."""
    run = _nemo_run()
    return run.Script(path=ENTRY, args=recipe_arguments(plan), entrypoint="python", m=True)


def executor(plan: LaunchPlan):
    """NeMo-Run's executor with its torchrun launcher (one torchrun per node, ``gpus_per_node`` ranks each)."""
    run = _nemo_run()
    if plan.executor == "local":
        return run.LocalExecutor(launcher="torchrun", ntasks_per_node=plan.gpus_per_node, env_vars=environment(plan))
    return run.SlurmExecutor(
        account=plan.account, partition=plan.partition, nodes=plan.nodes, ntasks_per_node=plan.gpus_per_node,
        gpus_per_node=plan.gpus_per_node, time=plan.time, exclusive=True, mem="0",
        container_image=plan.container_image, container_mounts=list(plan.container_mounts),
        env_vars=environment(plan), launcher="torchrun", job_name_prefix="flexolmo-",
        packager=run.Packager(),  # nothing to package: the container runs the installed module
        tunnel=run.LocalTunnel(job_dir=plan.job_dir or ""))


def _experiment(plan: LaunchPlan, base_dir: str | None):
    run = _nemo_run()
    return run.Experiment(f"flexolmo-{plan.recipe}", base_dir=base_dir, log_level="WARN")


def dryrun(plan: LaunchPlan, *, base_dir: str | None = None) -> str:
    """What NeMo-Run would submit, from its own dry run: the sbatch script (Slurm) or the environment
    and torchrun command line (local).  The experiment directory it creates is removed again."""
    with _experiment(plan, base_dir) as exp:
        exp.add(task(plan), executor=executor(plan), name=plan.recipe)
        exp.dryrun(log=False)
        request = exp.jobs[0]._dryrun_info.request  # NeMo-Run keeps the dry run's torchx request here
    if plan.executor == "slurm":
        return request.materialize()
    (replica,) = request.role_params[plan.recipe]
    exports = [f"{k}={shlex.quote(v)}" for k, v in replica.env.items() if k in environment(plan)]
    return " ".join(["env", *exports, shlex.join(replica.args)])


def submit(plan: LaunchPlan, *, detach: bool = True, base_dir: str | None = None):
    """Submit ``plan`` through NeMo-Run; returns the experiment."""
    if plan.executor == "local" and shutil.which("torchrun") is None:  # NeMo-Run's local scheduler looks it up
        raise LaunchError("torchrun is not on PATH: activate the environment where this package is installed")
    with _experiment(plan, base_dir) as exp:
        exp.add(task(plan), executor=executor(plan), name=plan.recipe)
        exp.run(detach=detach)
    return exp


def _env_items(items: list[str]) -> dict[str, str]:
    """``--env K=V`` sets V; ``--env K`` passes on this shell's value of K."""
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            if name not in os.environ:
                raise ValueError(f"--env {name}: not set in this shell (use --env {name}=VALUE)")
            value = os.environ[name]
        env[name] = value
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help=f"one of {', '.join(RECIPES)}")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--executor", choices=("slurm", "local"), default="slurm")
    parser.add_argument("--account")
    parser.add_argument("--partition")
    parser.add_argument("--container-image")
    parser.add_argument("--mount", action="append", default=[], metavar="HOST:CONTAINER")
    parser.add_argument("--env", action="append", default=[], metavar="K=V|K")
    parser.add_argument("--time", default="04:00:00")
    parser.add_argument("--job-dir", help="Slurm: directory (shared file system) for the job script and logs")
    parser.add_argument("--dry-run", action="store_true", help="print what NeMo-Run would submit and exit")
    parser.add_argument("overrides", nargs="*", help="recipe.ARG=VALUE and ConfigContainer key=value overrides")
    args = parser.parse_intermixed_args(argv)
    try:
        plan = LaunchPlan(recipe=args.recipe, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                          overrides=tuple(args.overrides), executor=args.executor, account=args.account,
                          partition=args.partition, container_image=args.container_image,
                          container_mounts=tuple(args.mount), time=args.time, job_dir=args.job_dir,
                          env=_env_items(args.env))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        if args.dry_run:
            print(dryrun(plan))
        else:
            submit(plan)
    except LaunchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
