"""The domain biases stay fp32 under Megatron's ``Float16Module`` (bf16 / fp16 mixed precision).

Megatron-Bridge wraps every model of a bf16 run in ``Float16Module``, whose constructor calls
``module.bfloat16()`` on the whole model.  Megatron keeps its own router ``expert_bias`` fp32
(``TopKRouter._maintain_float32_expert_bias``); FlexOlmo's learned domain biases must stay fp32 as
well, so that the logit offsets and the optimizer's updates are not rounded to bf16.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.module import Float16Module

from flexolmo_plugin.model.build import build_model, logits
from flexolmo_plugin.model.config import FlexOlmoConfig

# Not representable in bf16 (8 significant bits) nor in fp16 (11): rounding would change them.
BIASES = (-0.123456789, -1.000123, 0.0371)


@pytest.fixture(autouse=True)
def _groups(megatron_single_process):
    yield


def _wrapped(dtype: torch.dtype):
    config = FlexOlmoConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, top_k=2, router_bias=True)
    torch.manual_seed(0)
    model = build_model(config, params_dtype=dtype)
    for layer in model.decoder.layers:
        with torch.no_grad():
            for bias, value in zip(layer.mlp.router.domain_biases, BIASES):
                bias.fill_(value)
    assert model.config.bf16 == (dtype == torch.bfloat16) and model.config.fp16 == (dtype == torch.float16)
    return Float16Module(model.config, model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_domain_biases_stay_fp32_with_their_exact_values_under_float16module(dtype):
    wrapped = _wrapped(dtype)
    for layer in wrapped.module.decoder.layers:
        router = layer.mlp.router
        for bias, value in zip(router.domain_biases, BIASES):
            assert bias.dtype == torch.float32
            assert bias.item() == torch.tensor(value, dtype=torch.float32).item()  # not rounded to 16 bits
        assert all(row.dtype == dtype for row in router.domain_embeddings)  # everything else is cast
        assert layer.mlp.experts.local_experts[0].linear_fc1.weight.dtype == dtype
    assert wrapped.module.state_dict()["decoder.layers.0.mlp.router.domain_biases.0"].dtype == torch.float32
    # device moves and further casts keep them fp32 too (Bridge's .cuda() / Module.to)
    wrapped.to("cpu")
    wrapped.module.bfloat16()
    assert wrapped.module.decoder.layers[1].mlp.router.domain_biases[2].dtype == torch.float32


def test_router_computes_in_fp32_with_the_fp32_biases_and_their_grads_are_fp32():
    wrapped = _wrapped(torch.bfloat16)
    router = wrapped.module.decoder.layers[0].mlp.router
    h = torch.randn(6, 2, 32, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)

    logits_ = router.gating(h)
    assert logits_.dtype == torch.float32
    bias = torch.tensor([0.0, *(min(v, 0.0) for v in BIASES)], dtype=torch.float64)
    weight = torch.stack([row.detach() for row in router.domain_embeddings]).double()
    expected = h.reshape(-1, 32).double() @ weight.t() + bias
    torch.testing.assert_close(logits_.reshape(-1, 4).double(), expected, rtol=0, atol=1e-5)
    # a bf16-rounded bias would be off by far more than fp32 rounding
    rounded = torch.tensor([0.0, *(min(v, 0.0) for v in BIASES)]).to(torch.bfloat16).double()
    assert (rounded - bias).abs().max() > 1e-4

    probs, routing_map = router(h)
    assert probs.dtype == torch.float32
    reference = torch.softmax(expected, dim=-1)
    top = reference.topk(2, dim=-1)
    dense = torch.zeros_like(reference).scatter(1, top.indices, top.values)
    torch.testing.assert_close(probs.double(), dense, rtol=0, atol=1e-5)  # softmax over all, no renormalisation
    probs.sum().backward()
    assert all(b.grad is not None and b.grad.dtype == torch.float32 for b in router.domain_biases[:2])


def test_a_bf16_model_with_fp32_biases_runs_forward_and_backward():
    wrapped = _wrapped(torch.bfloat16)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    out = logits(wrapped, ids, grad=True)  # through Float16Module.forward (bf16 inside, fp32 out)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    biases = [b for layer in wrapped.module.decoder.layers for b in layer.mlp.router.domain_biases]
    assert all(b.dtype == torch.float32 and b.grad is not None and b.grad.dtype == torch.float32 for b in biases)
