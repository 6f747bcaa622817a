"""``use_te_activation_func`` and the expert spec agree (issue 16, item 8c).

Megatron's ``MLP`` uses ``submodules.activation_func`` (Transformer Engine's gated op) only when
``config.use_te_activation_func`` is set; when the spec gives none it falls back to
``config.activation_func`` but still skips its own gated-linear-unit path, so ``silu`` would be
applied to the whole ``[gate | up]`` projection.  The expert spec now carries the backend's
activation module (TE's SwiGLU with the TE backend, none locally) and a spec without one refuses
the flag.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.backends import LocalSpecProvider

from flexolmo_plugin.errors import ConfigError
from flexolmo_plugin.model.build import build_model, logits
from flexolmo_plugin.model.config import FlexOlmoConfig
from flexolmo_plugin.model.spec import flexolmo_layer_spec

CONFIG = FlexOlmoConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, num_experts=2, top_k=2)


@pytest.fixture(autouse=True)
def _groups(megatron_single_process):
    yield


def _expert_submodules(spec):
    return spec.submodules.mlp.keywords["submodules"].experts.keywords["submodules"]


def test_expert_spec_carries_the_backends_activation_module():
    local = _expert_submodules(flexolmo_layer_spec(backend="local"))
    assert local.activation_func is LocalSpecProvider().activation_func() is None


def test_te_activation_without_a_te_activation_module_is_refused():
    with pytest.raises(ConfigError, match=r"use_te_activation_func=True.*silu to \[gate \| up\]"):
        build_model(CONFIG, use_te_activation_func=True, bias_activation_fusion=False)


def test_default_settings_still_compute_swiglu():
    torch.manual_seed(0)
    model = build_model(CONFIG)
    mlp = model.decoder.layers[0].mlp.experts.local_experts[0]
    assert not model.config.use_te_activation_func and model.config.gated_linear_unit
    x = torch.randn(5, 32)
    gate, up = torch.chunk(x @ mlp.linear_fc1.weight.t(), 2, dim=-1)
    expected = (torch.nn.functional.silu(gate) * up) @ mlp.linear_fc2.weight.t()
    out, _ = mlp(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(logits(model, torch.arange(8)[None])).all()
