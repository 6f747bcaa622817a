"""P1: FlexOlmo's MoE layer vs Megatron's stock MoE layer, forward + backward, same shapes, same run.

Both are Megatron ``MoELayer``s built from the same ``TransformerConfig`` (softmax over all experts,
top-k, fp32 router): one with ``DomainEmbeddingRouter`` and ``PerExpertSequentialMLP`` (FlexOlmo), one
with ``TopKRouter`` and ``SequentialMLP`` (stock), holding identical weights.  Timed steps alternate
between the two; the median is reported.  Target: FlexOlmo <= 1.02x stock.

    .venv/bin/python -m benchmarks.bench_moe_layer [--hidden 1024] [--ffn 2816] [--experts 4] [--topk 2]
        [--markdown OUT] [--quick]

``--markdown`` writes its section of docs/benchmarks.md; ``--quick`` is a tiny smoke run (no verdict).
"""

from __future__ import annotations

import statistics
import time
from functools import partial

from benchmarks.report import load, load_note, parse_arguments, write_section

TITLE = "## P1: FlexOlmo MoE layer vs Megatron's stock MoE layer — `benchmarks/bench_moe_layer.py`"
QUICK = dict(hidden=64, ffn=128, experts=4, topk=2, seq=32, batch=2, steps=2, warmup=1)


def main() -> None:
    args = parse_arguments(__doc__, (("hidden", 1024), ("ffn", 2816), ("experts", 4), ("topk", 2), ("seq", 512),
                                     ("batch", 4), ("steps", 20), ("warmup", 3)), QUICK,
                           quick_help="tiny shapes, two steps (a smoke test)")
    load_before = load()

    import torch
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.moe.router import TopKRouter

    from flexolmo_plugin import compat
    from flexolmo_plugin.model.config import (
        FlexOlmoConfig,
        ParallelLayout,
        to_transformer_config,
    )
    from flexolmo_plugin.model.experts import PerExpertSequentialMLP
    from flexolmo_plugin.model.parallel import ensure_model_parallel
    from flexolmo_plugin.model.router import DomainEmbeddingRouter

    compat.enable_cpu_compat()  # a benchmark is an entry point: CPU shims where CUDA is absent
    ensure_model_parallel()
    config = FlexOlmoConfig(vocab_size=128, hidden_size=args.hidden, intermediate_size=args.ffn, num_layers=1,
                            num_attention_heads=8, num_key_value_heads=8, num_experts=args.experts, top_k=args.topk)
    tc = to_transformer_config(config, ParallelLayout())
    mlp = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear, activation_func=None)
    torch.manual_seed(0)
    stock = MoELayer(tc, submodules=MoESubmodules(experts=partial(SequentialMLP, submodules=mlp), router=TopKRouter))
    ours = MoELayer(tc, submodules=MoESubmodules(experts=partial(PerExpertSequentialMLP, submodules=mlp),
                                                 router=DomainEmbeddingRouter))
    with torch.no_grad():
        for e, row in enumerate(ours.router.domain_embeddings):
            row.copy_(stock.router.weight[e])
        for a, b in zip(ours.experts.parameters(), stock.experts.parameters()):
            a.copy_(b)
    x = torch.randn(args.seq, args.batch, args.hidden)
    out_ours, out_stock = ours(x)[0], stock(x)[0]
    max_diff = (out_ours - out_stock).abs().max().item()

    def step(layer):
        inp = x.detach().requires_grad_(True)
        start = time.perf_counter()
        out, _ = layer(inp)
        out.float().square().mean().backward()
        return time.perf_counter() - start

    times = {"stock": [], "flexolmo": []}
    for i in range(args.warmup + args.steps):
        for name, layer in (("stock", stock), ("flexolmo", ours)) if i % 2 else (("flexolmo", ours), ("stock", stock)):
            t = step(layer)
            if i >= args.warmup:
                times[name].append(t)
    s, f = statistics.median(times["stock"]), statistics.median(times["flexolmo"])
    lines = [TITLE, "", f"Conditions: {time.strftime('%Y-%m-%d')}, CPU, {torch.get_num_threads()} threads; "
             f"{load_note(load_before, load())}. Two Megatron `MoELayer`s from one `TransformerConfig` (hidden "
             f"{args.hidden}, FFN {args.ffn}, {args.experts} experts top-{args.topk}, {args.seq * args.batch} tokens, "
             f"fp32), identical weights -- outputs differ by {max_diff:.1e}; forward + backward, steps alternating, "
             f"median of {args.steps}.", "",
             "| MoE layer | forward + backward (median) | ratio |", "|---|---|---|",
             f"| Megatron stock (`TopKRouter`, `SequentialMLP`) | {1000 * s:.1f} ms | 1.00 |",
             f"| FlexOlmo (`DomainEmbeddingRouter`, `PerExpertSequentialMLP`) | {1000 * f:.1f} ms | {f / s:.3f} |", ""]
    if args.quick:
        lines.append("* Quick mode (a smoke test of the report on tiny shapes): no verdict.")
    else:
        lines.append(f"* Target ≤ 1.02×: **{'met' if f / s <= 1.02 else 'not met'}** on CPU ({f / s:.3f}×). "
                     "On GPU (and with TE grouped GEMMs): see the GPU section.")
    write_section(args.markdown, lines)


if __name__ == "__main__":
    main()
