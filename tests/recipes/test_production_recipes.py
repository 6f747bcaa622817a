"""The production (7B-scale) recipes: valid at full size, and a scaled-down copy of each trains on CPU.

Full size: every recipe x precision builds a ``ConfigContainer`` (with no argument but those two:
no start checkpoint, as a Bridge user or ``flexolmo plan`` builds it) and goes through Megatron-Bridge's
own ``runtime_config_update`` (mixed-precision setup, data-parallel size for the recipe's cluster,
Megatron-Core's ``TransformerConfig`` validation) without instantiating a 7B model.  Without
Transformer Engine, Megatron-Core refuses MoE FP8 at its TE-version check, which comes after its
FP8 consistency checks (BF16 edge layers, recipe, router padding vs dispatcher); the FP8 variants
must reach exactly that refusal.  Scaled-down: tiny sizes, one process, two iterations each on
Bridge's real ``pretrain()`` loop through :func:`recipes.train.run`, from one tiny upcycled checkpoint.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from tests.support import make_dense_model, run_distributed

PRECISIONS = ("bf16", "fp8-tensorwise", "fp8-blockwise")
WORLD = {"public-7b": 32, "expert-2x7b": 8, "router-tune-7x7b": 8, "inference-7x7b": 8}


def _validate_full_size():
    from flexolmo_plugin.compat import enable_bridge_compat

    enable_bridge_compat()
    from flexolmo_plugin.recipes.production import describe
    from flexolmo_plugin.recipes.registry import RECIPES, recipe

    PRODUCTION_RECIPES = {name: recipe(name) for name in RECIPES if name.endswith("7b")}
    from megatron.bridge.training.config import runtime_config_update

    results = {}
    for name, build in PRODUCTION_RECIPES.items():
        for precision in PRECISIONS:
            container = build(precision=precision, cpu=False)  # no init_from: the recipe's default sizes
            os.environ["WORLD_SIZE"] = str(WORLD[name])  # the recipe's default cluster
            try:
                runtime_config_update(container)
                outcome = "valid"
            except ValueError as error:
                outcome = str(error)
            model = container.model
            results[name, precision] = dict(
                describe(container), outcome=outcome, dp=getattr(container, "data_parallel_size", None),
                params_dtype=str(model.params_dtype), hidden=model.hidden_size, layers=model.num_layers,
                ffn=model.moe_ffn_hidden_size, vocab=model.vocab_size, skip_train=container.validation.skip_train,
                edges=(model.first_last_layers_bf16, model.num_layers_at_start_in_bf16),
                timeout=container.dist.distributed_timeout_minutes, dispatcher=model.moe_token_dispatcher_type)
    return results


@pytest.fixture(scope="module")
def full_size():
    """In a fresh process without torch.distributed, so that Bridge takes the world size from
    ``WORLD_SIZE`` (as under torchrun before initialisation) and its patches stay out of pytest."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_validate_full_size).result(timeout=300)


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", sorted(WORLD))
def test_every_recipe_is_a_valid_container_at_full_size(full_size, name):
    bf16 = full_size[name, "bf16"]
    assert bf16["outcome"] == "valid", bf16["outcome"]
    assert (bf16["hidden"], bf16["layers"], bf16["ffn"], bf16["vocab"]) == (4096, 32, 11008, 100352)
    assert bf16["params_dtype"] == "torch.bfloat16" and bf16["fp8"] is None and bf16["router_dtype"] == "fp32"
    assert bf16["dispatcher"] == "alltoall" and bf16["timeout"] == 60
    for precision in ("fp8-tensorwise", "fp8-blockwise"):
        fp8 = full_size[name, precision]
        assert fp8["outcome"].startswith("Only transformer-engine>=1.7.0 supports MoE FP8"), fp8["outcome"]
        assert fp8["fp8"] == "hybrid" and fp8["fp8_recipe"] == precision.split("-")[1]
        assert not fp8["router_padding"] and fp8["router_dtype"] == "fp32"  # SequentialMLP pads itself
    assert full_size[name, "fp8-tensorwise"]["edges"] == (True, 1)  # NVIDIA's current-scaling baseline
    assert full_size[name, "fp8-blockwise"]["edges"][0] is False


@pytest.mark.multiprocess
def test_layouts_keep_model_parallelism_inside_a_node(full_size):
    expected = {"public-7b": (1, 1, 32, 1), "expert-2x7b": (1, 1, 8, 2), "router-tune-7x7b": (2, 1, 4, 7),
                "inference-7x7b": (2, 1, 4, 5)}
    for name, (tp, ep, dp, top_k) in expected.items():
        got = full_size[name, "bf16"]
        assert (got["tensor_parallel"], got["expert_parallel"], got["dp"], got["top_k"]) == (tp, ep, dp, top_k), name
    assert full_size["router-tune-7x7b", "bf16"]["layout"]["sequence_parallel"]  # Megatron: MoE + TP needs SP
    assert full_size["expert-2x7b", "bf16"]["trainable"] == "anchored"
    assert full_size["inference-7x7b", "bf16"]["skip_train"]


# ----------------------------------------------------------------------------- scaled down, on CPU
TINY = dict(vocab_size=100, hidden_size=48, intermediate_size=40, num_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=64)
SEQ, ITERS = 32, 2


def _common(**extra):
    args = {
        "cpu": True,
        "nodes": 1,
        "gpus_per_node": 1,
        "seq_length": SEQ,
        "global_batch_size": 2,
        "micro_batch_size": 1,
        "log_interval": 1,
        **extra,
    }
    return [f"recipe.{k}={v}" for k, v in args.items()]


def _train_scaled_down(rank, world_size, init):
    from flexolmo_plugin.compat import enable_bridge_compat

    enable_bridge_compat()
    from megatron.bridge.training.callbacks import Callback

    from flexolmo_plugin.recipes.train import run

    class EvalLoss(Callback):
        losses: list = []

        def on_eval_end(self, context):
            self.losses.append(float(context.total_loss_dict["lm loss"]))

    out = {}
    public_model = [f"recipe.model.{k}={v}" for k, v in TINY.items()]
    runs = {
        "public-7b": _common(train_iters=ITERS, lr=1e-3, lr_warmup_iters=0) + public_model,
        "expert-2x7b": _common(init_from=init, train_iters=ITERS, lr_warmup_iters=0, expert_parallel=1),
        "router-tune-7x7b": _common(
            init_from=init, train_iters=ITERS, lr_warmup_iters=0, tensor_parallel=1, **{"model.num_experts": 2}
        ),
    }
    for name, overrides in runs.items():
        log = run(name, overrides)
        out[name] = dict(losses=[h[1] for h in log.history], shares=log.history[-1][3], throughput=log.throughput)
    evaluation = EvalLoss()
    log = run(
        "inference-7x7b",
        _common(init_from=init, eval_iters=2, tensor_parallel=1, **{"model.num_experts": 2}),
        callbacks=[evaluation],
    )
    out["inference-7x7b"] = dict(losses=list(evaluation.losses), steps=len(log.history))
    return out


@pytest.fixture(scope="module")
def scaled_down(tmp_path_factory):
    from flexolmo_plugin.lifecycle.upcycle import upcycle

    root = tmp_path_factory.mktemp("production")
    make_dense_model(root / "public", vocab_size=TINY["vocab_size"], hidden_size=TINY["hidden_size"])
    generator = torch.Generator().manual_seed(1)
    for name in ("e0", "e1"):
        np.save(root / f"{name}.npy", torch.randn(TINY["hidden_size"], generator=generator).numpy())
    upcycle(
        root / "public",
        root / "init",
        public_embedding=root / "e0.npy",
        domain_embedding=root / "e1.npy",
        expert_names=("public", "code"),
    )
    return run_distributed(_train_scaled_down, 1, str(root / "init"))[0]


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["public-7b", "expert-2x7b", "router-tune-7x7b"])
def test_scaled_down_recipe_trains_on_bridge(scaled_down, name):
    got = scaled_down[name]
    assert len(got["losses"]) == ITERS and all(math.isfinite(x) for x in got["losses"])
    assert abs(sum(got["shares"]) - 1.0) < 1e-6
    assert [t[0] for t in got["throughput"]] == list(range(1, ITERS + 1))
    assert all(t[1] > 0 and t[2] is None for t in got["throughput"])  # no tabulated peak on CPU: no MFU


@pytest.mark.multiprocess
def test_scaled_down_inference_evaluates_without_training(scaled_down):
    got = scaled_down["inference-7x7b"]
    assert got["steps"] == 0
    assert got["losses"] and all(math.isfinite(x) and 0 < x < 2 * math.log(128) for x in got["losses"])
