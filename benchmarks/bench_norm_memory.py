"""Issue 16 item 3: activation memory of FlexOlmo's four fp32 RMSNorms per layer, eager vs memory-lean.

The same FlexOlmo models (Megatron ``GPTModel``, OLMo-2-7B proportions scaled down: MHA, FFN ≈ 2.69 h,
one expert) run a training forward with ``torch.autograd.graph.saved_tensors_hooks`` counting the bytes
of every distinct storage saved for backward (parameters excluded), once with autograd of the eager
RMSNorm formula (``memory_lean = False``, the previous implementation) and once with the memory-lean
norm (``model/norms.py``).  Bytes per layer = the model with two layers minus the model with one.
The per-layer drop is compared with the derived one (bf16: ``6·tokens·(2h + q + kv) + 4(2h + q + kv)``;
fp32: ``4·tokens·(2h + q + kv)``) and extrapolated to OLMo-2 7B (h = q = kv = 4096, 4096 tokens, 32
layers), where ``flexolmo plan`` counts it.  Forward + backward time of the two-layer model, steps
alternating, median.

    .venv/bin/python -m benchmarks.bench_norm_memory [--hidden 512] [--heads 8] [--seq 1024] [--steps 5]
        [--markdown OUT] [--quick]
"""

from __future__ import annotations

import statistics
import time

from benchmarks.report import load, load_note, machine_line, parse_arguments, write_section

TITLE = "## Issue 16: RMSNorm activation memory, eager vs memory-lean — `benchmarks/bench_norm_memory.py`"
QUICK = dict(hidden=64, heads=4, seq=32, batch=1, steps=1, warmup=1)


def _set_lean(model, lean: bool) -> None:
    for module in model.modules():
        if hasattr(module, "memory_lean"):
            module.memory_lean = lean


def _saved_bytes(model, ids, mask) -> int:
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, positions, mask)
    del out
    return sum(storages.values())


def main() -> None:
    args = parse_arguments(__doc__, (("hidden", 512), ("heads", 8), ("seq", 1024), ("batch", 1), ("steps", 5),
                                     ("warmup", 1)), QUICK, quick_help="tiny shapes, one step (a smoke test)")
    load_before = load()

    import torch

    from flexolmo_plugin import compat
    from flexolmo_plugin.model.build import build_model, causal_attention_mask, next_token_loss
    from flexolmo_plugin.model.config import FlexOlmoConfig
    from flexolmo_plugin.model.norms import rms_norm
    from flexolmo_plugin.model.parallel import ensure_model_parallel

    compat.enable_cpu_compat()  # a benchmark is an entry point: CPU shims where CUDA is absent
    ensure_model_parallel()
    h, tokens = args.hidden, args.seq * args.batch
    ffn = round(h * 11008 / 4096)
    widths = 2 * h + h + h  # post-attention, post-MoE, q and k norms (MHA: q = kv = h)

    def model_of(layers: int, dtype):
        config = FlexOlmoConfig(vocab_size=256, hidden_size=h, intermediate_size=ffn, num_layers=layers,
                                num_attention_heads=args.heads, num_key_value_heads=args.heads, num_experts=1,
                                top_k=1, max_position_embeddings=args.seq, make_vocab_size_divisible_by=128)
        torch.manual_seed(0)
        return build_model(config, params_dtype=dtype).train()

    ids = torch.randint(0, 256, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    mask = causal_attention_mask(args.seq, ids.device)
    rows, timing = [], {}
    for dtype, label in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        per_model = {}
        for layers in (1, 2):
            model, per_model[layers] = model_of(layers, dtype), {}
            for lean in (False, True):
                _set_lean(model, lean)
                per_model[layers][lean] = _saved_bytes(model, ids, mask)
        eager, lean = (per_model[2][k] - per_model[1][k] for k in (False, True))
        derived = 6 * tokens * widths + 4 * widths if dtype == torch.bfloat16 else 4 * tokens * widths
        rows.append((label, eager, lean, derived))
        if dtype == torch.bfloat16:
            continue
        model = model_of(2, dtype)  # fp32 timing (CPU bf16 matmuls are not representative)
        positions = torch.arange(args.seq).expand_as(ids)
        times = {False: [], True: []}
        for i in range(args.warmup + args.steps):
            for lean in ((False, True) if i % 2 else (True, False)):
                _set_lean(model, lean)
                model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                next_token_loss(model(ids, positions, mask), ids).backward()
                if i >= args.warmup:
                    times[lean].append(time.perf_counter() - start)
        timing = {lean: statistics.median(t) for lean, t in times.items()}

    norm_width = 64 if args.quick else 4096  # one norm alone at OLMo-2 7B's width
    norm_times = {}
    for dtype, label in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        x = torch.randn(tokens, norm_width).to(dtype)
        weight = torch.ones(norm_width, dtype=dtype, requires_grad=True)
        grad = torch.randn_like(x)
        samples = {False: [], True: []}
        for i in range(args.warmup + 3 * args.steps):
            for lean in ((False, True) if i % 2 else (True, False)):
                inp = x.clone().requires_grad_()
                start = time.perf_counter()
                rms_norm(inp, weight, 1e-6, memory_lean=lean).backward(grad)
                if i >= args.warmup:
                    samples[lean].append(time.perf_counter() - start)
        norm_times[label] = {lean: statistics.median(t) for lean, t in samples.items()}

    # OLMo-2 7B, bf16 activations, one 4096-token micro-batch: per layer and the 32 layers + final norm
    h7, t7 = 4096, 4096
    drop7 = 32 * (6 * t7 * 4 * h7 + 4 * 4 * h7) + 6 * t7 * h7 + 4 * h7
    threads = torch.get_num_threads()
    lines = [TITLE, "", f"Conditions: {time.strftime('%Y-%m-%d')}, {machine_line()}, {threads} threads; "
             f"{load_note(load_before, load())}. FlexOlmo `GPTModel`, hidden {h}, {args.heads} heads (MHA), FFN "
             f"{ffn}, one expert, {tokens} tokens, training forward; bytes of distinct storages saved for backward "
             "(`saved_tensors_hooks`, parameters excluded), per layer = two-layer model minus one-layer model. "
             "Megatron's local (unfused) attention on CPU, so the absolute per-layer figure includes its "
             "softmax; the norms' share is what changes.", "",
             "| activations | eager RMSNorm (per layer) | memory-lean (per layer) | drop | derived drop | "
             "drop / eager |", "|---|---|---|---|---|---|"]
    for label, eager, lean, derived in rows:
        lines.append(f"| {label} | {eager / 2**20:.2f} MiB | {lean / 2**20:.2f} MiB | {(eager - lean) / 2**20:.3f} MiB"
                     f" | {derived / 2**20:.3f} MiB | {(eager - lean) / eager:.1%} |")
    matches = all(eager - lean == derived for _, eager, lean, derived in rows)
    lines += ["", f"* Measured drop {'equals' if matches else 'DIFFERS FROM'} the derived drop byte for byte "
              "(bf16: fp32 upcast + normalised fp32 value + fp32 weight copy − bf16 input, per norm; fp32: the "
              "normalised value).",
              f"* Extrapolated to OLMo-2 7B (bf16, 4096 tokens, 32 layers + final norm): "
              f"**{drop7 / 2**30:.2f} GiB** less per micro-batch and GPU (the derived drop above).",
              f"* Forward + backward, two layers, fp32, median of {args.steps}: eager {1000 * timing[False]:.1f} ms, "
              f"memory-lean {1000 * timing[True]:.1f} ms ({timing[True] / timing[False]:.3f}×)."]
    lines += [f"* One RMSNorm alone, [{tokens}, {norm_width}], forward + backward, median of {3 * args.steps}: "
              + "; ".join(f"{label} eager {1000 * t[False]:.2f} ms, memory-lean {1000 * t[True]:.2f} ms "
                          f"({t[True] / t[False]:.3f}×)" for label, t in norm_times.items()) + "."]
    if args.quick:
        lines.append("* Quick mode (a smoke test of the report on tiny shapes).")
    write_section(args.markdown, lines)


if __name__ == "__main__":
    main()
