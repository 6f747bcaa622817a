"""The dense mixture path (top-k = E: every expert on every token) computes what the dispatcher path computes.

Compared on one model by switching its path (same weights): logits, the training loss with the router
z-loss and the load-balancing loss on, and every parameter's gradient under anchoring (only expert 1's
FFN and router row train), single-process and at EP=2 and TP=2 (gloo, different tokens on the
expert-parallel ranks); logits also against transformers' ``FlexOlmoForCausalLM``.
"""

from pathlib import Path

import pytest
import torch

import flexolmo_plugin as fp
from flexolmo_plugin.errors import ConfigError
from flexolmo_plugin.model.config import FlexOlmoConfig, to_transformer_config
from flexolmo_plugin.model.dense_mixture import describe_expert_path, moe_layers, set_expert_path
from tests.support import hf_reference, make_hf_model, next_token_loss, run_distributed, save_hf_model

HF_LOGIT_TOL = 1e-5  # as tests/flexolmo_plugin/test_parity.py
PATH_TOL = 1e-6  # dense vs dispatcher, fp32 (measured: identical on this machine)
AUX = dict(router_z_loss_coeff=1e-2, load_balancing_coeff=1e-1)  # both losses on: their gradients must agree


def _anchored_step(model, ids):
    """Logits, loss and every parameter's gradient (None for frozen ones) of one training step."""
    model.zero_grad(set_to_none=True)
    logits = fp.logits(model, ids, grad=True)
    next_token_loss(logits, ids).backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    return logits.detach(), grads


def _compare(dense, dispatched) -> dict[str, float]:
    """Max |Δ| of logits and of every gradient, relative to the dispatcher's scale; inf where only one has one."""
    (logits_a, grads_a), (logits_b, grads_b) = dense, dispatched
    errors = {"logits": (logits_a - logits_b).abs().max().item()}
    for name, a in grads_a.items():
        b = grads_b[name]
        if a is None or b is None:
            errors[name] = 0.0 if a is None and b is None else float("inf")
        else:
            errors[name] = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
    return errors


def _anchor(model):
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    from flexolmo_plugin.lifecycle import freezing

    # Megatron's process-wide aux-loss tracker sizes its entries by the first model's layer count (training
    # loops clear it every step): a model with more layers than an earlier test's would overflow it, so start afresh.
    destroy_moe_metrics_tracker()
    freezing.anchor(model, owner_expert=1)
    model.train()  # the z-loss and load-balancing loss apply in training only


@pytest.mark.parametrize("experts", [2, 5])
def test_dense_equals_dispatcher_and_transformers(experts, tmp_path, megatron_single_process):
    hf = make_hf_model(seed=experts, num_experts=experts, num_experts_per_tok=experts)
    model = fp.from_hf(save_hf_model(hf, tmp_path / "hf"), **AUX)
    assert [layer.expert_path for layer in moe_layers(model)] == ["dense", "dense"]  # chosen automatically
    ids = torch.randint(2, 100, (2, 11), generator=torch.Generator().manual_seed(experts))
    ref, _ = hf_reference(hf, ids)
    assert (fp.logits(model, ids) - ref).abs().max().item() <= HF_LOGIT_TOL

    _anchor(model)
    dense = _anchored_step(model, ids)
    set_expert_path(model, "dispatcher")
    dispatched = _anchored_step(model, ids)
    errors = _compare(dense, dispatched)
    assert not {k: v for k, v in errors.items() if not v <= PATH_TOL}, errors
    trained = {n for n, g in dense[1].items() if g is not None}
    assert trained and all(".1." in n or n.endswith(".1") for n in trained)  # expert 1's FFN and router row
    assert any("router" in n for n in trained) and any("experts" in n for n in trained)


def test_path_selection(tmp_path, megatron_single_process):
    config = FlexOlmoConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, num_experts=3, top_k=2)
    sparse = fp.build_model(config)
    assert [layer.expert_path for layer in moe_layers(sparse)] == ["dispatcher"]  # top-k < E keeps dispatch
    with pytest.raises(ConfigError, match=r"top-k \(2\) < number of experts \(3\)"):
        set_expert_path(sparse, "dense")
    with pytest.raises(ConfigError, match="expert_path='dense' is not valid"):
        fp.flexolmo_block_spec(to_transformer_config(config), expert_path="dense")
    full = config.replace(top_k=3)
    assert "dense mixture" in describe_expert_path(to_transformer_config(full))
    assert "token dispatcher 'alltoall'" in describe_expert_path(to_transformer_config(config))
    capacity = to_transformer_config(full, moe_expert_capacity_factor=1.0, moe_token_dispatcher_type="alltoall")
    assert "token dispatcher" in describe_expert_path(capacity)  # token dropping needs the dispatcher


def test_runtime_opt_out_on_the_dense_path(tmp_path, megatron_single_process):
    """Without dispatch a run-time mask may leave fewer than top-k experts (the all-to-all dispatcher cannot)."""
    hf_dir = save_hf_model(make_hf_model(seed=4, num_experts=3, num_experts_per_tok=3), tmp_path / "hf")
    ids = torch.randint(2, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    dense = fp.from_hf(hf_dir)
    routers = [layer.router for layer in moe_layers(dense)]
    for router in routers:
        router.set_excluded_experts([1])
    with pytest.raises(ConfigError, match="dispatcher routes exactly top-k"):
        set_expert_path(dense, "dispatcher")
    assert [layer.expert_path for layer in moe_layers(dense)] == ["dense", "dense"]  # refused: nothing changed
    reference = fp.from_hf(hf_dir, dispatcher="allgather")
    set_expert_path(reference, "dispatcher")
    for layer in moe_layers(reference):
        layer.router.set_excluded_experts([1])
    delta = (fp.logits(dense, ids) - fp.logits(reference, ids)).abs().max().item()
    assert delta <= PATH_TOL
    for router in routers:
        router.set_excluded_experts(None)
    assert (fp.logits(dense, ids) - fp.logits(reference, ids)).abs().max().item() > 1e-3  # the mask mattered


# ---------------------------------------------------------------------- EP=2 and TP=2 (gloo)
def _parallel_worker(rank, world_size, hf_dir, ep_ids, tp_ids):
    from megatron.core import parallel_state as ps

    results = {}
    for name, layout, ids in (("ep2", fp.ParallelLayout(expert_parallel=2), ep_ids[rank]),
                              ("tp2", fp.ParallelLayout(tensor_parallel=2, sequence_parallel=True), tp_ids)):
        model = fp.from_hf(hf_dir, layout=layout, **AUX)
        assert [layer.expert_path for layer in moe_layers(model)] == ["dense", "dense"]
        _anchor(model)
        dense = _anchored_step(model, ids)
        set_expert_path(model, "dispatcher")
        dispatched = _anchored_step(model, ids)
        results[name] = dict(errors=_compare(dense, dispatched), logits=dense[0],
                             local_experts=list(moe_layers(model)[0].local_expert_indices))
        if name == "ep2":
            # Router rows frozen too: rank 0's output then depends on nothing trainable, yet its peer's
            # backward needs it in the collective -- the expert's gradient must not change (nor hang).
            set_expert_path(model, "dense")
            for layer in moe_layers(model):
                for row in layer.router.domain_embeddings:
                    row.requires_grad_(False)
            frozen_router = _anchored_step(model, ids)[1]
            experts = {n: g for n, g in frozen_router.items() if "experts" in n}
            results[name]["frozen_router"] = max(
                ((g - dense[1][n]).abs().max().item() if g is not None else (0.0 if dense[1][n] is None
                                                                             else float("inf")))
                for n, g in experts.items())
        ps.destroy_model_parallel()
    return results


@pytest.mark.multiprocess
def test_dense_equals_dispatcher_at_ep2_and_tp2(tmp_path):
    hf = make_hf_model(seed=9, num_experts=2, num_experts_per_tok=2, num_attention_heads=4)
    hf_dir = str(save_hf_model(hf, Path(tmp_path) / "hf"))
    generator = torch.Generator().manual_seed(5)
    ep_ids = [torch.randint(2, 100, (2, 8), generator=generator) for _ in range(2)]  # different tokens per rank
    tp_ids = torch.randint(2, 100, (2, 8), generator=generator)
    results = run_distributed(_parallel_worker, 2, hf_dir, ep_ids, tp_ids)
    for rank, by_layout in results.items():
        for name, result in by_layout.items():
            bad = {k: v for k, v in result["errors"].items() if not v <= PATH_TOL}
            assert not bad, f"rank {rank} {name}: dense differs from the dispatcher: {bad}"
            ids = ep_ids[rank] if name == "ep2" else tp_ids
            delta = (result["logits"] - hf_reference(hf, ids)[0]).abs().max().item()
            assert delta <= HF_LOGIT_TOL, f"rank {rank} {name}: max |Δlogit| vs transformers = {delta:.2e}"
        assert by_layout["ep2"]["local_experts"] == [rank]
        assert by_layout["ep2"]["frozen_router"] <= PATH_TOL
