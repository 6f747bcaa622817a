"""Expert paths at top-k = E: the dense mixture vs the token dispatcher vs Megatron's stock MoE layer (CPU).

When every token visits every expert (anchored 2-of-2, router tuning E-of-E) FlexOlmo's MoE layer runs
each expert on all tokens and sums (``flexolmo_plugin.model.dense_mixture``) instead of permuting and
dispatching tokens.  This times forward + backward of one MoE layer on three paths, same shapes, same
run, steps alternating, median reported:

* FlexOlmo, dense mixture (the path selected automatically at top-k = E);
* FlexOlmo, token dispatcher (the same layer and weights, forced to Megatron's all-to-all dispatcher);
* Megatron's stock ``MoELayer`` (``TopKRouter``, ``SequentialMLP``, all-to-all dispatcher).

Each at all experts trainable and anchored (expert 0 frozen: no weight gradient for it).

    .venv/bin/python -m benchmarks.bench_moe_paths [--hidden 512] [--ffn 1408] [--experts 2 4]
        [--markdown OUT] [--quick]
"""

from __future__ import annotations

import statistics
import time

from benchmarks.report import load, load_note, parse_arguments, write_section

TITLE = "## Expert paths at top-k = E: dense mixture vs token dispatcher vs stock — `benchmarks/bench_moe_paths.py`"
QUICK = dict(hidden=64, ffn=96, seq=32, batch=2, steps=2, warmup=1)


def _time(pairs, steps: int, warmup: int, x) -> dict[str, float]:
    """Median seconds of forward + backward per ``(name, layer)``; the order alternates every step."""
    times = {name: [] for name, _ in pairs}
    for i in range(warmup + steps):
        for name, layer in (pairs if i % 2 else pairs[::-1]):
            inp = x.detach().requires_grad_(True)
            start = time.perf_counter()
            out, _ = layer(inp)
            out.float().square().mean().backward()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def measure(args, experts: int) -> tuple[list[str], float, list[str]]:
    """Table rows for ``experts`` experts top-``experts``, the outputs' largest difference, and one summary
    line per setting (dense mixture vs dispatcher)."""
    import torch

    from benchmarks.bench_gpu import moe_pair
    from flexolmo_plugin.model.config import FlexOlmoConfig, ParallelLayout, to_transformer_config

    config = FlexOlmoConfig(vocab_size=128, hidden_size=args.hidden, intermediate_size=args.ffn, num_layers=1,
                            num_attention_heads=8, num_key_value_heads=8, num_experts=experts, top_k=experts)
    tc = to_transformer_config(config, ParallelLayout())
    stock, dense = moe_pair(tc, "cpu")
    assert dense.expert_path == "dense", "top-k = E must select the dense mixture"
    dispatched = moe_pair(tc, "cpu")[1]
    dispatched.set_expert_path("dispatcher")
    x = torch.randn(args.seq, args.batch, args.hidden)
    with torch.no_grad():
        ref = stock(x)[0]
        diff = max((layer(x)[0] - ref).abs().max().item() for layer in (dense, dispatched))
    rows, summary = [], []
    for setting in ("all experts train", "anchored (expert 0 frozen)"):
        if setting.startswith("anchored"):
            for layer in (stock, dense, dispatched):
                for p in layer.experts.local_experts[0].parameters():
                    p.requires_grad_(False)
        t = _time([("stock", stock), ("dense", dense), ("dispatcher", dispatched)], args.steps, args.warmup, x)
        for name, label in (("stock", "Megatron stock `MoELayer`"), ("dispatcher", "FlexOlmo, token dispatcher"),
                            ("dense", "FlexOlmo, **dense mixture**")):
            rows.append(f"| {experts} of {experts} | {setting} | {label} | {1000 * t[name]:.1f} ms | "
                        f"{t['stock'] / t[name]:.2f} |")
        summary.append(f"{experts} of {experts}, {setting}: dense mixture {t['dispatcher'] / t['dense']:.2f}× "
                       f"the speed of the token dispatcher, {t['stock'] / t['dense']:.2f}× stock")
    return rows, diff, summary


def main() -> None:
    args = parse_arguments(
        __doc__, (("hidden", 512), ("ffn", 1408), ("seq", 256), ("batch", 2), ("steps", 8), ("warmup", 2)), QUICK,
        quick_help="tiny shapes, two steps (a smoke test)",
        extra=lambda parser: parser.add_argument("--experts", type=int, nargs="+", default=[2, 4],
                                                 help="E (top-k = E) values to time"))
    load_before = load()

    import torch

    from flexolmo_plugin import compat
    from flexolmo_plugin.model.parallel import ensure_model_parallel

    compat.enable_cpu_compat()  # a benchmark is an entry point: CPU shims where CUDA is absent
    ensure_model_parallel()
    rows, diffs, summary = [], [], []
    for experts in args.experts:
        more, diff, lines = measure(args, experts)
        rows += more
        diffs.append(diff)
        summary += lines
    lines = [TITLE, "", f"Conditions: {time.strftime('%Y-%m-%d')}, CPU, {torch.get_num_threads()} threads, no GPU; "
             f"{load_note(load_before, load())}. One Megatron `MoELayer` per path from one `TransformerConfig` "
             f"(hidden {args.hidden}, FFN {args.ffn}, {args.seq * args.batch} tokens, fp32, TP = EP = 1), "
             f"identical weights -- outputs differ from stock by at most {max(diffs):.1e}; forward + backward, "
             f"steps alternating between the paths, median of {args.steps}.", "",
             "| experts | trains | MoE layer | forward + backward (median) | speed-up vs stock |",
             "|---|---|---|---|---|",
             *rows, ""]
    if args.quick:
        lines.append("* Quick mode (a smoke test of the report on tiny shapes): no verdict.")
    else:
        lines += [f"* {line}." for line in summary]
        lines.append("* One CPU process: no all-to-all and no device-to-host wait exist here, so this measures only "
                     "what permutation and per-expert splitting cost; GPU timings: `benchmarks/gpu_check.py`.")
    write_section(args.markdown, lines)


if __name__ == "__main__":
    main()
