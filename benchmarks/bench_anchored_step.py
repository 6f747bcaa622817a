"""Anchored vs full training step time of the same 2-expert FlexOlmo model (same run).

Anchored training freezes everything but the owner's expert, router row and bias, so frozen weights
need no weight gradients (the issue's target: step time <= 0.82x of training all parameters; ~0.78x
is the theoretical floor).  Both variants use Megatron's real DDP and Adam on the same model and
batch; the median of timed steps after warm-up is reported.

    .venv/bin/python -m benchmarks.bench_anchored_step [--hidden 512] [--layers 4] [--seq 256] [--steps 10]
        [--markdown OUT] [--quick]

``--markdown`` writes its section of docs/benchmarks.md; ``--quick`` is a tiny smoke run (no verdict).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from benchmarks.report import load, load_note, write_section

TITLE = "## Anchored vs full training step (issue 4) — `benchmarks/bench_anchored_step.py`"
QUICK = dict(hidden=64, ffn=128, layers=1, heads=4, vocab=256, seq=32, batch=2, steps=2, warmup=1)


def measure(args, policy: str) -> list[float]:
    import torch
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    import flexolmo_plugin as fp
    from flexolmo_plugin.lifecycle import freezing

    config = fp.FlexOlmoConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                               num_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                               num_experts=2, top_k=2, max_position_embeddings=args.seq)
    torch.manual_seed(0)
    model = fp.build_model(config)
    model.train()
    (freezing.anchor(model, owner_expert=1) if policy == "anchored" else freezing.unfreeze_all(model))
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4, bf16=False), [ddp])
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        fp.next_token_loss(fp.logits(ddp, ids, grad=True), ids).backward()
        finalize_model_grads([ddp])
        optimizer.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for name, default in (("hidden", 512), ("ffn", 1408), ("layers", 4), ("heads", 8), ("vocab", 4096),
                          ("seq", 256), ("batch", 4), ("steps", 10), ("warmup", 2)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--markdown", type=Path, default=None, help="write this benchmark's section here")
    parser.add_argument("--quick", action="store_true", help="tiny model, two steps (a smoke test)")
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    import time

    import torch

    from flexolmo_plugin import compat
    from flexolmo_plugin.model.parallel import ensure_model_parallel

    compat.enable_cpu_compat(training=True)
    ensure_model_parallel()
    load_before = load()
    results = {}
    for policy in ("full", "anchored", "full", "anchored"):  # interleaved: drift affects both alike
        results.setdefault(policy, []).extend(measure(args, policy))
    full, anchored = statistics.median(results["full"]), statistics.median(results["anchored"])
    ratio = anchored / full
    lines = [TITLE, "", f"Conditions: {time.strftime('%Y-%m-%d')}, CPU, {torch.get_num_threads()} threads; "
             f"{load_note(load_before, load())}. Megatron DDP + Adam (fp32), a 2-expert FlexOlmo (hidden "
             f"{args.hidden}, FFN {args.ffn}, {args.layers} layers, vocab {args.vocab}), batch {args.batch} × "
             f"{args.seq} tokens; median of {len(results['full'])} steps per variant, variants interleaved in one run.",
             "", "| training | step time (median) | ratio |", "|---|---|---|",
             f"| all parameters | {1000 * full:.0f} ms | 1.00 |",
             f"| anchored (owner's expert and router row only) | {1000 * anchored:.0f} ms | {ratio:.2f} |", ""]
    if args.quick:
        lines.append("* Quick mode (a smoke test of the report on a tiny model): no verdict.")
    else:
        lines.append(
            f"* Target ≤ 0.82× (theoretical floor ≈ 0.78× at the 7B shape): **{'met' if ratio <= 0.82 else 'not met'}"
            f"** on CPU ({ratio:.2f}×). On GPU: see the GPU section."
        )
    write_section(args.markdown, lines)


if __name__ == "__main__":
    main()
