"""Entry point of ``flexolmo demo``: run the pipeline, check what it should show, write a summary."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from flexolmo_plugin.compat import enable_cpu_compat
from flexolmo_plugin.demo.corpus import DOMAINS
from flexolmo_plugin.demo.pipeline import Demo, DemoError, DemoResult, format_losses
from flexolmo_plugin.demo.sizes import OWNERS


def default_workdir(base: Path | None = None) -> Path:
    """``./flexolmo-demo``, or the first ``./flexolmo-demo-N`` that does not exist (nothing is reused)."""
    base = base or Path.cwd()
    candidate, n = base / "flexolmo-demo", 1
    while candidate.exists():
        n += 1
        candidate = base / f"flexolmo-demo-{n}"
    return candidate


def checks(result: DemoResult) -> list[tuple[str, bool]]:
    """What the demo claims, each as a verifiable statement about the measured losses."""
    table = result.losses
    public, merged = table["public model"], table["merged (all experts)"]
    out = [(f"merged model beats the public model on {d} ({merged[d]:.3f} < {public[d]:.3f})", merged[d] < public[d])
           for d in DOMAINS if d != "public"]
    for owner in OWNERS:
        row = table[f"merged, {owner} opted out"]
        rise = {d: row[d] - merged[d] for d in DOMAINS}
        others = max(v for d, v in rise.items() if d != owner)
        out.append((f"opting {owner} out raises the loss most on {owner} ({rise[owner]:+.3f} vs at most "
                    f"{others:+.3f} elsewhere)", rise[owner] > others))
    out.append((f"physical opt-out == run-time exclusion (max |Δloss| {result.physical_vs_runtime_opt_out:.1e})",
                result.physical_vs_runtime_opt_out <= 1e-5))
    out.append((f"HF export computes the same logits in transformers (max |Δ| {result.hf_max_abs_logit_diff:.1e})",
                result.hf_max_abs_logit_diff <= 1e-4))
    return out


ARTIFACTS = {
    "demo log (every command, as a flexolmo command line)": "logs/demo.log",
    "training logs": "logs/train-*.log",
    "owner texts and held-out texts (JSON Lines) + tokenized datasets": "data/",
    "tokenizer trained here": "data/tokenizer/",
    "public model (Megatron torch_dist, Bridge save dir)": "coordinator/public/",
    "public model in Hugging Face format (used for embeddings)": "coordinator/public-hf/",
    "owners' upcycled starts and trained checkpoints": "owners/<name>/start/, owners/<name>/trained/",
    "expert packages (manifest.json + safetensors)": "packages/<name>/",
    "merged model (Megatron)": "coordinator/merged/",
    "merged model without the first owner (physical opt-out)": f"coordinator/merged-without-{OWNERS[0]}/",
    "merged model in Hugging Face format": "coordinator/merged-hf/",
    "routing heatmap": "eval/routing.png",
    "all numbers (JSON) / this summary": "eval/results.json, eval/summary.md",
}


def write_summary(result: DemoResult, claims: list[tuple[str, bool]], total_s: float) -> str:

    lines = [f"# FlexOlmo demo ({result.size}) — {time.strftime('%Y-%m-%d %H:%M')}, {total_s:.0f} s", "",
             "```", format_losses(result.losses).strip("\n"), "```", "", "## Checks"]
    lines += [f"- [{'x' if ok else ' '}] {text}" for text, ok in claims]
    lines += ["", "## Where everything is", ""]
    lines += [f"- {what}: `{result.workdir / where}`" for what, where in ARTIFACTS.items()]
    lines += ["", "## Time per step (s)", ""] + [f"- {k}: {v}" for k, v in result.step_seconds.items()]
    text = "\n".join(lines) + "\n"
    (result.workdir / "eval" / "summary.md").write_text(text)
    payload = asdict(result) | {"workdir": str(result.workdir), "checks": claims, "total_seconds": round(total_s, 1)}
    (result.workdir / "eval" / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    return text


def run_demo(workdir: str | os.PathLike | None = None, *, size: str = "full", progress: bool = True,
             echo=print) -> tuple[DemoResult, list[tuple[str, bool]]]:
    workdir = Path(workdir) if workdir else default_workdir()
    if workdir.exists() and any(workdir.iterdir()):
        raise FileExistsError(f"{workdir} exists and is not empty; choose another --workdir (nothing was changed)")
    workdir = workdir.resolve()

    enable_cpu_compat()
    start = time.perf_counter()
    demo = Demo(workdir, size, progress=progress, echo=echo)
    demo.say(f"FlexOlmo demo ({size}) in {workdir}")
    demo.step("1. data: real text found on this machine, split per domain; tokenizer trained here", demo.prepare_data)
    demo.step("2. coordinator: train the public model on public text (Megatron-Bridge, own process)", demo.train_public)
    demo.step("3. coordinator: publish the public model (HF export) and the public domain embedding r_pub",
              demo.publish_public)
    for owner in OWNERS:
        demo.step(f"4. owner {owner!r}: domain embedding, upcycle [public, {owner}], anchored training "
                  f"(own process, own data only), package", demo.owner, owner)
    demo.step("5. coordinator: verify and merge the packages; opt one owner out", demo.merge)
    demo.step("6. evaluate every model on every domain's held-out text", demo.evaluate)
    demo.step("7. export the merged model to Hugging Face and check it with transformers", demo.export)
    total = time.perf_counter() - start
    claims = checks(demo.result)
    summary = write_summary(demo.result, claims, total)
    demo.log(summary)
    demo.echo("\n== checks")
    for text, ok in claims:
        demo.echo(f"   {'PASS' if ok else 'FAIL'}  {text}")
    demo.echo(f"\n== artifacts (all under {workdir})")
    for what, where in ARTIFACTS.items():
        demo.echo(f"   {where:<48} {what}")
    demo.echo(f"\nFlexOlmo demo finished in {total:.0f} s; summary: {workdir / 'eval' / 'summary.md'}")
    return demo.result, claims


__all__ = ["run_demo", "checks", "DemoError", "default_workdir"]
