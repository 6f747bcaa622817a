"""The same logits and gradients at TP=2, EP=2 and TP2xEP2 as transformers (multi-process gloo).

Logits are checked in the inference configuration (no sequence parallelism); gradients in the
training configuration, where Megatron requires sequence parallelism whenever MoE runs with TP>1.
"""

import pytest
import torch

from tests.support import (
    canonical_reference,
    hf_reference,
    make_hf_model,
    next_token_loss,
    run_distributed,
    save_hf_model,
    slot_errors,
)

pytestmark = pytest.mark.multiprocess

LOGIT_TOL = 1e-5
GRAD_REL_TOL = 1e-4


def _finalized_grads(model, ids):
    """Backward through Megatron's real DDP wrapper and grad finalisation (DP/expert-DP averaging,
    sequence-parallel weight reduction), as in training.  Every rank gets the same batch, so the
    averaged gradients must equal the single-model reference."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    import flexolmo_plugin as fp
    from flexolmo_plugin import compat

    compat.enable_cpu_compat(training=True)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    logits = fp.logits(ddp, ids, grad=True)
    next_token_loss(logits, ids).backward()
    finalize_model_grads([ddp])
    return logits.detach()


def _worker(rank, world_size, hf_dir, ids, layout, grad_reference):
    from megatron.core import parallel_state as ps

    import flexolmo_plugin as fp

    model = fp.from_hf(hf_dir, layout=fp.ParallelLayout(**layout))
    assert ps.get_tensor_model_parallel_world_size() == layout.get("tensor_parallel", 1)
    assert ps.get_expert_model_parallel_world_size() == layout.get("expert_parallel", 1)
    inference_logits = fp.logits(model, ids)
    local_experts = list(model.decoder.layers[0].mlp.local_expert_indices)

    if layout.get("tensor_parallel", 1) > 1:  # training needs sequence parallelism with MoE + TP
        ps.destroy_model_parallel()
        model = fp.from_hf(hf_dir, layout=fp.ParallelLayout(**layout, sequence_parallel=True))
    train_logits = _finalized_grads(model, ids)
    return {"logits": inference_logits, "train_logits": train_logits,
            "grad_errors": slot_errors(model, grad_reference, grads=True), "local_experts": local_experts}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from flexolmo_plugin.model.config import FlexOlmoConfig

    hf = make_hf_model(seed=7, num_experts=4, num_experts_per_tok=2)
    hf_dir = save_hf_model(hf, tmp_path_factory.mktemp("hf") / "model")
    # ids >= 2 avoid the pad token (1), whose embedding row HF never gives a gradient
    # (see test_parity.test_every_gradient_matches_transformers)
    ids = torch.randint(2, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    logits, _ = hf_reference(hf, ids)
    hf.zero_grad()
    hf(ids, labels=ids).loss.backward()
    grads = canonical_reference(hf, FlexOlmoConfig.from_hf(hf.config), grads=True)
    return str(hf_dir), ids, logits, grads


@pytest.mark.parametrize("layout,world_size", [
    (dict(tensor_parallel=2), 2),
    (dict(expert_parallel=2), 2),
    (dict(tensor_parallel=2, expert_parallel=2, expert_tensor_parallel=1), 4),
], ids=["tp2", "ep2", "tp2xep2"])
def test_parallel_layout_matches_transformers(reference, layout, world_size):
    hf_dir, ids, ref_logits, grads = reference
    results = run_distributed(_worker, world_size, hf_dir, ids, layout, grads)
    experts_seen = set()
    for rank, result in results.items():
        for key in ("logits", "train_logits"):
            delta = (result[key] - ref_logits).abs().max().item()
            assert delta <= LOGIT_TOL, f"rank {rank} {key}: max |Δlogit| = {delta:.3e}"
        bad = {k: v for k, v in result["grad_errors"].items() if not v <= GRAD_REL_TOL}
        assert not bad, f"rank {rank}: gradients differ from transformers: {bad}"
        experts_seen.update(result["local_experts"])
    assert experts_seen == {0, 1, 2, 3}
    if layout.get("expert_parallel", 1) > 1:
        assert all(len(r["local_experts"]) == 2 for r in results.values())
