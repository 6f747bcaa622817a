"""Recipes in Megatron-Bridge's idiom (issue #15 item 2).

Bridge's recipe runner (``scripts/training/run_recipe.py``) calls a recipe function with no
arguments and refines the ``ConfigContainer`` with ``process_config_with_overrides``; every
registered FlexOlmo recipe must survive exactly that, the list of recipes must be readable without
importing Bridge, and a recipe built without the start checkpoint its training needs must be
refused by ``flexolmo train`` in one line, before anything is written.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from flexolmo_plugin.compat import enable_bridge_compat

REPO = Path(__file__).resolve().parents[2]
# Defaults every recipe documents: OLMo-2 7B's shape, and the paper's expert counts (the public model
# is one expert; an owner trains [public, owner]; FlexOlmo-7x7B merges seven).
EXPECTED = {"public": (1, "all"), "expert": (2, "anchored"), "router-tune": (7, "router"),
            "public-7b": (1, "all"), "expert-2x7b": (2, "anchored"), "router-tune-7x7b": (7, "router"),
            "inference-7x7b": (7, "router")}
# Bridge-style overrides, including the parallel layout (shrunk to one process so that Bridge's own
# validation can run here whatever the recipe's cluster).
OVERRIDES = ["train.train_iters=7", "optimizer.lr=0.0001", "model.num_layers=4", "train.global_batch_size=2",
             "model.tensor_model_parallel_size=1", "model.expert_model_parallel_size=1",
             "model.expert_tensor_parallel_size=1", "model.sequence_parallel=false", "checkpoint.save=/runs/x"]


def test_listing_recipes_and_planning_a_launch_import_no_megatron_bridge():
    code = f"""
import importlib.util, sys
from flexolmo_plugin.recipes.registry import RECIPES, check_name
names = [check_name(name) for name in RECIPES]
spec = importlib.util.spec_from_file_location("nemo_run_launcher", {str(REPO / "launchers" / "nemo_run_launcher.py")!r})
launcher = importlib.util.module_from_spec(spec); sys.modules[spec.name] = launcher; spec.loader.exec_module(launcher)
launcher.LaunchPlan(recipe="expert-2x7b", executor="local", gpus_per_node=2)
print(len(names), sorted(m for m in sys.modules if m.startswith(("megatron.bridge", "nemo_run."))))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip().splitlines()[-1] == "7 []"


def test_every_recipe_builds_with_no_arguments_and_takes_bridge_overrides(monkeypatch):
    enable_bridge_compat()
    from megatron.bridge.training.config import ConfigContainer, runtime_config_update
    from megatron.bridge.training.utils.omegaconf_utils import process_config_with_overrides

    from flexolmo_plugin.recipes.provider import flexolmo_transformer_layer_spec
    from flexolmo_plugin.recipes.registry import RECIPES, recipe

    assert set(RECIPES) == set(EXPECTED)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for name in RECIPES:
        function = recipe(name)
        parameters = inspect.signature(function).parameters.values()
        assert all(p.kind is p.KEYWORD_ONLY and p.default is not p.empty for p in parameters), name
        config = function()  # as Bridge's run_recipe.py calls a recipe
        assert isinstance(config, ConfigContainer), name
        model = config.model
        experts, trainable = EXPECTED[name]
        assert (model.num_moe_experts, model.trainable, model.init_from) == (experts, trainable, None), name
        assert (model.hidden_size, model.num_layers, model.ffn_hidden_size, model.vocab_size) == (4096, 32, 11008,
                                                                                                   100352), name
        config = process_config_with_overrides(config, cli_overrides=OVERRIDES)
        assert (config.train.train_iters, config.optimizer.lr, config.model.num_layers) == (7, 1e-4, 4), name
        assert config.checkpoint.save == "/runs/x" and config.model.tensor_model_parallel_size == 1, name
        assert config.model.transformer_layer_spec is flexolmo_transformer_layer_spec, name  # callables survive
        runtime_config_update(config)  # Bridge's own finalisation and validation, as pretrain() runs it
        assert config.data_parallel_size == 1, name


def test_recipe_arguments_come_first_then_bridge_overrides():
    enable_bridge_compat()
    from flexolmo_plugin.recipes.train import build_config

    config = build_config("expert", ["recipe.train_iters=5", "recipe.lr=0.002", "train.train_iters=7"])
    # the recipe argument sets both the run length and the cosine horizon; the Bridge override then
    # changes only the field it names
    assert (config.train.train_iters, config.scheduler.lr_decay_iters, config.optimizer.lr) == (7, 5, 0.002)


@pytest.mark.parametrize("name", ["expert", "router-tune", "expert-2x7b", "router-tune-7x7b", "inference-7x7b"])
def test_train_refuses_a_recipe_without_its_start_checkpoint(name, tmp_path, capsys):
    from flexolmo_plugin.cli import main

    run = tmp_path / "run"
    # the dataset does not exist either: the start checkpoint is checked first, before any input
    code = main(["train", name, f"recipe.data_paths=[{tmp_path / 'no-data'}]",
                 *([f"recipe.save_dir={run}"] if name != "inference-7x7b" else [])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"recipe '{name}' needs recipe.init_from=..." in err[0]
    assert not run.exists() and list(tmp_path.iterdir()) == []
