"""DomainEmbeddingRouter semantics, checked against plain-torch references of the paper's router."""

import pytest
import torch

from flexolmo_plugin.model.config import (
    FlexOlmoConfig,
    ParallelLayout,
    to_transformer_config,
)
from flexolmo_plugin.model.router import DomainEmbeddingRouter

H = 24


def make_router(num_experts=4, top_k=2, *, domain_bias=False, seed=0, **overrides):
    from megatron.core.process_groups_config import ProcessGroupCollection

    config = FlexOlmoConfig(vocab_size=64, hidden_size=H, intermediate_size=32, num_layers=1,
                            num_attention_heads=4, num_key_value_heads=4, num_experts=num_experts, top_k=top_k)
    tc = to_transformer_config(config, ParallelLayout(), **overrides)
    torch.manual_seed(seed)
    router = DomainEmbeddingRouter(tc, pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
                                   domain_bias=domain_bias)
    router.set_layer_number(1)
    with torch.no_grad():
        for row in router.domain_embeddings:
            row.normal_(0.0, 0.5)
    return router


def hidden(seed=1, tokens=10):
    return torch.randn(tokens, 2, H, generator=torch.Generator().manual_seed(seed))


def reference_probs(h, weight, top_k):
    """Paper / HF: softmax over all experts in fp32, top-k, no renormalisation; dense [tokens, E]."""
    probs = torch.softmax(h.reshape(-1, H).double() @ weight.double().t(), dim=-1)
    values, index = probs.topk(top_k, dim=-1)
    return torch.zeros_like(probs).scatter(1, index, values)


@pytest.fixture(autouse=True)
def _groups(megatron_single_process):
    yield


@pytest.mark.parametrize("num_experts,top_k", [(2, 1), (4, 2), (5, 5), (8, 3)])
def test_probabilities_are_softmax_over_all_experts_without_renormalisation(num_experts, top_k):
    router = make_router(num_experts, top_k)
    h = hidden()
    probs, routing_map = router(h)
    ref = reference_probs(h, router.router_matrix().detach(), top_k)
    torch.testing.assert_close(probs.double(), ref, rtol=1e-5, atol=1e-7)
    assert torch.equal(routing_map, ref > 0)
    assert (routing_map.sum(-1) == top_k).all()
    if top_k < num_experts:
        # renormalised weights would sum to exactly 1 for every token
        assert (probs.sum(-1) < 1 - 1e-3).any(), "selected weights must not be renormalised to 1"


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_masked_experts_are_never_chosen_and_equal_physical_removal(top_k):
    router = make_router(4, top_k, moe_token_dispatcher_type="allgather")
    h = hidden(tokens=32)
    router.set_excluded_experts([1, 3])
    probs, routing_map = router(h)
    assert not routing_map[:, [1, 3]].any()
    assert (probs[:, [1, 3]] == 0).all()
    assert (routing_map.sum(-1) == min(top_k, 2)).all()
    # Physically removing experts 1 and 3 (and their rows) gives the same routing weights.
    kept = router.router_matrix().detach()[[0, 2]]
    torch.testing.assert_close(probs[:, [0, 2]].double(), reference_probs(h, kept, min(top_k, 2)),
                               rtol=1e-5, atol=1e-7)
    router.set_excluded_experts(None)
    _, routing_map = router(h)
    assert routing_map[:, [1, 3]].any(), "clearing the mask restores the experts"


def test_fixed_count_dispatcher_refuses_leaving_fewer_than_top_k_experts():
    router = make_router(4, 3)  # alltoall: exactly top-k selections per token
    router.set_excluded_experts([3])  # 3 remain: fine
    with pytest.raises(ValueError, match="dispatcher='allgather'"):
        router.set_excluded_experts([2, 3])


def test_excluding_invalid_experts_is_refused():
    router = make_router(3, 1)
    with pytest.raises(ValueError, match="out of range"):
        router.set_excluded_experts([3])
    with pytest.raises(ValueError, match="every expert"):
        router.set_excluded_experts([0, 1, 2])


def test_domain_bias_is_clamped_to_non_positive_and_absent_on_public_expert():
    router = make_router(3, 3, domain_bias=True)
    assert len(router.domain_biases) == 2  # experts 1 and 2 only
    h = hidden()
    plain = router.gating(h).detach()
    with torch.no_grad():
        router.domain_biases[0].fill_(2.0)   # expert 1: positive, clamped to 0
        router.domain_biases[1].fill_(-1.5)  # expert 2: negative, applied
    logits = router.gating(h)
    torch.testing.assert_close(logits.detach() - plain, torch.tensor([0.0, 0.0, -1.5]).expand_as(plain))
    logits.sum().backward()
    assert router.domain_biases[0].grad.item() == 0.0, "a clamped (positive) bias gets no gradient"
    assert router.domain_biases[1].grad.item() != 0.0


def test_each_row_gradient_reaches_only_its_own_parameter():
    router = make_router(4, 2)
    router.domain_embeddings[0].requires_grad_(False)  # the frozen public row
    reference_weight = router.router_matrix().detach().clone().requires_grad_(True)
    h = hidden()
    upstream = torch.randn(h.shape[0] * h.shape[1], 4, generator=torch.Generator().manual_seed(5))
    probs, _ = router(h)
    (probs * upstream).sum().backward()
    ref_probs = torch.softmax(h.reshape(-1, H) @ reference_weight.t(), dim=-1)
    ref_map = reference_probs(h, reference_weight.detach(), 2) > 0
    (ref_probs * ref_map * upstream).sum().backward()
    assert router.domain_embeddings[0].grad is None
    assert reference_weight.grad[0].abs().max() > 0, "the frozen row would have had a gradient"
    for e in range(1, 4):
        torch.testing.assert_close(router.domain_embeddings[e].grad, reference_weight.grad[e], rtol=1e-5, atol=1e-7)


def test_router_z_loss_adds_its_gradient():
    coeff = 0.1
    router = make_router(3, 2, moe_z_loss_coeff=coeff)
    router.train()
    h = hidden()
    probs, _ = router(h)
    probs.sum().backward()
    weight = router.router_matrix().detach().clone().requires_grad_(True)
    logits = h.reshape(-1, H) @ weight.t()
    ref_map = reference_probs(h, weight.detach(), 2) > 0
    z_loss = torch.logsumexp(logits, dim=-1).square().mean()
    ((torch.softmax(logits, dim=-1) * ref_map).sum() + coeff * z_loss).backward()
    for e in range(3):
        torch.testing.assert_close(router.domain_embeddings[e].grad, weight.grad[e], rtol=1e-4, atol=1e-6)


def test_each_router_row_and_bias_is_its_own_checkpoint_key():
    """Frozen (public) and trained (owner) rows must never share a key: the optimizer state of a
    partly frozen key would have holes, which Megatron's checkpoint integrity check rejects."""
    router = make_router(4, 2, domain_bias=True)
    sharded = router.sharded_state_dict(prefix="decoder.layers.0.mlp.router.")
    rows = {e: sharded[f"decoder.layers.0.mlp.router.domain_embeddings.{e}"] for e in range(4)}
    assert {e: t.key for e, t in rows.items()} == {e: f"decoder.layers.0.mlp.router.domain_embeddings.{e}"
                                                   for e in range(4)}
    assert all(t.global_shape == (H,) and t.data is router.domain_embeddings[e] for e, t in rows.items())
    biases = [sharded[f"decoder.layers.0.mlp.router.domain_biases.{j}"] for j in range(3)]
    assert all(t.global_shape == (1,) for t in biases)


@pytest.mark.parametrize("override,message", [
    (dict(moe_router_pre_softmax=False), "pre_softmax"),
    (dict(moe_router_topk_scaling_factor=2.0), "scaling_factor"),
    (dict(moe_router_load_balancing_type="sinkhorn"), "load_balancing_type"),
])
def test_non_flexolmo_router_settings_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        make_router(4, 2, **override)
