"""GPU benchmark: FlexOlmo's MoE layer vs Megatron's stock MoE layer of the same shape (tokens/s, target
>= 0.98x stock), anchored vs full training step of the FlexOlmo layer, and achieved TFLOPS.

bf16 on one CUDA device, CUDA-synchronised timings, median of ``--steps`` alternating steps.  FLOPs come
from :mod:`flexolmo_plugin.recipes.flops` (router + SwiGLU experts; frozen experts need no weight gradient).
Without CUDA it prints ``not measured: no CUDA`` and exits 0 (so ``benchmarks/run_all.py`` can run it
anywhere); ``--markdown OUT`` writes the result (or that line) as a markdown section.

    python -m benchmarks.bench_gpu [--hidden 4096] [--ffn 11008] [--experts 2] [--topk 2] [--markdown OUT]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

TITLE = "## GPU: FlexOlmo MoE layer vs Megatron stock MoE layer (bf16)"


def _layer_flops(args, trainable_experts) -> float:
    """FLOPs of one forward + backward of the MoE layer alone (input gradient always needed)."""
    d, f, e, k, tokens = args.hidden, args.ffn, args.experts, args.topk, args.seq * args.batch
    per_slot = 2 * d * 2 * f + 2 * f * d
    forward = tokens * (2 * d * e + k * per_slot)
    share = sum(trainable_experts) / e
    return forward * 2 + tokens * (2 * d * e + k * per_slot * share)  # fwd + dgrad + wgrad


def moe_pair(tc, device):
    """Megatron's stock ``MoELayer`` (``TopKRouter``, ``SequentialMLP``) and FlexOlmo's (router and experts as
    ``flexolmo_layer_spec`` builds them) from one ``TransformerConfig``, on ``device``, with identical weights
    (copied where the parameter shapes line up)."""
    import torch
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from flexolmo_plugin.model.spec import flexolmo_layer_spec

    mlp = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear, activation_func=None)
    torch.manual_seed(0)
    stock = MoELayer(tc, submodules=MoESubmodules(experts=partial(SequentialMLP, submodules=mlp), router=TopKRouter))
    spec = flexolmo_layer_spec(backend="local").submodules.mlp  # a ModuleSpec, a class or a partial
    ours = build_module(spec, config=tc) if isinstance(spec, (ModuleSpec, type)) else spec(config=tc)
    stock, ours = stock.to(device), ours.to(device)
    with torch.no_grad():
        for e, row in enumerate(ours.router.domain_embeddings):
            row.copy_(stock.router.weight[e])
        mine, theirs = list(ours.experts.parameters()), list(stock.experts.parameters())
        if [p.shape for p in mine] == [p.shape for p in theirs]:
            for a, b in zip(mine, theirs):
                a.copy_(b)
    return stock, ours


def measure(args) -> list[str]:
    import torch

    from flexolmo_plugin import compat
    from flexolmo_plugin.model.config import (
        FlexOlmoConfig,
        ParallelLayout,
        to_transformer_config,
    )
    from flexolmo_plugin.model.parallel import ensure_model_parallel

    compat.enable_cpu_compat()  # a benchmark is an entry point: CPU shims where CUDA is absent
    ensure_model_parallel()
    config = FlexOlmoConfig(vocab_size=128, hidden_size=args.hidden, intermediate_size=args.ffn, num_layers=1,
                            num_attention_heads=32, num_key_value_heads=32, num_experts=args.experts, top_k=args.topk)
    tc = to_transformer_config(config, ParallelLayout(), params_dtype=torch.bfloat16, bf16=True)
    stock, ours = moe_pair(tc, "cuda")
    x = torch.randn(args.seq, args.batch, args.hidden, device="cuda", dtype=torch.bfloat16)

    def step(layer):
        inp = x.detach().requires_grad_(True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        out, _ = layer(inp)
        out.float().square().mean().backward()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    def timed(pairs):
        times = {name: [] for name, _ in pairs}
        for i in range(args.warmup + args.steps):
            for name, layer in (pairs if i % 2 else pairs[::-1]):
                t = step(layer)
                if i >= args.warmup:
                    times[name].append(t)
        return {name: statistics.median(v) for name, v in times.items()}

    full = timed([("stock", stock), ("flexolmo", ours)])
    public = list(ours.experts.local_experts[0].parameters())
    for p in public:  # anchored: public expert frozen, the router and the other experts train
        p.requires_grad_(False)
    anchored = timed([("anchored", ours)])["anchored"]
    tokens = args.seq * args.batch
    tf_full = _layer_flops(args, [True] * args.experts) / full["flexolmo"] / 1e12
    tf_anchored = _layer_flops(args, [False] + [True] * (args.experts - 1)) / anchored / 1e12
    return [
        TITLE,
        "",
        f"{torch.cuda.get_device_name()}; hidden {args.hidden}, FFN {args.ffn}, "
        f"{args.experts} experts top-{args.topk}, "
        f"{tokens} tokens/step; median of {args.steps} steps",
        "",
        "| layer | fwd+bwd | tokens/s | vs stock | TFLOPS |",
        "|---|---|---|---|---|",
        f"| Megatron stock | {1000 * full['stock']:.2f} ms | {tokens / full['stock']:,.0f} | 1.000 | "
        f"{_layer_flops(args, [True] * args.experts) / full['stock'] / 1e12:.1f} |",
        f"| FlexOlmo (full training) | {1000 * full['flexolmo']:.2f} ms | {tokens / full['flexolmo']:,.0f} | "
        f"{full['stock'] / full['flexolmo']:.3f} (target >= 0.98) | {tf_full:.1f} |",
        f"| FlexOlmo (anchored: public expert frozen) | {1000 * anchored:.2f} ms | {tokens / anchored:,.0f} | "
        f"{full['stock'] / anchored:.3f} | {tf_anchored:.1f} |",
        "",
        f"anchored / full step time: {anchored / full['flexolmo']:.3f}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    for name, default in (
        ("hidden", 4096),
        ("ffn", 11008),
        ("experts", 2),
        ("topk", 2),
        ("seq", 4096),
        ("batch", 1),
        ("steps", 20),
        ("warmup", 5),
    ):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--markdown", type=Path, help="write the result as a markdown section here")
    args = parser.parse_args(argv)
    from flexolmo_plugin.compat import cuda_available

    lines = measure(args) if cuda_available() else [TITLE, "", "not measured: no CUDA"]
    print("\n".join(lines))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
