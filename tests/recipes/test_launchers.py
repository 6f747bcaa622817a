"""Launchers: command lines and environment, built without nemo-run or Slurm being present."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _launcher():
    spec = importlib.util.spec_from_file_location("nemo_run_launcher", REPO / "launchers" / "nemo_run_launcher.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_nemo_run_plan_builds_the_torchrun_command_and_nccl_environment():
    launcher = _launcher()
    plan = launcher.LaunchPlan(recipe="expert-2x7b", nodes=2, gpus_per_node=8, account="a", partition="p",
                               overrides=("recipe.init_from=/ckpt/start", "recipe.precision=fp8-blockwise"))
    command = launcher.torchrun_command(plan, head="node01")
    assert command[:5] == ["torchrun", "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
                           "--rdzv-endpoint=node01:29500"]
    assert command[5:7] == ["-m", "flexolmo_plugin.recipes.train"]
    assert command[7:] == ["expert-2x7b", "recipe.nodes=2", "recipe.gpus_per_node=8", "recipe.init_from=/ckpt/start",
                           "recipe.precision=fp8-blockwise"]
    env = launcher.environment(plan)
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"


def test_nemo_run_plan_refuses_bad_input_and_missing_nemo_run_is_explained():
    launcher = _launcher()
    with pytest.raises(ValueError, match="account and partition"):
        launcher.LaunchPlan(recipe="public-7b")
    with pytest.raises(ValueError, match="key=value"):
        launcher.LaunchPlan(recipe="public-7b", executor="local", overrides=("oops",))
    with pytest.raises(ValueError, match="on the plan"):
        launcher.LaunchPlan(recipe="public-7b", executor="local", overrides=("recipe.nodes=3",))
    if importlib.util.find_spec("nemo_run") is None:
        with pytest.raises(RuntimeError, match="optional 'nemo-run'"):
            launcher.submit(launcher.LaunchPlan(recipe="public-7b", executor="local"))
    assert launcher.main(["public-7b", "--executor", "local", "--dry-run", "recipe.train_iters=5"]) == 0
    assert launcher.main(["public-7b", "--nodes", "0", "--executor", "local", "--dry-run"]) == 2


def test_slurm_script_dry_run_passes_the_cluster_shape_to_the_recipe():
    env = {**os.environ, "DRY_RUN": "1", "SLURM_NNODES": "4", "GPUS_PER_NODE": "8", "SLURM_JOB_ID": "77"}
    out = subprocess.run(["bash", str(REPO / "launchers" / "torchrun_slurm.sh"), "public-7b", "recipe.precision=bf16"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert "torchrun --nnodes=4 --nproc-per-node=8 --rdzv-backend=c10d" in out
    assert "--rdzv-id=77" in out
    assert " -m flexolmo_plugin.recipes.train public-7b " in out
    assert out.rstrip().endswith("public-7b recipe.nodes=4 recipe.gpus_per_node=8 recipe.precision=bf16")
    missing = subprocess.run(["bash", str(REPO / "launchers" / "torchrun_slurm.sh")], env=env, capture_output=True,
                             text=True)
    assert missing.returncode != 0 and "usage" in missing.stderr


def test_train_module_entry_rejects_a_missing_recipe(tmp_path):
    # run outside the repository: the launchers start the installed module, not a file of the checkout
    out = subprocess.run([sys.executable, "-m", "flexolmo_plugin.recipes.train", "recipe.x=1"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.returncode == 2 and "usage" in out.stderr


def test_train_module_imports_no_megatron_bridge():
    """Megatron-Bridge may be imported only after enable_bridge_compat() (stand-ins for missing packages)."""
    code = ("import sys, flexolmo_plugin.recipes.train; "
            "print(sorted(m for m in sys.modules if m.startswith('megatron.bridge')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_bench_gpu_without_cuda_says_not_measured(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: bench_gpu measures instead (see the gpu tests)")
    md = tmp_path / "gpu.md"
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_gpu", "--markdown", str(md)], capture_output=True,
                         text=True, cwd=REPO)
    assert out.returncode == 0 and "not measured: no CUDA" in out.stdout
    assert md.read_text().startswith("## GPU") and "not measured: no CUDA" in md.read_text()
