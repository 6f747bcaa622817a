"""Converted checkpoints at TP=2 / EP=2 / TP2xEP2: HF logits, re-save, reshard and export (gloo)."""

import pytest
import torch

from flexolmo_plugin.conversion.convert import hf_to_mcore, mcore_to_hf
from tests.support import hf_reference, make_hf_model, run_distributed, save_hf_model

pytestmark = pytest.mark.multiprocess


def _worker(rank, world_size, mcore_dir, resave_dir, ids, layout):
    import flexolmo_plugin as fp

    model = fp.from_mcore(mcore_dir, layout=fp.ParallelLayout(**layout))
    logits = fp.logits(model, ids)
    fp.save_mcore(model, resave_dir)
    return {"logits": logits, "local_experts": list(model.decoder.layers[0].mlp.local_expert_indices)}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, megatron_single_process):
    root = tmp_path_factory.mktemp("conv")
    hf = make_hf_model(seed=9, num_experts=4, num_experts_per_tok=2)
    src = save_hf_model(hf, root / "hf")
    hf_to_mcore(src, root / "mcore")
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(4))
    logits, _ = hf_reference(hf, ids)
    return root, src, ids, logits


def _plain(directory):
    from megatron.core import dist_checkpointing

    return {k: v for k, v in dist_checkpointing.load_plain_tensors(str(directory)).items()
            if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("layout,world_size", [
    (dict(tensor_parallel=2), 2),
    (dict(expert_parallel=2), 2),
    (dict(tensor_parallel=2, expert_parallel=2, expert_tensor_parallel=1), 4),
], ids=["tp2", "ep2", "tp2xep2"])
def test_load_resave_and_export_at_parallel_layouts(converted, layout, world_size, megatron_single_process):
    root, src, ids, ref_logits = converted
    name = "_".join(f"{k}{v}" for k, v in layout.items())
    resaved = root / f"resaved_{name}"
    results = run_distributed(_worker, world_size, str(root / "mcore"), str(resaved), ids, layout)
    for rank, result in results.items():
        delta = (result["logits"] - ref_logits).abs().max().item()
        assert delta <= 1e-5, f"rank {rank}: max |Δlogit| {delta:.3e}"
    assert set().union(*(r["local_experts"] for r in results.values())) == {0, 1, 2, 3}

    # Resharding is lossless: the checkpoint saved at this layout holds exactly the same tensors.
    original, again = _plain(root / "mcore"), _plain(resaved)
    assert sorted(original) == sorted(again)
    for key in original:
        assert torch.equal(original[key], again[key]), key

    # ... and exports to HF with every expert, bitwise equal to the source.
    from safetensors.torch import load_file

    mcore_to_hf(resaved, root / f"hf_{name}")
    before, after = load_file(src / "model.safetensors"), load_file(root / f"hf_{name}" / "model.safetensors")
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
