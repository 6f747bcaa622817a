"""FP8 validation of the production recipes (the checks themselves run on CPU; FP8 steps need a GPU)."""

from __future__ import annotations

import pytest

from flexolmo_plugin.model.config import ConfigError, FlexOlmoConfig
from flexolmo_plugin.recipes.precision import check_device_supports, check_fp8_alignment

SEVEN_B = FlexOlmoConfig(vocab_size=100352, hidden_size=4096, intermediate_size=11008, num_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, num_experts=2, top_k=2)


@pytest.mark.parametrize("precision", ["fp8-mxfp8", "nvfp4"])
def test_blackwell_only_recipes_are_refused_on_hopper_with_the_alternatives(precision):
    with pytest.raises(ConfigError, match=r"Blackwell.*sm_90 \(Hopper: H100/H200\).*'fp8-blockwise'"):
        check_device_supports(precision, (9, 0))
    check_device_supports(precision, (10, 0))  # B200: fine


def test_hopper_recipes_pass_on_hopper_and_fp8_is_refused_before_ada():
    for precision in ("bf16", "fp8-tensorwise", "fp8-blockwise"):
        check_device_supports(precision, (9, 0))
        check_device_supports(precision, None)  # no GPU visible (login node): nothing to check
    with pytest.raises(ConfigError, match="sm_80"):
        check_device_supports("fp8-blockwise", (8, 0))
    with pytest.raises(ConfigError, match="expected one of"):
        check_device_supports("fp8-delayed", (9, 0))


def test_fp8_alignment_of_the_7b_shapes_and_clear_errors_for_unaligned_sizes():
    check_fp8_alignment(SEVEN_B, tensor_parallel=2, seq_length=4096, micro_batch_size=1, sequence_parallel=True)
    odd = FlexOlmoConfig(vocab_size=128, hidden_size=48, intermediate_size=40, num_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, num_experts=2, top_k=2)
    with pytest.raises(ConfigError) as error:
        check_fp8_alignment(odd, seq_length=30, micro_batch_size=1)
    message = str(error.value)
    assert "expert FFN width" in message and "= 40" in message  # 40 % 16
    assert "key/value width" not in message and "query width" not in message  # 16 and 48 are aligned
    assert "tokens per micro-batch" in message and "hidden_size" not in message  # 48 is aligned
    with pytest.raises(
        ConfigError, match="expert FFN width per expert-TP rank"
    ):  # 11008 / 8 = 1376 = 86 x 16 ok; / 64 not
        check_fp8_alignment(SEVEN_B, expert_tensor_parallel=64, seq_length=4096, micro_batch_size=1)


def _container_checks():
    """Bridge-dependent checks, in a spawned process (Bridge's import patches stay out of pytest)."""
    from flexolmo_plugin.compat import enable_bridge_compat

    enable_bridge_compat()
    from flexolmo_plugin.recipes.precision import (
        check_container_precision,
        mixed_precision_config,
    )
    from flexolmo_plugin.recipes.production import flexolmo_expert_2x7b_config

    out = {}
    for name, call in {
        "cpu-fp8": lambda: flexolmo_expert_2x7b_config(init_from="/x", precision="fp8-blockwise", cpu=True),
        "edges-bf16": lambda: flexolmo_expert_2x7b_config(
            init_from="/x", precision="bf16", bf16_edge_layers=1, cpu=False
        ),
        "too-many-edges": lambda: flexolmo_expert_2x7b_config(
            init_from="/x", precision="fp8-tensorwise", bf16_edge_layers=17, cpu=False
        ),
        "unaligned": lambda: flexolmo_expert_2x7b_config(
            init_from="/x", precision="fp8-tensorwise", model={"intermediate_size": 11000}, cpu=False
        ),
        "cross-node-ep": lambda: flexolmo_expert_2x7b_config(init_from="/x", gpus_per_node=1, expert_parallel=2,
                                                             cpu=False),
    }.items():
        try:
            call()
            out[name] = "built"
        except ConfigError as error:
            out[name] = str(error)
    container = flexolmo_expert_2x7b_config(init_from="/x", precision="fp8-blockwise", bf16_edge_layers=2, cpu=False)
    mp = container.mixed_precision
    out["edges"] = (
        mp.first_last_layers_bf16,
        mp.num_layers_at_start_in_bf16,
        mp.num_layers_at_end_in_bf16,
        mp.fp8_param_gather,
    )
    container.mixed_precision = mixed_precision_config("fp8-mxfp8")  # as a Hydra override would
    try:
        check_container_precision(container, (9, 0))
        out["override"] = "accepted"
    except ConfigError as error:
        out["override"] = str(error)
    container.model.moe_router_dtype = "bf16"
    container.mixed_precision = mixed_precision_config("bf16")
    try:
        check_container_precision(container, (9, 0))
        out["router"] = "accepted"
    except ConfigError as error:
        out["router"] = str(error)
    return out


@pytest.fixture(scope="module")
def container_checks():
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_container_checks).result(timeout=300)


@pytest.mark.multiprocess
def test_recipes_refuse_bad_precision_settings_clearly(container_checks):
    got = container_checks
    assert "needs GPUs with Transformer Engine" in got["cpu-fp8"]
    assert "only applies to FP8" in got["edges-bf16"]
    assert "exceeds the 32 layers" in got["too-many-edges"]
    assert "FP8 GEMMs need multiples of 16" in got["unaligned"] and "11000" in got["unaligned"]
    assert "must stay on NVLink" in got["cross-node-ep"]
    assert got["edges"] == (True, 2, 2, False)  # optional BF16 first/last layers; weights stay BF16
    assert "Blackwell" in got["override"] and "sm_90" in got["override"]
    assert "router must compute in fp32" in got["router"]
