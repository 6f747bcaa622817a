"""Composition ablation (issue #13): the demo with parts of the paper's recipe switched off, over seeds.

Each configuration runs ``flexolmo demo`` (its own process, the given ``--size``) once per seed and
reads ``eval/results.json``.  "Router step off" is the demo's own "merged, before the router step" row,
so one run measures both.  Reported per configuration and seed: composition efficiency
``(public - model) / (public - oracle)`` of the merged and of the final model, and how many of the
demo's 15 checks passed, and the final model's loss on public text relative to the public model's
(the demo's goal: at most 2% worse).

    python -m benchmarks.ablation_composition --size tiny --seeds 0 1 2 --out docs/ablation-tiny.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {  # name -> demo --set overrides ({router_iters}: the size's former router-tuning length)
    "defaults (the size's calibration scale / public weight, alignment, no LM router tuning)": [],
    "calibration x4, public weight 2 (the full size's)": ["router_calibration_scale=4", "calibration_public_weight=2"],
    "calibration x2, public weight 1 (the reduced size's)": ["router_calibration_scale=2",
                                                             "calibration_public_weight=1"],
    "calibration + alignment + logit scaling": ["router_scaling_sweeps=2"],
    "paper's rows + LM router tuning (no calibration)": ["router_calibration_scale=none",
                                                        "router_iters={router_iters}"],
    "calibration + alignment + LM router tuning": ["router_iters={router_iters}"],
    "no learned bias": ["router_bias_init=none"],
    "no public replay": ["owner_public_share=0"],
    # one of these two equals the defaults: the full size uses unit-length rows, the reduced size raw means
    "unit-length domain embeddings": ["unit_document_embeddings=true"],
    "raw-mean domain embeddings": ["unit_document_embeddings=false"],
    # the paper's embedder is a separate model (GritLM) of the public model's width; no such encoder
    # installs offline, so a stand-in: another public model (trained by a demo with another seed), whose
    # hidden basis is as unrelated to this public model's as GritLM's is to OLMo-2's
    "independent encoder (--encoder)": ["domain_encoder={encoder}"],
}
NEEDS_ENCODER = {name for name, overrides in CONFIGS.items() if any("{encoder}" in o for o in overrides)}
ROUTER_ITERS = {"tiny": 40, "full": 60}  # router tuning length of the demo before calibration (2026-12-02)
OWNERS = ("python", "cpp", "licenses")


def gate_checks(results: dict, row: str) -> int:
    """How many owners' experts have the largest mean gate weight (of the owners' experts) on their domain."""
    names, routing = results["expert_names"], results["routing"][row]
    return sum(routing[o][names.index(o)] > max(w for n, w in zip(names, routing[o]) if n not in ("public", o))
               for o in OWNERS)


def efficiency(losses: dict, oracle: dict, row: str) -> float:
    public = sum(losses["public model"].values())
    gain = public - sum(oracle.values())
    return (public - sum(losses[row].values())) / gain if gain > 0 else float("nan")


def public_text_change(losses: dict) -> float:
    """Relative loss change of the final model on public text (the paper keeps general-task quality)."""
    return losses["final, after the router step"]["public"] / losses["public model"]["public"] - 1


def summarize(results: dict) -> dict:
    """The figures of one demo's ``results.json`` that the ablation table reports."""
    losses, oracle = results["losses"], results["oracle"]
    return {"merged": efficiency(losses, oracle, "merged, before the router step"),
            "final": efficiency(losses, oracle, "final, after the router step"),
            "checks": sum(ok for _, ok in results["checks"]), "of": len(results["checks"]),
            "gates merged": gate_checks(results, "merged, before the router step"),
            "gates final": gate_checks(results, "final, after the router step"),
            "public text": public_text_change(losses), "seconds": results["total_seconds"]}


def row(name: str, seed: int, r: dict) -> str:
    return (f"| {name} | {seed} | {100 * r['merged']:.0f}% / {100 * r['final']:.0f}% | "
            f"{r['gates merged']} / {r['gates final']} | {100 * r['public text']:+.1f}% | {r['checks']} / {r['of']} |")


def run(size: str, seed: int, name: str, root: Path, encoder: Path | None = None) -> dict:
    overrides = CONFIGS[name]
    workdir = root / f"{size}-s{seed}-{list(CONFIGS).index(name)}"
    argv = [sys.executable, "-m", "flexolmo_plugin", "demo", "--size", size, "--seed", str(seed), "--workdir",
            str(workdir), "--quiet",
            *[a for o in overrides for a in ("--set", o.format(router_iters=ROUTER_ITERS[size], encoder=encoder))]]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"demo failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return summarize(json.loads((workdir / "eval" / "results.json").read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=["tiny", "full"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="*", default=None, choices=list(CONFIGS), metavar="NAME",
                        help="names of CONFIGS to run (default: all; those marked --encoder only with --encoder)")
    parser.add_argument("--encoder", type=Path, default=None, metavar="DIR",
                        help="local encoder of the demo size's width for the 'independent encoder' configuration, "
                             "e.g. DEMO_DIR/coordinator/public-hf of a demo run with another seed")
    parser.add_argument("--read", nargs="+", type=Path, default=[], metavar="DEMO_DIR",
                        help="also report these finished demos (e.g. the defaults' runs), labelled by folder name")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep every demo's folder under this directory (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.configs is None:
        args.configs = [name for name in CONFIGS if args.encoder or name not in NEEDS_ENCODER]
    if not args.encoder and NEEDS_ENCODER & set(args.configs):
        parser.error(f"{', '.join(sorted(NEEDS_ENCODER & set(args.configs)))}: needs --encoder DIR")
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    lines = [f"## Composition ablation (`--size {args.size}`, seeds {', '.join(map(str, args.seeds))}) — "
             f"`benchmarks/ablation_composition.py`", "", f"Run {started}; one demo per configuration and seed. "
             "Efficiency = (public − model) / (public − oracle), mean over the four domains; router step off = "
             "the merged model before the router step (alignment and/or LM router tuning).", "",
             "Gate checks: owners whose expert has the largest mean gate weight of the owners' experts on their "
             "own domain (of 3).", "",
             "| configuration | seed | efficiency, router step off / on | gate checks, router step off / on | "
             "public text (final vs public model) | checks passed (final) |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="flexolmo-ablation-") as tmp:
        root = args.keep or Path(tmp)
        for folder in args.read:
            results = json.loads((folder / "eval" / "results.json").read_text())
            lines.append(row(f"finished demo {folder.name}", results["seed"], summarize(results)))
            print(lines[-1], flush=True)
        for name in args.configs:
            for seed in args.seeds:
                lines.append(row(name, seed, run(args.size, seed, name, root, args.encoder)))
                print(lines[-1], flush=True)
    partial = args.out.with_name(args.out.name + ".partial")
    partial.write_text("\n".join(lines) + "\n")
    partial.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
