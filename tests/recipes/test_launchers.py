"""Launchers: NeMo-Run's own dry run (its torchrun command and sbatch script) and the plain Slurm script."""

from __future__ import annotations

import importlib.util
import io
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


@pytest.fixture(scope="module")
def launcher():
    pytest.importorskip("nemo_run")  # in requirements/lock-cpu.txt: present wherever the suite runs from the lock
    return _launcher()


def test_nemo_run_slurm_dryrun_writes_a_torchrun_sbatch_script_for_the_container(launcher, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO())  # NeMo-Run's shell commands (invoke) read stdin
    plan = launcher.LaunchPlan(recipe="expert-2x7b", nodes=2, gpus_per_node=8, account="acct", partition="batch",
                               container_image="nvcr.io/nvidia/nemo:25.09", time="01:30:00",
                               container_mounts=("/lustre/ckpt:/ckpt", "/lustre/data:/data:ro"),
                               job_dir=str(tmp_path / "jobs"), env={"HF_HOME": "/data/hf"},
                               overrides=("recipe.init_from=/ckpt/start", "recipe.data_paths=[/data/code]"))
    script = launcher.dryrun(plan, base_dir=str(tmp_path / "nemo"))
    lines = script.splitlines()
    for directive in ("--account=acct", "--partition=batch", "--nodes=2", "--gpus-per-node=8",
                      "--ntasks-per-node=1", "--time=01:30:00", "--job-name=flexolmo-expert-2x7b"):
        assert f"#SBATCH {directive}" in lines, directive  # one torchrun per node, 8 ranks each
    for name, value in {**launcher.NCCL_ENV, "HF_HOME": "/data/hf"}.items():
        assert f"export {name}={value}" in lines
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert "--container-image nvcr.io/nvidia/nemo:25.09" in srun
    assert " --container-mounts /lustre/ckpt:/ckpt,/lustre/data:/data:ro," in srun
    command = srun[srun.index(" torchrun ") + 1:]
    assert "--no-python" not in command  # entrypoint python: torchrun starts the interpreter itself
    assert "--nnodes 2 --nproc-per-node 8 --node-rank $SLURM_NODEID" in command
    assert "--rdzv-backend c10d --rdzv-endpoint $head_node_ip:29500" in command
    assert command.endswith(" -m flexolmo_plugin.recipes.train expert-2x7b recipe.nodes=2 recipe.gpus_per_node=8 "
                            "recipe.init_from=/ckpt/start 'recipe.data_paths=[/data/code]'")
    assert not any((tmp_path / "nemo").rglob("*.yaml"))  # the dry run leaves no experiment behind


def test_nemo_run_local_dryrun_is_a_torchrun_of_the_installed_module(launcher, tmp_path):
    plan = launcher.LaunchPlan(recipe="expert", executor="local", gpus_per_node=2, env={"FLEXOLMO_DIRECT_IO": "0"},
                               overrides=("recipe.init_from=/ckpt/start", "train.train_iters=7"))
    command = launcher.dryrun(plan, base_dir=str(tmp_path / "nemo"))
    exports = " ".join(f"{k}={v}" for k, v in {**launcher.NCCL_ENV, "FLEXOLMO_DIRECT_IO": "0"}.items())
    assert command.startswith(f"env {exports} torchrun ")
    assert "--no-python" not in command and "--nnodes 1 --nproc-per-node 2" in command
    # a phase recipe gets no cluster shape (it takes no recipe.nodes argument)
    assert command.endswith(" -m flexolmo_plugin.recipes.train expert recipe.init_from=/ckpt/start train.train_iters=7")


def test_launch_plans_refuse_bad_input_in_one_line(launcher, capsys, monkeypatch, tmp_path):
    refused = {
        "unknown recipe 'nope'": dict(recipe="nope", executor="local"),
        "account and partition": dict(recipe="public-7b"),
        "key=value": dict(recipe="public-7b", executor="local", overrides=("oops",)),
        "on the plan": dict(recipe="public-7b", executor="local", overrides=("recipe.nodes=3",)),
        "nodes must be 1": dict(recipe="public-7b", executor="local", nodes=2),
        "unquoted": dict(recipe="public", executor="local", env={"A": "two words"}),
        "container-image": dict(recipe="public", account="a", partition="p", container_mounts=("/x:/y",)),
        "/host/path:/container/path": dict(recipe="public", account="a", partition="p", container_image="i",
                                           container_mounts=("data:/data",)),
    }
    for message, kwargs in refused.items():
        with pytest.raises(ValueError, match=message):
            launcher.LaunchPlan(**kwargs)
    monkeypatch.delenv("FLEXOLMO_UNSET_FOR_TEST", raising=False)
    assert launcher.main(["public", "--executor", "local", "--env", "FLEXOLMO_UNSET_FOR_TEST", "--dry-run"]) == 2
    assert launcher.main(["public-7b", "--nodes", "0", "--executor", "local", "--dry-run"]) == 2
    monkeypatch.setenv("PATH", str(tmp_path))  # no torchrun: a local run is refused before NeMo-Run starts
    assert launcher.main(["public", "--executor", "local"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err) and "torchrun" in err[-1]
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("FLEXOLMO_PASSED_ON", "/some/where")
    assert launcher._env_items(["FLEXOLMO_PASSED_ON", "B=1"]) == {"FLEXOLMO_PASSED_ON": "/some/where", "B": "1"}


def test_production_recipes_are_the_7b_names_the_shell_launcher_gives_the_cluster_shape():
    from flexolmo_plugin.recipes.registry import RECIPES

    for name, target in RECIPES.items():
        assert name.endswith("7b") == target.startswith("flexolmo_plugin.recipes.production:"), name


def test_slurm_script_dry_run_passes_the_cluster_shape_to_the_recipe():
    env = {**os.environ, "DRY_RUN": "1", "SLURM_NNODES": "4", "GPUS_PER_NODE": "8", "SLURM_JOB_ID": "77"}
    out = subprocess.run(["bash", str(REPO / "launchers" / "torchrun_slurm.sh"), "public-7b", "recipe.precision=bf16"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert "torchrun --nnodes=4 --nproc-per-node=8 --rdzv-backend=c10d" in out
    assert "--rdzv-id=77" in out
    assert " -m flexolmo_plugin.recipes.train public-7b " in out
    assert out.rstrip().endswith("public-7b recipe.nodes=4 recipe.gpus_per_node=8 recipe.precision=bf16")
    phase = subprocess.run(["bash", str(REPO / "launchers" / "torchrun_slurm.sh"), "expert", "recipe.lr=1"], env=env,
                           capture_output=True, text=True, check=True).stdout
    assert phase.rstrip().endswith("-m flexolmo_plugin.recipes.train expert recipe.lr=1")
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
