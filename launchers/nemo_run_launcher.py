"""Launch a FlexOlmo production recipe with NeMo-Run (Slurm or local), torchrun on every node.

``nemo-run`` is optional (``pip install -e .[nemo-run]``) and imported only when a job is actually
submitted; :func:`torchrun_command` and :func:`environment` build the same command line and
environment without it (and are what the tests check).

    python launchers/nemo_run_launcher.py expert-2x7b --nodes 2 --executor slurm --account A --partition P \
        --container-image nvcr.io/nvidia/nemo:... -- recipe.init_from=/ckpt/code-start recipe.precision=fp8-blockwise
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

# The module torchrun starts on every rank (``torchrun ... -m ENTRY RECIPE ...``): the installed package, so
# nothing here depends on where the repository is checked out.
ENTRY = "flexolmo_plugin.recipes.train"
NCCL_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1", "NCCL_IB_TIMEOUT": "22",
            "CUDA_DEVICE_MAX_CONNECTIONS": "1"}


@dataclass(frozen=True, kw_only=True)
class LaunchPlan:
    """One job: which recipe, on how many nodes, with which overrides, where."""

    recipe: str
    nodes: int = 1
    gpus_per_node: int = 8
    overrides: tuple[str, ...] = ()
    executor: str = "slurm"  # "slurm" or "local"
    account: str | None = None
    partition: str | None = None
    container_image: str | None = None
    time: str = "04:00:00"
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        from flexolmo_plugin.recipes.train import RECIPE_PREFIX

        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"nodes and gpus_per_node must be positive, got {self.nodes}, {self.gpus_per_node}")
        if self.executor not in ("slurm", "local"):
            raise ValueError(f"executor must be 'slurm' or 'local', got {self.executor!r}")
        bad = [o for o in self.overrides if "=" not in o]
        if bad:
            raise ValueError(f"overrides must look like key=value, got {bad}")
        owned = [
            o
            for o in self.overrides
            if o.split("=", 1)[0] in (f"{RECIPE_PREFIX}nodes", f"{RECIPE_PREFIX}gpus_per_node")
        ]
        if owned:
            raise ValueError(f"{owned}: set nodes / gpus_per_node on the plan, the launcher passes them to the recipe")
        if self.executor == "slurm" and not (self.account and self.partition):
            raise ValueError("the slurm executor needs account and partition")


def recipe_arguments(plan: LaunchPlan) -> list[str]:
    """Arguments of ``python -m flexolmo_plugin.recipes.train``: the recipe, the cluster shape it must
    check, the overrides."""
    return [plan.recipe, f"recipe.nodes={plan.nodes}", f"recipe.gpus_per_node={plan.gpus_per_node}", *plan.overrides]


def torchrun_command(plan: LaunchPlan, *, head: str = "$HEAD", port: int = 29500) -> list[str]:
    """The per-node torchrun command (what NeMo-Run's torchrun launcher runs on each node)."""
    return [
        "torchrun",
        f"--nnodes={plan.nodes}",
        f"--nproc-per-node={plan.gpus_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={head}:{port}",
        "-m",
        ENTRY,
        *recipe_arguments(plan),
    ]


def environment(plan: LaunchPlan) -> dict[str, str]:
    return {**NCCL_ENV, **plan.env}


def submit(plan: LaunchPlan, *, detach: bool = True):
    """Submit ``plan`` through NeMo-Run (imported here: it is an optional dependency)."""
    try:
        import nemo_run as run
    except ImportError as error:
        raise RuntimeError(
            "launching through NeMo-Run needs the optional 'nemo-run' package "
            "(pip install -e .[nemo-run]); launchers/torchrun_slurm.sh needs nothing extra"
        ) from error
    # nemo_run.Script(m=True) runs ``python -m ENTRY ARGS`` (through the executor's torchrun launcher)
    task = run.Script(path=ENTRY, args=recipe_arguments(plan), entrypoint="python", m=True)
    if plan.executor == "local":
        executor = run.LocalExecutor(
            launcher="torchrun", ntasks_per_node=plan.gpus_per_node, env_vars=environment(plan)
        )
    else:
        executor = run.SlurmExecutor(
            account=plan.account,
            partition=plan.partition,
            nodes=plan.nodes,
            ntasks_per_node=plan.gpus_per_node,
            gpus_per_node=plan.gpus_per_node,
            container_image=plan.container_image,
            time=plan.time,
            env_vars=environment(plan),
        )
        executor.launcher = "torchrun"
    return run.run(task, executor=executor, name=f"flexolmo-{plan.recipe}", detach=detach)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--executor", choices=("slurm", "local"), default="slurm")
    parser.add_argument("--account")
    parser.add_argument("--partition")
    parser.add_argument("--container-image")
    parser.add_argument("--time", default="04:00:00")
    parser.add_argument("--dry-run", action="store_true", help="print the torchrun command and exit")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    try:
        plan = LaunchPlan(
            recipe=args.recipe,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            overrides=tuple(args.overrides),
            executor=args.executor,
            account=args.account,
            partition=args.partition,
            container_image=args.container_image,
            time=args.time,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(" ".join(torchrun_command(plan)))
        return 0
    submit(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
