"""Anchored expert training on Megatron-Bridge's real pretrain() loop, from an upcycled checkpoint.

Anchoring is checked twice with the per-tensor anchor digests that expert packages carry: on the
trained model at the end of the run, and on the torch_dist checkpoint Bridge saved (read back with
the project's own checkpoint reader).  Resuming from that checkpoint must reproduce the run exactly.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from tests.support import run_distributed, upcycled_start

ITERS, SAVE_AT, SEQ = 6, 3, 32
TEXT = ["def add(a, b): return a + b", "for i in range(10): print(i)", "class Box: pass",
        "if x > 0: return x else: return -x", "import os, sys"]


def _overrides(init, prefix, save="null", **extra):
    args = {"init_from": init, "save_dir": save, "data_paths": f"[{prefix}]", "seq_length": SEQ,
            "train_iters": ITERS, "global_batch_size": 4, "micro_batch_size": 2, "lr": 0.01, "min_lr": 0.001,
            "lr_warmup_iters": 1, "save_interval": SAVE_AT, **extra}
    return [f"recipe.{k}={v}" for k, v in args.items()]


def _train(rank, world_size, init, prefix, expert_parallel, root=None):
    from flexolmo_plugin.compat import enable_bridge_compat

    enable_bridge_compat()  # before any megatron.bridge import
    from megatron.bridge.training.callbacks import Callback

    from flexolmo_plugin.conversion.slots import slots
    from flexolmo_plugin.lifecycle.anchor import anchor_hashes
    from flexolmo_plugin.lifecycle.evaluation import read_windows
    from flexolmo_plugin.model.build import logits, next_token_loss, unwrap
    from flexolmo_plugin.recipes.train import run

    windows = read_windows(prefix, seq_len=SEQ, max_tokens=SEQ * 8)
    seen = {}

    class Inspect(Callback):
        def _snapshot(self, model):
            model = unwrap(model)
            with torch.no_grad():
                loss = next_token_loss(logits(model, windows), windows).item()
            tensors = {}
            for slot in slots(model):
                tensors.setdefault(slot.canonical, []).append(slot.param.detach().clone())
            whole = {k: (torch.stack(v) if k.endswith("router.weight") else v[0]) for k, v in tensors.items()}
            return loss, whole

        def on_train_start(self, context):
            seen["loss_before"], seen["before"] = self._snapshot(context.model[0])

        def on_train_end(self, context):
            seen["loss_after"], after = self._snapshot(context.model[0])
            if expert_parallel == 1:
                config = unwrap(context.model[0]).flexolmo_config
                seen["anchor_equal"] = (anchor_hashes(config, seen["before"].__getitem__)
                                        == anchor_hashes(config, after.__getitem__))
                seen["owner_moved"] = [not torch.equal(seen["before"][n], after[n]) for n in after
                                       if ".mlp.experts.1." in n]
                seen["rows"] = (torch.equal(seen["before"]["decoder.layers.0.mlp.router.weight"][0],
                                            after["decoder.layers.0.mlp.router.weight"][0]),
                                torch.equal(seen["before"]["decoder.layers.0.mlp.router.weight"][1],
                                            after["decoder.layers.0.mlp.router.weight"][1]))
            seen.pop("before")

    save = f"{root}/full" if root else "null"
    log = run("expert", _overrides(init, prefix, save, expert_parallel=expert_parallel), callbacks=[Inspect()])
    out = {"losses": [h[1] for h in log.history], "shares": log.history[-1][3], **seen}
    if root:  # interrupted at SAVE_AT, then resumed from the checkpoint
        run("expert", _overrides(init, prefix, f"{root}/resumed") + [f"train.exit_interval={SAVE_AT}"])
        resumed = run("expert", _overrides(init, prefix, f"{root}/resumed", load_dir=f"{root}/resumed"))
        out["resumed"] = {h[0]: h[1] for h in resumed.history}
    return out


@pytest.fixture(scope="module")
def owner(tmp_path_factory, megatron_single_process):
    from flexolmo_plugin.lifecycle.data import prepare_dataset

    root = tmp_path_factory.mktemp("owner")
    tokenizer = upcycled_start(root, ("public", "code"))
    (root / "code.jsonl").write_text("".join(json.dumps({"text": TEXT[i % 5]}) + "\n" for i in range(120)))
    prepare_dataset(root / "code.jsonl", root / "code", tokenizer_dir=tokenizer)
    return root, run_distributed(_train, 1, str(root / "init"), str(root / "code"), 1, str(root))[0]


@pytest.mark.multiprocess
def test_anchored_bridge_training_moves_only_the_owners_expert(owner):
    _, result = owner
    assert result["anchor_equal"], "an anchor tensor (shared, public FFN or r_pub) changed"
    assert result["owner_moved"] and all(result["owner_moved"])
    assert result["rows"] == (True, False)  # r_pub frozen, r_code trained
    assert len(result["shares"]) == 2 and abs(sum(result["shares"]) - 1.0) < 1e-6  # top-2 of 2


@pytest.mark.multiprocess
def test_saved_checkpoint_keeps_the_anchor_and_shares_the_trained_expert(owner):
    from flexolmo_plugin.conversion.checkpoint_dir import check_is_checkpoint
    from flexolmo_plugin.conversion.mcore_io import CanonicalReader, load_config
    from flexolmo_plugin.lifecycle.anchor import anchor_hashes

    root, _ = owner
    config, _, _ = load_config(root / "init")
    saved = sorted((root / "full").glob("iter_*"))
    assert saved
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our training run's checkpoints carry checksums: verified, no warning
        for directory in saved:
            check_is_checkpoint(directory)
    init, final = CanonicalReader(root / "init"), CanonicalReader(root / "full" / f"iter_{ITERS:07d}")
    assert anchor_hashes(config, final.read) == anchor_hashes(config, init.read)
    for layer in range(config.num_layers):
        for tensor in ("linear_fc1.weight", "linear_fc2.weight"):
            name = f"decoder.layers.{layer}.mlp.experts.1.{tensor}"
            assert not torch.equal(init.read(name), final.read(name)), name
        rows = f"decoder.layers.{layer}.mlp.router.weight"
        assert not torch.equal(init.read(rows)[1], final.read(rows)[1])


@pytest.mark.multiprocess
def test_resume_reproduces_the_uninterrupted_run_exactly(owner):
    _, result = owner
    assert sorted(result["resumed"]) == [4, 5, 6]
    full = dict(enumerate(result["losses"], 1))
    assert all(result["resumed"][i] == full[i] for i in (4, 5, 6)), (result["resumed"], full)


@pytest.mark.multiprocess
def test_loss_on_the_owners_domain_decreased(owner):
    _, result = owner
    assert result["losses"][-1] < result["losses"][0]
    assert result["loss_after"] < result["loss_before"] - 0.1, (result["loss_before"], result["loss_after"])


@pytest.mark.multiprocess
def test_expert_parallel_training_matches_single_process(owner):
    root, result = owner
    ep2 = run_distributed(_train, 2, str(root / "init"), str(root / "code"), 2)
    for rank in (0, 1):
        got = ep2[rank]["losses"]
        assert len(got) == ITERS
        assert max(abs(a - b) for a, b in zip(got, result["losses"])) <= 1e-6, (got, result["losses"])
