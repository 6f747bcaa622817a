"""Frozen-weight-aware FLOP counting, checked against independently derived numbers.

The expected values are written out by hand from the model's GEMM shapes (not by calling the code
under test with other arguments), plus one cross-check against Megatron-Bridge's own
``num_floating_point_operations`` formula for the all-trainable case.
"""

from __future__ import annotations

import types

import pytest

from flexolmo_plugin.model.config import ConfigError, FlexOlmoConfig
from flexolmo_plugin.recipes.flops import (
    Trainable,
    flops_per_token,
    peak_flops,
    step_flops,
    throughput,
)

# d=8, f=12, 2 layers, 2 heads of 4 (q width 8), 1 KV head (kv width 4), vocab 128 (already padded)
TINY = FlexOlmoConfig(vocab_size=128, hidden_size=8, intermediate_size=12, num_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, num_experts=2, top_k=2)
S = 10


def _hand_counts():
    """Per-token forward FLOPs of TINY's GEMMs, from the shapes."""
    qkv = 2 * 8 * (8 + 2 * 4)  # 256
    core = 2 * 2 * 8 * (S / 2)  # QK^T and AV, s/2 keys on average: 160
    proj = 2 * 8 * 8  # 128
    router = 2 * 8 * 2  # 32
    fc1 = 2 * 8 * 24  # 384 per expert-token (gate and up)
    fc2 = 2 * 12 * 8  # 192
    output = 2 * 8 * 128  # 2048
    return qkv, core, proj, router, fc1, fc2, output


def test_all_trainable_is_three_forwards_and_matches_hand_count():
    qkv, core, proj, router, fc1, fc2, output = _hand_counts()
    # top-2 of 2: every token visits both experts
    forward = 2 * (qkv + core + proj + router + 2 * (fc1 + fc2)) + output
    got = flops_per_token(TINY, seq_length=S, trainable=Trainable.policy("all", 2))
    assert got.forward == pytest.approx(forward)
    # core attention has no weights: its backward is two input-gradient products, no wgrad
    assert got.dgrad == pytest.approx(forward + 2 * core)
    assert got.wgrad == pytest.approx(forward - 2 * core)
    assert got.total == pytest.approx(3 * forward)


def test_anchored_counts_no_weight_gradient_for_frozen_weights_and_no_dgrad_before_the_first_trainable():
    qkv, core, proj, router, fc1, fc2, output = _hand_counts()
    got = flops_per_token(TINY, seq_length=S, trainable=Trainable.policy("anchored", 2, owner_expert=1))
    layer_forward = qkv + core + proj + router + 2 * (fc1 + fc2)
    assert got.forward == pytest.approx(2 * layer_forward + output)
    # wgrad: router and the owner's FFN in each layer, nothing else
    assert got.wgrad == pytest.approx(2 * (router + fc1 + fc2))
    # dgrad, layer 0: the residual carries no gradient until the MoE, so only the owner's fc2 needs
    # one (to reach its fc1 weight); layer 1: every GEMM, core attention twice; then the output layer
    layer0 = fc2
    layer1 = qkv + 2 * core + proj + router + 2 * (fc1 + fc2)
    assert got.dgrad == pytest.approx(layer0 + layer1 + output)
    full = flops_per_token(TINY, seq_length=S, trainable=Trainable.policy("all", 2))
    assert got.total < full.total


def test_router_tuning_and_forward_only():
    qkv, core, proj, router, fc1, fc2, output = _hand_counts()
    tuning = flops_per_token(TINY, seq_length=S, trainable=Trainable.policy("router", 2))
    assert tuning.wgrad == pytest.approx(2 * router)
    # layer 0: nothing before the router is trainable and the router's input gets no gradient
    assert tuning.dgrad == pytest.approx(qkv + 2 * core + proj + router + 2 * (fc1 + fc2) + output)
    inference = flops_per_token(TINY, seq_length=S, trainable=Trainable.policy("none", 2))
    assert inference.total == pytest.approx(2 * (qkv + core + proj + router + 2 * (fc1 + fc2)) + output)


def test_measured_expert_shares_weight_the_expert_gemms():
    qkv, core, proj, router, fc1, fc2, output = _hand_counts()
    top1 = FlexOlmoConfig(**{**TINY.__dict__, "top_k": 1})
    # 75% of the token slots go to the (frozen) public expert, 25% to the owner
    got = flops_per_token(top1, seq_length=S, trainable=Trainable.policy("anchored", 2), expert_shares=[0.75, 0.25])
    assert got.forward == pytest.approx(2 * (qkv + core + proj + router + fc1 + fc2) + output)
    assert got.wgrad == pytest.approx(2 * (router + 0.25 * (fc1 + fc2)))


def test_step_flops_scale_with_tokens_and_throughput_reports_mfu():
    one = flops_per_token(TINY, seq_length=S, trainable=Trainable.policy("all", 2)).total
    assert step_flops(TINY, seq_length=S, global_batch_size=4, trainable=Trainable.policy("all", 2)).total == \
        pytest.approx(one * 4 * S)
    tflops, mfu = throughput(
        989.4e12 * 8, 2.0, num_gpus=8, peak_flops_per_gpu=peak_flops("NVIDIA H100 80GB HBM3", "bf16")
    )
    assert tflops == pytest.approx(494.7) and mfu == pytest.approx(0.5)
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp8-blockwise") == 1978.9e12
    assert peak_flops(None, "bf16") is None and peak_flops("NVIDIA A10G", "bf16") is None


def test_bad_inputs_are_refused():
    with pytest.raises(ConfigError, match="summing to 1"):
        flops_per_token(TINY, seq_length=S, trainable=Trainable.policy("all", 2), expert_shares=[0.5, 0.6])
    with pytest.raises(ConfigError, match="policy"):
        Trainable.policy("frozen", 2)
    with pytest.raises(ConfigError, match="owner_expert"):
        Trainable.policy("anchored", 2, owner_expert=0)
    with pytest.raises(ValueError, match="positive"):
        throughput(1.0, 0.0, num_gpus=1, peak_flops_per_gpu=None)


def test_all_trainable_agrees_with_megatron_bridge_formula_plus_the_router_gemm():
    """Bridge's formula (3 x forward, causal core attention, padded vocab) omits only the router GEMM."""
    from flexolmo_plugin.compat import enable_bridge_compat

    enable_bridge_compat()
    from megatron.bridge.training.utils.flop_utils import num_floating_point_operations

    from flexolmo_plugin.recipes.provider import FlexOlmoModelProvider

    config = FlexOlmoConfig(
        vocab_size=100352,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_experts=7,
        top_k=5,
    )
    provider = FlexOlmoModelProvider.from_flexolmo_config(config, seq_length=4096)
    # The provider hands Bridge our own count (its _get_num_floating_point_operations hook); the same
    # fields without the hook get Bridge's generic formula, the independent reference here.
    generic = types.SimpleNamespace(**vars(provider))
    container = types.SimpleNamespace(model=generic, peft=None, dataset=None)
    batch = 3
    theirs = num_floating_point_operations(container, batch_size=batch)
    router = 3 * 2 * 4096 * 7 * 32 * batch * 4096
    ours = step_flops(config, seq_length=4096, global_batch_size=batch, trainable=Trainable.policy("all", 7)).total
    assert ours == pytest.approx(theirs + router, rel=1e-12)
    hooked = types.SimpleNamespace(model=provider, peft=None, dataset=None)
    assert num_floating_point_operations(hooked, batch_size=batch) == ours
