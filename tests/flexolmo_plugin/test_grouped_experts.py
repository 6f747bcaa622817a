"""Grouped experts cannot be frozen per expert: anchoring refuses them (issue #16, item 4).

Transformer Engine's grouped linear takes ``requires_grad`` from ``weights[0]`` for every GEMM of the
group (TE v2.18 ``grouped_linear.py``), so a grouped experts module with a frozen public expert and
a trainable owner expert would silently never train the owner.  Megatron-Core 0.19.2 has one
grouped experts module, ``TEGroupedMLP`` (and its subclass ``InferenceGroupedMLP``); the local
backend has no grouped path (``LocalSpecProvider.grouped_mlp_modules`` returns ``SequentialMLP``
whatever it is asked).  ``TEGroupedMLP`` itself builds without TE when it is given its grouped GEMMs
(``GroupedMLPSubmodules.linear_fc1/linear_fc2``): the CPU tests below build the *real*
``TEGroupedMLP`` around a stand-in grouped GEMM with TE ``GroupedLinear``'s parameter layout
(``weight0 .. weight{n-1}``, ``num_gemms``); the ``-m te`` test builds it with Megatron's own TE
grouped linears.
"""

import pytest
import torch
from torch import nn

import flexolmo_plugin as fp
from flexolmo_plugin.errors import ConfigError
from flexolmo_plugin.lifecycle import freezing
from flexolmo_plugin.model.spec import transformer_engine_available
from tests.support import make_hf_model, save_hf_model


class StandInGroupedLinear(nn.Module):
    """TE ``GroupedLinear``'s parameter layout (one ``weight{i}`` per expert, ``num_gemms``), no GEMM."""

    def __init__(self, num_gemms, input_size, output_size, **_):
        super().__init__()
        self.num_gemms = num_gemms
        for i in range(num_gemms):
            self.register_parameter(f"weight{i}", nn.Parameter(torch.zeros(output_size, input_size)))


def _grouped_mlp(moe_layer, num_local_experts, linear_fc1=StandInGroupedLinear, linear_fc2=StandInGroupedLinear):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.experts import GroupedMLPSubmodules, TEGroupedMLP

    return TEGroupedMLP(num_local_experts, moe_layer.config,
                        GroupedMLPSubmodules(linear_fc1=linear_fc1, linear_fc2=linear_fc2),
                        pg_collection=ProcessGroupCollection.use_mpu_process_groups())


@pytest.fixture()
def two_expert_model(tmp_path, megatron_single_process):
    return fp.from_hf(save_hf_model(make_hf_model(seed=8, num_experts=2, num_experts_per_tok=2), tmp_path / "hf"))


def test_per_expert_model_has_no_grouped_experts_and_anchors(two_expert_model):
    assert freezing.grouped_expert_modules(two_expert_model) == []
    freezing.anchor(two_expert_model, owner_expert=1)  # the default spec: one module per expert
    freezing.check_grouped_experts(two_expert_model)


def test_anchoring_refuses_grouped_experts(two_expert_model):
    model = two_expert_model
    for layer in model.decoder.layers:
        layer.mlp.experts = _grouped_mlp(layer.mlp, 2)
    grouped = freezing.grouped_expert_modules(model)
    assert [name for name, _ in grouped] == [f"decoder.layers.{i}.mlp.experts" for i in range(2)]
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match="grouped GEMM.*requires_grad from the first expert"):
        freezing.anchor(model, owner_expert=1)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before, "refused before changing anything"


def test_mixed_requires_grad_in_a_grouped_module_is_refused(two_expert_model):
    layer = two_expert_model.decoder.layers[0]
    layer.mlp.experts = experts = _grouped_mlp(layer.mlp, 2)
    freezing.check_grouped_experts(two_expert_model)  # all trainable: fine
    experts.requires_grad_(False)
    freezing.check_grouped_experts(two_expert_model)  # all frozen (router tuning, evaluation): fine
    experts.linear_fc1.weight1.requires_grad_(True)  # the owner's expert trainable behind a frozen weight0
    with pytest.raises(ConfigError, match=r"decoder\.layers\.0\.mlp\.experts \(TEGroupedMLP\).*weight1"):
        freezing.check_grouped_experts(two_expert_model)


def test_a_grouped_linear_alone_is_recognised(two_expert_model):
    """Any module running several experts in one GEMM (``num_gemms`` > 1), not only ``TEGroupedMLP``."""
    layer = two_expert_model.decoder.layers[1]
    layer.mlp.experts.grouped = grouped = StandInGroupedLinear(2, 4, 4)
    assert ("decoder.layers.1.mlp.experts.grouped", grouped) in freezing.grouped_expert_modules(two_expert_model)
    grouped.weight0.requires_grad_(False)
    with pytest.raises(ConfigError, match="mixed requires_grad"):
        freezing.check_grouped_experts(two_expert_model)


def test_one_local_expert_per_grouped_module_may_be_anchored(two_expert_model):
    """EP = number of experts: each rank's grouped module holds one expert, nothing can mix."""
    layer = two_expert_model.decoder.layers[0]
    experts = _grouped_mlp(layer.mlp, 1)
    layer.mlp.experts.single = experts
    freezing._refuse_grouped_experts(two_expert_model, 1)  # no refusal for a single local expert


@pytest.mark.te
@pytest.mark.skipif(not (torch.cuda.is_available() and transformer_engine_available()),
                    reason="needs CUDA and transformer-engine (install the 'te' extra in an NGC container)")
def test_te_grouped_mlp_with_mixed_requires_grad_is_refused(two_expert_model):
    """The same refusal with Megatron's real TE grouped linears (TEColumn/RowParallelGroupedLinear)."""
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelGroupedLinear,
        TERowParallelGroupedLinear,
    )

    model = two_expert_model
    for layer in model.decoder.layers:
        layer.mlp.experts = _grouped_mlp(layer.mlp, 2, TEColumnParallelGroupedLinear, TERowParallelGroupedLinear)
    with pytest.raises(ConfigError, match="grouped GEMM"):
        freezing.anchor(model, owner_expert=1)
    experts = model.decoder.layers[0].mlp.experts
    experts.requires_grad_(False)
    experts.linear_fc1.weight1.requires_grad_(True)
    with pytest.raises(ConfigError, match="mixed requires_grad"):
        freezing.check_grouped_experts(model)
