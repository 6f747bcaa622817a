"""Router tuning of a merged model on Megatron-Bridge: only router rows (r_pub included) move."""

from __future__ import annotations

import pytest
import torch

from tests.support import run_distributed

SEQ = 32


def _tune(rank, world_size, merged, prefix):
    from flexolmo_plugin.compat import enable_bridge_compat

    enable_bridge_compat()
    from megatron.bridge.training.callbacks import Callback

    from flexolmo_plugin.model.build import unwrap
    from flexolmo_plugin.model.dense_mixture import moe_layers
    from flexolmo_plugin.recipes.train import run

    snapshots = {}

    class Inspect(Callback):
        def _state(self, model):
            return {n: p.detach().clone() for n, p in unwrap(model).named_parameters()}

        def on_train_start(self, context):
            snapshots["before"] = self._state(context.model[0])
            snapshots["requires_grad"] = {n: p.requires_grad for n, p in unwrap(context.model[0]).named_parameters()}
            snapshots["top_k"] = unwrap(context.model[0]).flexolmo_config.top_k
            snapshots["paths"] = {layer.expert_path for layer in moe_layers(context.model[0])}

        def on_train_end(self, context):
            after = self._state(context.model[0])
            snapshots["moved"] = sorted(n for n, t in after.items() if not torch.equal(t, snapshots["before"][n]))
            snapshots.pop("before")

    args = {"init_from": merged, "save_dir": "null", "data_paths": f"[{prefix}]", "seq_length": SEQ,
            "train_iters": 4, "global_batch_size": 4, "micro_batch_size": 2, "lr": 0.05, "lr_warmup_iters": 1}
    log = run("router-tune", [f"recipe.{k}={v}" for k, v in args.items()], callbacks=[Inspect()])
    return {**snapshots, "shares": log.history[-1][3], "losses": [h[1] for h in log.history],
            "gates": log.gate_weights[-1][1]}


@pytest.mark.multiprocess
def test_router_tuning_trains_only_router_rows_with_every_expert_active(world, tmp_path):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    root, anchor, owners, packages, merged = world
    builder = IndexedDatasetBuilder(str(tmp_path / "proxy.bin"), dtype=np.uint16)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        builder.add_item(torch.randint(3, 100, (33,), generator=generator))
        builder.end_document()
    builder.finalize(str(tmp_path / "proxy.idx"))
    result = run_distributed(_tune, 1, str(merged), str(tmp_path / "proxy"), timeout=240)[0]
    assert result["top_k"] == 4  # all experts active
    assert result["paths"] == {"dense"}  # ... so the provider's default "auto" builds the dense mixture path
    trainable = sorted(n for n, g in result["requires_grad"].items() if g)
    assert trainable and all(".mlp.router.domain_embeddings." in n for n in trainable)
    assert result["moved"] and set(result["moved"]) <= set(trainable)
    assert any(n.endswith("domain_embeddings.0") for n in result["moved"]), "r_pub is tuned too (paper §3.3.3)"
    assert len(result["shares"]) == 4
    # every expert active: each token's softmax over all experts sums to 1, so the mean gate weights do too
    assert len(result["gates"]) == 4 and abs(sum(result["gates"]) - 1.0) < 1e-6
