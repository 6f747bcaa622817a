"""One-shot GPU check (issue #16, item 4): everything a first GPU run should tell us, in one markdown file.

Sections (each runs in its own ``try``: one failure leaves the others reported, with the error):

1. bf16 matmul reference -- the TFLOP/s a plain bf16 matrix product reaches here, same run;
2. parity vs transformers' ``FlexOlmoForCausalLM`` at one 7B-shaped layer, fp32 and bf16 (our bf16 error
   relative to HF's own bf16 error, both measured against HF in fp32);
3. an anchored training step through Megatron DDP + Adam (public expert bytes unchanged, owner's changed);
4. MoE layer forward + backward: ours (full and anchored; the expert path selected -- the dense mixture at
   top-k = E -- and the token dispatcher path) vs Megatron's stock ``MoELayer``, same shapes;
5. full transformer layer forward + backward: ours vs a stock Megatron MoE layer (local spec), same shapes.

Timings use CUDA events on a GPU and wall-clock timers on CPU; peak memory is
``torch.cuda.max_memory_allocated`` per section.  ``--dry-run`` runs the same code on CPU at tiny shapes
(seconds), so that a typo cannot spoil the one GPU run.  Normally started by ``scripts/gpu_check.sh``.

    python -m benchmarks.gpu_check [--dry-run] --out FILE.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import SimpleNamespace

from benchmarks.bench_gpu import _layer_flops, moe_pair

TITLE = "# FlexOlmo one-shot GPU check — `benchmarks/gpu_check.py`"
FAILED = "**section failed**"
# One 7B-shaped layer (OLMo-2 7B: hidden 4096, FFN 11008, 32 heads), the anchored [public, owner] setting.
GPU_SHAPES = dict(hidden=4096, ffn=11008, heads=32, experts=2, topk=2, seq=2048, batch=1, vocab=4096,
                  matmul=8192, steps=10, warmup=3)
DRY_SHAPES = dict(hidden=64, ffn=96, heads=4, experts=2, topk=2, seq=32, batch=1, vocab=256,
                  matmul=256, steps=2, warmup=1)
BF16_ERROR_RATIO_TOL = 2.0  # ours may be at most this many times further from HF fp32 than HF's own bf16 is
FP32_REL_TOL = 1e-4


class Timer:
    """Milliseconds of ``fn()``: CUDA events on a GPU, ``perf_counter`` on CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __call__(self, fn) -> float:
        import torch

        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - begin)


class Check:
    def __init__(self, args):
        import torch

        self.args, self.torch = args, torch
        self.cuda = torch.cuda.is_available() and not args.dry_run
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.timer = Timer(self.cuda)
        self.matmul_tflops: float | None = None
        self.summary: list[tuple[str, str, str]] = []

    # ------------------------------------------------------------------ helpers
    def config(self, **extra):
        from flexolmo_plugin.model.config import FlexOlmoConfig

        a = self.args
        return FlexOlmoConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn, num_layers=1,
                              num_attention_heads=a.heads, num_key_value_heads=a.heads, num_experts=a.experts,
                              top_k=a.topk, max_position_embeddings=a.seq, **extra)

    def median_ms(self, pairs) -> dict[str, float]:
        """Median ms of each ``(name, fn)``; steps alternate the order so that drift affects all alike."""
        times = {name: [] for name, _ in pairs}
        for i in range(self.args.warmup + self.args.steps):
            for name, fn in (pairs if i % 2 else pairs[::-1]):
                t = self.timer(fn)
                if i >= self.args.warmup:
                    times[name].append(t)
        return {name: statistics.median(v) for name, v in times.items()}

    def tflops(self, flops: float, ms: float) -> str:
        achieved = flops / (ms / 1000) / 1e12
        share = f" ({100 * achieved / self.matmul_tflops:.0f}% of matmul)" if self.matmul_tflops else ""
        return f"{achieved:.1f}{share}"

    def fwd_bwd(self, layer, x, **kwargs):
        def step():
            inp = x.detach().requires_grad_(True)
            out = layer(inp, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            out.float().square().mean().backward()
        return step

    # ------------------------------------------------------------------ sections
    def matmul(self) -> list[str]:
        torch, n = self.torch, self.args.matmul
        a, b = (torch.randn(n, n, device=self.device, dtype=torch.bfloat16) for _ in range(2))
        ms = self.median_ms([("matmul", lambda: a @ b)])["matmul"]
        self.matmul_tflops = 2 * n ** 3 / (ms / 1000) / 1e12
        return [f"bf16 `{n}×{n} @ {n}×{n}`: {ms:.3f} ms, **{self.matmul_tflops:.1f} TFLOP/s** (median of "
                f"{self.args.steps}) -- the reference for the achieved TFLOP/s below."]

    def parity(self) -> list[str]:
        import copy

        import torch
        from transformers import FlexOlmoConfig as HFConfig
        from transformers import FlexOlmoForCausalLM

        import flexolmo_plugin as fp

        a = self.args
        hf_config = HFConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=1,
                             num_attention_heads=a.heads, num_key_value_heads=a.heads, num_experts=a.experts,
                             num_experts_per_tok=a.topk, max_position_embeddings=a.seq, pad_token_id=1,
                             eos_token_id=2, tie_word_embeddings=False)
        torch.manual_seed(0)
        with torch.device(self.device):
            hf = FlexOlmoForCausalLM(hf_config).eval()
        with torch.no_grad():  # non-trivial norms and router rows: a misplaced norm cannot hide behind ones
            for name, param in hf.named_parameters():
                if name.endswith("norm.weight") or "layernorm" in name:
                    param.copy_(1.0 + 0.3 * torch.randn_like(param))
                elif name.endswith("mlp.gate.weight"):
                    param.normal_(0.0, 0.5)
        ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(1))
        out = {}
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp)
            with torch.no_grad():
                out["hf fp32"] = hf(ids.to(self.device)).logits.float()
                hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
                del hf
                out["hf bf16"] = hf_bf16(ids.to(self.device)).logits.float()
                del hf_bf16
            for dtype, name in ((torch.float32, "ours fp32"), (torch.bfloat16, "ours bf16")):
                model = fp.from_hf(tmp, params_dtype=dtype)
                out[name] = fp.logits(model, ids).float()
                del model
        ref = out.pop("hf fp32")
        errors = {k: ((v - ref).norm() / ref.norm()).item() for k, v in out.items()}
        ratio = errors["ours bf16"] / max(errors["hf bf16"], 1e-30)
        ok32, ok16 = errors["ours fp32"] <= FP32_REL_TOL, ratio <= BF16_ERROR_RATIO_TOL
        rows = [f"| {k} | {(v - ref).abs().max().item():.3e} | {errors[k]:.3e} | "
                f"{errors[k] / max(errors['hf bf16'], 1e-30):.2f} |" for k, v in out.items()]
        return [f"One FlexOlmo layer (hidden {a.hidden}, FFN {a.ffn}, {a.heads} heads, {a.experts} experts "
                f"top-{a.topk}, vocab {a.vocab}), {a.batch}×{a.seq} random tokens; HF in fp32 is the reference; "
                "error = ‖logits − ref‖ / ‖ref‖.", "",
                "| model | max abs Δlogit | relative error | vs HF's own bf16 error |", "|---|---|---|---|", *rows, "",
                f"* fp32 parity (relative error ≤ {FP32_REL_TOL:.0e}): **{'ok' if ok32 else 'outside tolerance'}**",
                f"* bf16 parity (our error ≤ {BF16_ERROR_RATIO_TOL}× HF's bf16 error): "
                f"**{'ok' if ok16 else 'outside tolerance'}** ({ratio:.2f}×)"]

    def anchored_step(self) -> list[str]:
        import torch
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        import flexolmo_plugin as fp
        from flexolmo_plugin.lifecycle import freezing

        a = self.args
        torch.manual_seed(0)
        model = fp.build_model(self.config()).to(self.device)
        model.train()
        trainable = freezing.anchor(model, owner_expert=1)
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
        optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, bf16=False), [ddp])
        experts = model.decoder.layers[0].mlp.experts.local_experts
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        public = [p.detach().clone() for p in experts[0].parameters()]
        owner = [p.detach().clone() for p in experts[1].parameters()]
        ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(2))

        def step():
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            fp.next_token_loss(fp.logits(ddp, ids, grad=True), ids).backward()
            finalize_model_grads([ddp])
            optimizer.step()

        first = self.timer(step)
        ms = statistics.median(self.timer(step) for _ in range(max(1, min(3, a.steps))))
        params = dict(model.named_parameters())
        public_same = all(torch.equal(b, p) for b, p in zip(public, experts[0].parameters()))
        owner_moved = all(not torch.equal(b, p) for b, p in zip(owner, experts[1].parameters()))
        frozen_same = all(torch.equal(v, params[n]) for n, v in frozen.items())
        ok = public_same and owner_moved and frozen_same
        return [f"`freezing.anchor(owner_expert=1)`, Megatron `DistributedDataParallel` + Adam (fp32, lr 1e-3), "
                f"the layer above at vocab {a.vocab}, {a.batch}×{a.seq} tokens; {trainable.trainable_parameters:,} "
                f"parameters train, {trainable.frozen_parameters:,} frozen; {1 + max(1, min(3, a.steps))} steps.",
                "",
                f"* public expert bytes unchanged after the steps: **{public_same}**",
                f"* owner's expert changed (every tensor): **{owner_moved}**",
                f"* every frozen parameter ({len(frozen)} tensors) unchanged: **{frozen_same}**",
                f"* step time: first {first:.1f} ms, then {ms:.1f} ms (median)",
                f"* verdict: **{'ok' if ok else 'anchoring broken'}**"]

    def moe_layer(self) -> list[str]:
        import torch

        from flexolmo_plugin.model.config import ParallelLayout, to_transformer_config

        a = self.args
        tc = to_transformer_config(self.config(), ParallelLayout(), params_dtype=torch.bfloat16)
        stock, ours = moe_pair(tc, self.device)
        dispatched = moe_pair(tc, self.device)[1]  # the same layer and weights on the token dispatcher path
        dispatched.set_expert_path("dispatcher")
        x = torch.randn(a.seq, a.batch, a.hidden, device=self.device, dtype=torch.bfloat16)
        with torch.no_grad():
            ref = stock(x)[0].float()
            diff = max((layer(x)[0].float() - ref).abs().max().item() for layer in (ours, dispatched))
        full = self.median_ms([("stock", self.fwd_bwd(stock, x)), ("ours", self.fwd_bwd(ours, x)),
                               ("dispatched", self.fwd_bwd(dispatched, x))])
        for layer in (ours, dispatched):
            for p in layer.experts.local_experts[0].parameters():
                p.requires_grad_(False)
        anchored = self.median_ms([("ours", self.fwd_bwd(ours, x)), ("dispatched", self.fwd_bwd(dispatched, x))])
        flops_full = _layer_flops(a, [True] * a.experts)
        flops_anchored = _layer_flops(a, [False] + [True] * (a.experts - 1))
        path = f"`{ours.expert_path}`" + (" (dense mixture: top-k = E)" if ours.expert_path == "dense" else "")

        def row(label, ms, flops):
            return f"| {label} | {ms:.2f} ms | {full['stock'] / ms:.3f} | {self.tflops(flops, ms)} |"

        return [f"Megatron `MoELayer`s from one `TransformerConfig` (bf16, hidden {a.hidden}, FFN {a.ffn}, "
                f"{a.experts} experts top-{a.topk}, {a.seq * a.batch} tokens), identical weights (outputs differ by "
                f"{diff:.1e}); ours is the layer `flexolmo_layer_spec` builds (`{type(ours.experts).__name__}` "
                f"experts, expert path {path}), and the same layer forced onto the token dispatcher. "
                f"Forward + backward, median of {a.steps}.", "",
                "| MoE layer | fwd+bwd | vs stock | TFLOP/s |", "|---|---|---|---|",
                row(f"Megatron stock (`TopKRouter`, `{type(stock.experts).__name__}`)", full["stock"], flops_full),
                row(f"FlexOlmo, all experts train, path `{ours.expert_path}`", full["ours"], flops_full),
                row("FlexOlmo, all experts train, token dispatcher", full["dispatched"], flops_full),
                row(f"FlexOlmo, anchored (public expert frozen), path `{ours.expert_path}`", anchored["ours"],
                    flops_anchored),
                row("FlexOlmo, anchored, token dispatcher", anchored["dispatched"], flops_anchored), "",
                "(vs stock: stock time / this time, > 1 is faster.)"]

    def full_layer(self) -> list[str]:
        import dataclasses

        import torch
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        import flexolmo_plugin as fp
        from flexolmo_plugin.model.build import causal_attention_mask
        from flexolmo_plugin.model.config import gpt_model_fields

        a = self.args
        config = self.config()
        torch.manual_seed(0)
        ours = fp.build_model(config, params_dtype=torch.bfloat16).to(self.device)
        stock_config = dataclasses.replace(ours.config, qk_layernorm=True)  # ours norms q/k full-width itself
        stock = GPTModel(config=stock_config, transformer_layer_spec=get_gpt_layer_local_spec(
            num_experts=a.experts, moe_grouped_gemm=False, qk_layernorm=True), **gpt_model_fields(config))
        stock = stock.to(device=self.device, dtype=torch.bfloat16)
        rope = ours.rotary_pos_emb(a.seq)
        mask = causal_attention_mask(a.seq, self.device)
        x = torch.randn(a.seq, a.batch, a.hidden, device=self.device, dtype=torch.bfloat16)
        layers = [("stock", stock.decoder.layers[0]), ("ours", ours.decoder.layers[0])]
        ms = self.median_ms([(n, self.fwd_bwd(layer, x, attention_mask=mask, rotary_pos_emb=rope))
                             for n, layer in layers])
        t, d = a.seq * a.batch, a.hidden
        attention = 3 * (8 * t * d * d + 4 * a.batch * a.seq * a.seq * d)  # fwd + bwd, full (unmasked) scores
        flops = attention + _layer_flops(a, [True] * a.experts)
        return [f"One transformer layer (attention + MoE), bf16, local (non-TE) Megatron modules, the shapes above; "
                f"stock = `get_gpt_layer_local_spec(num_experts={a.experts}, qk_layernorm=True)`. All parameters "
                f"train. TFLOP/s count the attention scores unmasked (as the unfused kernel computes them).", "",
                "| layer | fwd+bwd | vs stock | TFLOP/s |", "|---|---|---|---|",
                f"| Megatron stock MoE layer | {ms['stock']:.2f} ms | 1.000 | {self.tflops(flops, ms['stock'])} |",
                f"| FlexOlmo layer | {ms['ours']:.2f} ms | {ms['stock'] / ms['ours']:.3f} | "
                f"{self.tflops(flops, ms['ours'])} |"]

    SECTIONS = (("bf16 matmul reference", "matmul"), ("Parity vs transformers (fp32 and bf16)", "parity"),
                ("Anchored training step through Megatron DDP", "anchored_step"),
                ("MoE layer forward + backward vs Megatron stock MoELayer", "moe_layer"),
                ("Full layer forward + backward vs Megatron stock MoE layer", "full_layer"))

    def run_section(self, title: str, method: str) -> list[str]:
        torch = self.torch
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        begin = time.perf_counter()
        try:
            body, status = getattr(self, method)(), "ok"
        except Exception as error:  # report it, and go on with the next section
            status = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
            body = [f"{FAILED}: `{type(error).__name__}: {str(error)[:500]}`", "", "```",
                    *traceback.format_exc().splitlines()[-25:], "```"]
        seconds = time.perf_counter() - begin
        peak = f"{torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB" if self.cuda else "n/a (CPU)"
        self.summary.append((title, status, peak))
        return [f"## {title}", "", *body, "", f"*{seconds:.1f} s; peak GPU memory {peak}.*", ""]


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def run(args) -> tuple[list[str], bool]:
    import torch

    from flexolmo_plugin import compat
    from flexolmo_plugin.model.parallel import ensure_model_parallel

    if not torch.cuda.is_available():
        compat.enable_cpu_compat(training=True)  # the CPU shims exist only where CUDA is absent
    elif args.dry_run:
        raise SystemExit("--dry-run is the CPU rehearsal; on a GPU machine run without it")
    ensure_model_parallel()  # world of one: gloo on CPU, nccl on a GPU
    check = Check(args)
    begin = time.perf_counter()
    sections = [line for title, method in Check.SECTIONS for line in check.run_section(title, method)]
    gpu = torch.cuda.get_device_name() if check.cuda else "none (CPU dry run, tiny shapes)"
    failed = [title for title, status, _ in check.summary if status != "ok"]
    head = [TITLE, "",
            f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}; GPU: {gpu}; torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}); megatron-core {_version('megatron-core')}; transformers "
            f"{_version('transformers')}; transformer-engine {_version('transformer-engine')}; "
            f"total {time.perf_counter() - begin:.0f} s.", "",
            "| section | result | peak GPU memory |", "|---|---|---|",
            *[f"| {title} | {status} | {peak} |" for title, status, peak in check.summary], "",
            f"{len(check.summary) - len(failed)} of {len(check.summary)} sections ran"
            + (f"; failed: {', '.join(failed)}." if failed else "."), ""]
    return head + sections, not failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, wall-clock timers")
    parser.add_argument("--out", type=Path, required=True, help="the markdown report to write")
    for name, default in GPU_SHAPES.items():
        parser.add_argument(f"--{name}", type=int, default=None, help=f"default {default} ({DRY_SHAPES[name]} dry)")
    args = parser.parse_args(argv)
    shapes = DRY_SHAPES if args.dry_run else GPU_SHAPES
    for name, default in shapes.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    lines, ok = run(SimpleNamespace(**vars(args)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
