"""FlexOlmo's metrics reach TensorBoard through Bridge's writer, reduced over every data-parallel rank.

One tiny ``expert`` recipe run on two gloo ranks (data parallelism 2), routed top-1 of 2 so that the
routed shares carry information; the event file that Bridge's writer (on the last rank) wrote under
``<save_dir>/tb_logs`` is read back with TensorBoard's ``EventAccumulator``.
"""

from __future__ import annotations

import json
import math

import pytest

from tests.support import run_distributed, upcycled_start

ITERS, SEQ, PEAK = 3, 32, 1e9
TEXT = ["def add(a, b): return a + b", "the quick brown fox jumps over the lazy dog", "class Box: pass",
        "lorem ipsum dolor sit amet", "numbers 0 1 2 3 4 5 6 7 8 9", "for i in range(10): print(i)"]
EXPERTS = ("public", "code")


def _train(rank, world_size, init, prefix, save):
    from flexolmo_plugin.compat import enable_bridge_compat

    enable_bridge_compat()
    from flexolmo_plugin.recipes import flops
    from flexolmo_plugin.recipes.train import run

    flops.peak_flops = lambda *args, **kwargs: PEAK  # a tabulated peak, so that MFU is logged on CPU
    args = {"init_from": init, "save_dir": save, "data_paths": f"[{prefix}]", "seq_length": SEQ,
            "train_iters": ITERS, "global_batch_size": 4, "micro_batch_size": 2, "lr": 0.01, "min_lr": 0.001,
            "lr_warmup_iters": 1, "save_interval": 1000}
    log = run("expert", [f"recipe.{k}={v}" for k, v in args.items()] + ["model.moe_router_topk=1"])
    return {"history": log.history, "gates": log.gate_weights, "local": log.local, "throughput": log.throughput}


@pytest.fixture(scope="module")
def logged(tmp_path_factory, megatron_single_process):
    from flexolmo_plugin.lifecycle.data import prepare_dataset

    root = tmp_path_factory.mktemp("tb")
    tokenizer = upcycled_start(root, EXPERTS)
    (root / "code.jsonl").write_text("".join(json.dumps({"text": TEXT[i % 6] * (1 + i % 3)}) + "\n"
                                             for i in range(120)))
    prepare_dataset(root / "code.jsonl", root / "code", tokenizer_dir=tokenizer)
    ranks = run_distributed(_train, 2, str(root / "init"), str(root / "code"), str(root / "run"))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root / "run" / "tb_logs"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    return ranks, scalars


@pytest.mark.multiprocess
def test_routing_and_throughput_scalars_are_in_the_event_file(logged):
    _, scalars = logged
    steps = list(range(1, ITERS + 1))
    for kind in ("routed-share", "gate-weight"):
        for name in EXPERTS:
            assert sorted(scalars[f"flexolmo/{kind}/{name}"]) == steps, (kind, name, sorted(scalars))
    for step in steps:
        shares = [scalars[f"flexolmo/routed-share/{n}"][step] for n in EXPERTS]
        gates = [scalars[f"flexolmo/gate-weight/{n}"][step] for n in EXPERTS]
        # shares: fraction of the routed (token, expert) slots, so they sum to 1; top-1 of 2 -> each token's
        # one selected probability is the larger of two, so the mean gate weights sum to between 1/2 and 1
        assert all(0.0 <= s <= 1.0 for s in shares) and abs(sum(shares) - 1.0) < 1e-6, shares
        assert all(0.0 <= g <= 1.0 for g in gates) and 0.5 - 1e-6 <= sum(gates) <= 1.0 + 1e-6, gates
        tflops, mfu = scalars["flexolmo/tflops-per-gpu"][step], scalars["flexolmo/mfu"][step]
        assert tflops > 0 and math.isclose(mfu, tflops * 1e12 / PEAK, rel_tol=1e-5), (tflops, mfu)
    z_loss = scalars["z_loss"]  # Megatron's MoE tracker, written by Bridge's training_log (z-loss coeff 1e-3)
    assert sorted(z_loss) == steps and all(math.isfinite(v) and v > 0 for v in z_loss.values()), z_loss
    assert "lm loss" in scalars  # Bridge's own scalars share the event file


@pytest.mark.multiprocess
def test_logged_routing_is_the_mean_over_both_data_parallel_ranks(logged):
    ranks, scalars = logged
    differ = False
    for i, step in enumerate(range(1, ITERS + 1)):
        (_, shares0, gates0), (_, shares1, gates1) = ranks[0]["local"][i], ranks[1]["local"][i]
        differ |= max(abs(a - b) for a, b in zip(gates0 + shares0, gates1 + shares1)) > 1e-4
        # equal token counts on both ranks (one micro-batch of 2 x SEQ each): the world value is the mean
        for e, name in enumerate(EXPERTS):
            expected_share = (shares0[e] + shares1[e]) / 2
            expected_gate = (gates0[e] + gates1[e]) / 2
            assert abs(scalars[f"flexolmo/routed-share/{name}"][step] - expected_share) < 1e-6
            assert abs(scalars[f"flexolmo/gate-weight/{name}"][step] - expected_gate) < 1e-6
            for rank in (0, 1):  # every rank's log (stdout on rank 0, FLOP count) holds the world value
                assert abs(ranks[rank]["history"][i][3][e] - expected_share) < 1e-9
                assert abs(ranks[rank]["gates"][i][1][e] - expected_gate) < 1e-9
    assert differ, ("both ranks saw the same routing: the test cannot tell a reduction from rank 0's value",
                    ranks[0]["local"], ranks[1]["local"])
