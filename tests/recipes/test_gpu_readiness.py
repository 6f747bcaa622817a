"""GPU-path settings that must be right before the first GPU run, checked on CPU (issue 16, items 1, 7, 8).

* item 1: ``gradient_accumulation_fusion`` only where APEX's ``fused_weight_gradient_mlp_cuda`` is
  importable (GPTModel's output layer is Megatron's own ``ColumnParallelLinear``, which refuses the
  flag without it, Transformer Engine or not);
* item 7: ``fp8-blockwise`` refused below CUDA/cuBLAS 12.9; the NVFP4 preset keeps BF16 weights;
* item 8a: ``flexolmo_config.json`` records the dtype the saved weights will have (bf16 for a bf16
  run), checked against the model Bridge itself builds after applying the run's mixed precision.

Bridge-dependent facts are gathered in one spawned process (Bridge's import patches stay out of pytest).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from flexolmo_plugin.model.config import ConfigError
from flexolmo_plugin.recipes.precision import (
    check_device_supports,
    current_cuda_version,
    parse_cuda_version,
)

TINY = dict(vocab_size=100, hidden_size=48, intermediate_size=40, num_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=64, router_bias=True)


def _error(call):
    try:
        call()
    except (ConfigError, RuntimeError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return "ok"


def _facts(tmp: str) -> dict:
    from pathlib import Path

    from flexolmo_plugin import compat

    compat.enable_cpu_compat()
    compat.enable_bridge_compat()
    from megatron.bridge.training.config import runtime_config_update
    from megatron.core.tensor_parallel import layers as megatron_layers

    from flexolmo_plugin.model.build import unwrap
    from flexolmo_plugin.model.parallel import ensure_model_parallel
    from flexolmo_plugin.model.spec import gradient_accumulation_fusion_available
    from flexolmo_plugin.recipes.precision import check_container_precision, mixed_precision_config
    from flexolmo_plugin.recipes.production import _gpu_settings, flexolmo_expert_2x7b_config
    from flexolmo_plugin.recipes.provider import FlexOlmoModelProvider
    from flexolmo_plugin.recipes.train import write_run_config

    out: dict = {}
    ensure_model_parallel()

    def build(container):
        container.model.finalize()  # as Bridge's runtime_config_update does (init methods, checks)
        return container.model.provide_distributed_model(wrap_with_ddp=False)

    def expert_recipe(save: str | None = None, **kwargs):
        container = flexolmo_expert_2x7b_config(init_from="/cluster/not-mounted", expert_parallel=1, model=dict(TINY),
                                                save_dir=save, **kwargs)
        container.model.init_from = None  # nothing to load: a random tiny model
        return container

    # ---- item 1: gradient accumulation fusion
    out["apex_flag"] = megatron_layers._grad_accum_fusion_available
    out["apex_detected"] = gradient_accumulation_fusion_available()
    out["provider_default"] = FlexOlmoModelProvider().gradient_accumulation_fusion
    container = expert_recipe(cpu=True)
    out["te_present"] = _error(lambda: _gpu_settings(container, container.model.layout, transformer_engine=True))
    out["te_fusion"] = (container.model.gradient_accumulation_fusion, container.model.moe_permute_fusion)
    container.model.use_cpu_initialization = True
    container.model.moe_permute_fusion = False  # a TE kernel: Megatron checks TE really is there
    out["te_present_builds"] = _error(lambda: build(container))
    container.model.gradient_accumulation_fusion = True  # what the recipe used to set wherever TE imports
    out["forced_fusion_builds"] = _error(lambda: build(container))

    # ---- item 8c: use_te_activation_func needs the TE backend's activation module (refused up front)
    local = expert_recipe(cpu=True).model
    local.use_te_activation_func, local.flexolmo_backend = True, "local"
    out["te_activation_local"] = _error(local.check_flexolmo)

    # ---- item 7: NVFP4 preset, blockwise at run time
    nvfp4 = mixed_precision_config("nvfp4")
    out["nvfp4"] = (nvfp4.fp4, nvfp4.fp4_param_gather, nvfp4.fp4_param, nvfp4.fp8_param_gather, nvfp4.bf16)
    out["nvfp4_fp8_gather"] = _error(lambda: mixed_precision_config("nvfp4", fp8_param_gather=True))
    blockwise = expert_recipe(cpu=True)
    blockwise.mixed_precision = mixed_precision_config("fp8-blockwise")  # as a Hydra override would
    out["blockwise_cuda_12_8"] = _error(lambda: check_container_precision(blockwise, (9, 0), (12, 8)))
    out["blockwise_cuda_12_9"] = _error(lambda: check_container_precision(blockwise, (9, 0), (12, 9)))

    # ---- item 8a: the dtype flexolmo_config.json records
    recorded = {}
    for name, mixed in {"bf16": "recipe", "fp16": "fp16_mixed", "fp32": None}.items():
        save = Path(tmp) / name
        save.mkdir()
        container = expert_recipe(str(save), cpu=False)
        if mixed != "recipe":
            container.mixed_precision = mixed
        write_run_config(container, "expert-2x7b")
        recorded[name] = json.loads((save / "flexolmo_config.json").read_text())["dtype"]
        if name == "bf16":  # Bridge's own path: its mixed-precision setup, then its model builder
            out["before_setup"] = str(container.model.params_dtype)
            os.environ["WORLD_SIZE"] = "8"
            runtime_config_update(container)
            model = container.model
            model.use_cpu_initialization, model.gradient_accumulation_fusion = True, False
            model.moe_permute_fusion = False
            chunks = model.provide_distributed_model(wrap_with_ddp=False)
            out["wrapper"] = type(chunks[0]).__name__
            state = unwrap(chunks[0]).state_dict()
            dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in state.values()
                             if isinstance(t, torch.Tensor) and t.is_floating_point())
            out["built_majority"] = dtypes.most_common(1)[0][0]
            out["bias_dtypes"] = sorted({str(t.dtype) for k, t in state.items() if "domain_biases" in k})
    out["recorded"] = recorded
    return out


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("gpu_readiness"))
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_facts, tmp).result(timeout=300)


# ------------------------------------------------------------------------------------------ item 1
@pytest.mark.multiprocess
def test_gradient_accumulation_fusion_follows_apex_not_transformer_engine(facts):
    assert facts["apex_detected"] == facts["apex_flag"]  # the flag ColumnParallelLinear itself checks
    assert facts["provider_default"] == facts["apex_flag"]  # not Bridge's "TE imports" default
    assert facts["te_present"] == "ok"
    # with Transformer Engine importable, permute fusion is on; wgrad fusion only with APEX's extension
    assert facts["te_fusion"] == (facts["apex_flag"], True)
    assert facts["te_present_builds"] == "ok"
    if not facts["apex_flag"]:  # this machine: the flag the recipe used to set would crash the build
        assert "fused_weight_gradient_mlp_cuda" in facts["forced_fusion_builds"]


# ------------------------------------------------------------------------------------------ item 7
def test_blockwise_fp8_is_refused_below_cuda_12_9():
    with pytest.raises(ConfigError, match=r"cuBLAS >= 12\.9.*CUDA 12\.8.*'fp8-tensorwise'"):
        check_device_supports("fp8-blockwise", (9, 0), (12, 8))
    with pytest.raises(ConfigError, match="cuBLAS"):
        check_device_supports("fp8-blockwise", None, (12, 4))  # a login node knows its CUDA build too
    for cuda in ((12, 9), (12, 10), (13, 0), None):
        check_device_supports("fp8-blockwise", (9, 0), cuda)
    check_device_supports("fp8-tensorwise", (9, 0), (12, 4))  # per-tensor scaling needs no 12.9
    assert parse_cuda_version("12.10") == (12, 10) > (12, 9)  # numbers, not floats (12.10 < 12.9)
    assert parse_cuda_version(None) is None
    assert current_cuda_version() == parse_cuda_version(torch.version.cuda)


@pytest.mark.multiprocess
def test_nvfp4_keeps_bf16_weights_and_blockwise_override_is_checked_at_run_time(facts):
    assert facts["nvfp4"] == ("e2m1", False, False, False, True)
    assert "keeps its weights in BF16" in facts["nvfp4_fp8_gather"]
    assert "cuBLAS >= 12.9" in facts["blockwise_cuda_12_8"]
    assert facts["blockwise_cuda_12_9"] == "ok"


# ------------------------------------------------------------------------------------------ item 8a
@pytest.mark.multiprocess
def test_run_config_records_the_dtype_of_the_saved_weights(facts):
    assert facts["before_setup"] == "torch.float32"  # what used to be recorded for a bf16 run
    assert facts["recorded"] == {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    # Bridge's own mixed-precision setup and model builder give exactly that dtype ...
    assert facts["wrapper"] == "Float16Module"
    assert facts["built_majority"] == facts["recorded"]["bf16"]
    # ... with FlexOlmo's domain biases kept fp32 (a minority of tensors)
    assert facts["bias_dtypes"] == ["torch.float32"]


# ------------------------------------------------------------------------------------------ item 8c
@pytest.mark.multiprocess
def test_recipe_refuses_te_activation_without_the_te_backend(facts):
    assert "use_te_activation_func=True with flexolmo_backend='local'" in facts["te_activation_local"]
    assert "silu to [gate | up]" in facts["te_activation_local"]
