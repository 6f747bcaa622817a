"""Anchoring with Megatron's real DDP and optimizer: frozen tensors cannot move, the owner's expert does."""

import pytest
import torch

from tests.support import make_hf_model, run_distributed, save_hf_model

STEPS = 6


def _train(rank, world_size, hf_dir, policy, weight_decay):
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    import flexolmo_plugin as fp
    from flexolmo_plugin import compat
    from flexolmo_plugin.lifecycle import freezing as anchoring

    compat.enable_cpu_compat(training=True)
    model = fp.from_hf(hf_dir)
    model.train()
    trainable = anchoring.anchor(model, owner_expert=1) if policy == "anchor" else anchoring.router_only(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=3e-2, weight_decay=weight_decay, clip_grad=1.0, bf16=False), [ddp])
    in_optimizer = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    # the owner's "domain": a repetitive token pattern the public model has never seen
    ids = torch.arange(24).remainder(7).add(10).repeat(4, 1)
    losses = []
    for _ in range(STEPS):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss = fp.next_token_loss(fp.logits(ddp, ids, grad=True), ids)
        loss.backward()
        finalize_model_grads([ddp])
        optimizer.step()
        losses.append(loss.item())
    changed = {n: not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters()}
    return {"losses": losses, "changed": changed, "trainable": trainable, "in_optimizer": in_optimizer,
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()}}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    # a 2-expert [public, owner] model, as after upcycling
    return str(save_hf_model(make_hf_model(seed=8, num_experts=2, num_experts_per_tok=2),
                             tmp_path_factory.mktemp("anchor") / "hf"))


@pytest.mark.multiprocess
def test_anchored_training_moves_only_the_owners_expert(hf_dir):
    result = run_distributed(_train, 1, hf_dir, "anchor", 0.1)[0]
    changed, requires_grad = result["changed"], result["requires_grad"]
    owner = [n for n in changed if ".local_experts.1." in n or n.endswith("router.domain_embeddings.1")]
    frozen = [n for n in changed if n not in owner]
    assert len(owner) == 2 * 3  # 2 layers x (fc1, fc2, router row)
    assert all(requires_grad[n] for n in owner) and not any(requires_grad[n] for n in frozen)
    assert all(changed[n] for n in owner), "the owner's FFN and router row must learn"
    unexpected = [n for n in frozen if changed[n]]
    assert not unexpected, f"frozen tensors moved (weight decay 0.1 was on): {unexpected}"
    assert any("local_experts.0" in n for n in frozen) and any(n.endswith("domain_embeddings.0") for n in frozen)
    assert result["in_optimizer"] == result["trainable"].trainable_parameters
    assert result["losses"][-1] < result["losses"][0]


@pytest.mark.multiprocess
def test_router_tuning_moves_only_router_rows(hf_dir):
    result = run_distributed(_train, 1, hf_dir, "router", 0.0)[0]
    moved = sorted(n for n, c in result["changed"].items() if c)
    assert moved and all(".mlp.router.domain_embeddings." in n for n in moved), moved
    assert result["losses"][-1] < result["losses"][0]


def test_anchor_digest_sees_the_anchor_and_only_the_anchor(tmp_path, megatron_single_process):
    import flexolmo_plugin as fp
    from flexolmo_plugin.lifecycle.anchor import anchor_digest

    model = fp.from_hf(save_hf_model(make_hf_model(seed=8, num_experts=2), tmp_path / "hf"))
    digest = anchor_digest(model)
    layer = model.decoder.layers[0]
    with torch.no_grad():
        layer.mlp.experts.local_experts[1].linear_fc1.weight.add_(1.0)  # the owner's expert: not anchor
        layer.mlp.router.domain_embeddings[1].add_(1.0)
    assert anchor_digest(model) == digest
    with torch.no_grad():
        layer.mlp.router.domain_embeddings[0].add_(1e-3)  # r_pub is part of the anchor
    assert anchor_digest(model) != digest


def test_public_expert_cannot_be_the_owner(tmp_path, megatron_single_process):
    import flexolmo_plugin as fp
    from flexolmo_plugin.lifecycle.freezing import anchor

    model = fp.from_hf(save_hf_model(make_hf_model(seed=8, num_experts=2), tmp_path / "hf"))
    with pytest.raises(ValueError, match="non-public expert"):
        anchor(model, owner_expert=0)
