"""Entry point of ``flexolmo demo``: run the pipeline, check what it should show, write a summary."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from flexolmo_plugin.compat import enable_cpu_compat
from flexolmo_plugin.demo.assess import attribute, checks, evaluate_all, export, figures, format_losses
from flexolmo_plugin.demo.pipeline import Demo, DemoError, DemoResult
from flexolmo_plugin.demo.sizes import OWNERS


def default_workdir(base: Path | None = None) -> Path:
    """``./flexolmo-demo``, or the first ``./flexolmo-demo-N`` that does not exist (nothing is reused)."""
    base = base or Path.cwd()
    candidate, n = base / "flexolmo-demo", 1
    while candidate.exists():
        n += 1
        candidate = base / f"flexolmo-demo-{n}"
    return candidate


ARTIFACTS = {
    "demo log (every command, as a flexolmo command line)": "logs/demo.log",
    "training logs": "logs/train-*.log",
    "owner texts and held-out texts (JSON Lines) + tokenized datasets": "data/",
    "tokenizer trained here": "data/tokenizer/",
    "router-tuning data (public text + the owners' proxy selections)": "data/router-mix.jsonl",
    "public model (Megatron torch_dist, Bridge save dir)": "coordinator/public/",
    "public model in Hugging Face format (used for embeddings)": "coordinator/public-hf/",
    "owners' upcycled starts, trained and calibrated checkpoints": "owners/<name>/{start,trained,calibrated}/",
    "expert packages (manifest.json + safetensors) and proxy selections": "packages/",
    "merged model (Megatron), before the router step": "coordinator/merged/",
    "final model (routers aligned / scaled / tuned on public + proxy data)": "coordinator/final/",
    "final model without the first owner (physical opt-out)": f"coordinator/final-without-{OWNERS[0]}/",
    "final model in Hugging Face format": "coordinator/final-hf/",
    "routing heatmaps (gate weights before / after the router step)": "eval/routing-before.png, eval/routing-after.png",
    "attribution of one generated output per domain (flexolmo generate --attribution)": "eval/attribution.jsonl",
    "all numbers (JSON) / this summary": "eval/results.json, eval/summary.md",
}


def write_summary(result: DemoResult, claims: list[tuple[str, bool]], total_s: float) -> str:
    lines = [f"# FlexOlmo demo ({result.size}, seed {result.seed}) — {time.strftime('%Y-%m-%d %H:%M')}, "
             f"{total_s:.0f} s", "", "```", format_losses(result.losses, result.oracle).strip("\n"), "```", "",
             "## Checks"]
    lines += [f"- [{'x' if ok else ' '}] {text}" for text, ok in claims]
    lines += ["", "## Figures", ""] + [f"- {text}" for text in figures(result)]
    lines += ["", "## Attribution (final model, one held-out prompt per domain, greedy)", ""]
    lines += [f"- {domain}: " + ", ".join(f"{name} {100 * share:.0f}%" for name, share in item["shares"].items())
              for domain, item in result.attribution.items()]
    lines += ["", "## Where everything is", ""]
    lines += [f"- {what}: `{result.workdir / where}`" for what, where in ARTIFACTS.items()]
    lines += ["", "## Time per step (s)", ""] + [f"- {k}: {v}" for k, v in result.step_seconds.items()]
    text = "\n".join(lines) + "\n"
    (result.workdir / "eval" / "summary.md").write_text(text)
    payload = asdict(result) | {"workdir": str(result.workdir), "checks": claims, "figures": figures(result),
                                "total_seconds": round(total_s, 1)}
    (result.workdir / "eval" / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    return text


def run_demo(workdir: str | os.PathLike | None = None, *, size: str = "full", seed: int = 0,
             overrides: dict[str, str] | None = None, progress: bool = True,
             echo=print) -> tuple[DemoResult, list[tuple[str, bool]]]:
    """The whole demo (``flexolmo demo``); returns its result and its checks.  Called from a script, guard the
    call with ``if __name__ == "__main__":`` -- the router steps save checkpoints in this process, and
    Megatron's checkpoint writer starts a helper process that re-imports the main script."""
    workdir = Path(workdir) if workdir else default_workdir()
    if workdir.exists() and any(workdir.iterdir()):
        raise FileExistsError(f"{workdir} exists and is not empty; choose another --workdir (nothing was changed)")
    workdir = workdir.resolve()
    enable_cpu_compat()
    start = time.perf_counter()
    demo = Demo(workdir, size, seed=seed, overrides=overrides, progress=progress, echo=echo)
    demo.say(f"FlexOlmo demo ({size}, seed {seed}) in {workdir}")
    demo.step("1. data: real text found on this machine, split per domain; tokenizer trained here", demo.prepare_data)
    demo.step("2. coordinator: train the public model on public text (Megatron-Bridge, own process)", demo.train_public)
    demo.step("3. coordinator: publish the public model (HF export) and the public domain embedding r_pub",
              demo.publish_public)
    for owner in OWNERS:
        demo.step(f"4. owner {owner!r}: domain embedding, upcycle [public, {owner}], anchored training with the "
                  f"learned bias (own process, own data only), router calibration, package, proxy selection",
                  demo.owner, owner)
    demo.step("5. coordinator: verify and merge the packages", demo.merge)
    demo.step("6. coordinator: router step (alignment / scaling / tuning) on public text + the owners' proxy "
              "selections; opt one owner out",
              demo.router_tune)
    demo.step("7. evaluate every model on every domain's held-out text", evaluate_all, demo)
    demo.step("8. export the final model to Hugging Face and check it with transformers", export, demo)
    demo.step("9. generate from the final model: one held-out prompt per domain, attributed to the experts",
              attribute, demo)
    total = time.perf_counter() - start
    claims = checks(demo.result)
    summary = write_summary(demo.result, claims, total)
    demo.log(summary)
    demo.echo("\n== checks")
    for text, ok in claims:
        demo.echo(f"   {'PASS' if ok else 'FAIL'}  {text}")
    demo.echo("\n== figures")
    for text in figures(demo.result):
        demo.echo(f"   {text}")
    demo.echo(f"\n== artifacts (all under {workdir})")
    for what, where in ARTIFACTS.items():
        demo.echo(f"   {where:<48} {what}")
    demo.echo(f"\nFlexOlmo demo finished in {total:.0f} s; summary: {workdir / 'eval' / 'summary.md'}")
    return demo.result, claims


__all__ = ["run_demo", "checks", "DemoError", "default_workdir"]
