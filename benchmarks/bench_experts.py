"""Expert-package, merge and opt-out benchmark: time and peak memory vs model size.

For each size: a synthetic 2-expert anchor checkpoint (bf16) is converted from HF; its expert is
packaged twice (as two owners); the packages are merged onto the anchor (3 experts); one owner is
opted out again.  Each step runs in a fresh process reporting wall time and peak RSS (VmHWM); the
baseline is a raw copy of the merged checkpoint on the same disk.  Fastest of --repeats runs.

    .venv/bin/python -m benchmarks.bench_experts [--layers 16 32] [--repeats 2] [--markdown OUT] [--quick]

``--markdown`` writes its section of docs/benchmarks.md; ``--quick`` runs a tiny model in this process
(a smoke test of the report: no memory figures, no verdict).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_conversion import (
    QUICK,
    convert,
    make_checkpoint,
    mib,
    raw_copy,
    warm,
)
from benchmarks.report import load, load_note, write_section

TITLE = "## Expert packages, merge, opt-out (issue 5) — `benchmarks/bench_experts.py`"

CHILD = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
import flexolmo_plugin.model.parallel as d
from flexolmo_plugin.lifecycle.package import package_expert
from flexolmo_plugin.lifecycle.merge import merge_experts
from flexolmo_plugin.lifecycle.opt_out import opt_out
from flexolmo_plugin import compat
compat.enable_cpu_compat()  # a benchmark is an entry point: CPU shims where CUDA is absent
d.ensure_model_parallel()
op, args = sys.argv[1], sys.argv[2:]
base = rss("VmRSS:")
start = time.perf_counter()
if op == "package":
    package_expert(args[0], args[1], name=args[2], expert=int(args[3]))
elif op == "merge":
    merge_experts(args[0], args[1:-1], args[-1])
else:
    opt_out(args[0], args[1], drop=[args[2]])
print(json.dumps({"seconds": time.perf_counter() - start, "baseline_rss": base, "peak_rss": rss("VmHWM:")}))
"""


def run(op: str, *args, in_process: bool = False) -> dict:
    if in_process:  # --quick
        from flexolmo_plugin.lifecycle.merge import merge_experts
        from flexolmo_plugin.lifecycle.opt_out import opt_out
        from flexolmo_plugin.lifecycle.package import package_expert

        start = time.perf_counter()
        if op == "package":
            package_expert(args[0], args[1], name=args[2], expert=int(args[3]))
        elif op == "merge":
            merge_experts(args[0], list(args[1:-1]), args[-1])
        else:
            opt_out(args[0], args[1], drop=[args[2]])
        return {"seconds": time.perf_counter() - start, "baseline_rss": None, "peak_rss": None}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, op, *map(str, args)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def section(rows: list[dict], conditions: dict) -> list[str]:
    lines = [TITLE, "", f"Conditions: {conditions['when']}; {conditions['load']}. A synthetic 3-expert model "
             f"(bf16; {conditions['shape']}) converted from HF; its experts 1 and 2 packaged as two owners, "
             f"merged onto its public expert (3 experts), one owner opted out. {conditions['process']}, fastest "
             f"of {conditions['repeats']} runs; raw copy = `copytree` + `sync` of the merged checkpoint. Every "
             "step's input checkpoints (and the copy's) are read once just before it runs, so all start from the "
             "page cache; the steps write past the page cache (`O_DIRECT`) where the file system allows it, the "
             "copy through it.", "",
             "| step | merged model size | time | raw copy of merged | speed vs copy | peak RSS | RSS after imports | "
             "peak − imports |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        over = None if r["peak_rss"] is None else r["peak_rss"] - r["baseline_rss"]
        lines.append(
            f"| {r['op']} (L={r['layers']}) | {mib(r['merged_bytes'])} | {r['seconds']:.2f} s | "
            f"{r['copy_seconds']:.2f} s | {100 * r['copy_seconds'] / r['seconds']:.0f}% | {mib(r['peak_rss'])} | "
            f"{mib(r['baseline_rss'])} | {mib(over)} |"
        )
    if conditions["quick"]:
        return lines + ["", "* Quick mode (a smoke test of the report on a tiny model): no verdict."]
    lines.append("")
    for op in dict.fromkeys(r["op"] for r in rows):
        mine = sorted((r for r in rows if r["op"] == op), key=lambda r: r["merged_bytes"])
        overs = [r["peak_rss"] - r["baseline_rss"] for r in mine]
        budget = 3 * max(r["largest"] for r in mine) + 300 * 2**20
        lines.append(
            f"* {op}: peak above imports {', '.join(mib(o) for o in overs)} for "
            f"{', '.join(mib(r['merged_bytes']) for r in mine)} merged models -- "
            f"{'within' if max(overs) <= budget else 'above'} 3 × largest tensor + 300 MiB ({mib(budget)}); "
            f"{min(100 * r['copy_seconds'] / r['seconds'] for r in mine):.0f}–"
            f"{max(100 * r['copy_seconds'] / r['seconds'] for r in mine):.0f}% of the raw copy's speed."
        )
    return lines


def main() -> None:
    from flexolmo_plugin import compat

    compat.enable_cpu_compat()  # a benchmark is an entry point: CPU shims where CUDA is absent
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--layers", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--markdown", type=Path, default=None, help="write this benchmark's section here")
    parser.add_argument("--quick", action="store_true", help="tiny model, in-process, one run (a smoke test)")
    args = parser.parse_args()
    shape = QUICK if args.quick else {}
    layers_list = args.layers or ([2] if args.quick else [16, 32])
    repeats = 1 if args.quick else args.repeats
    quick = args.quick
    load_before = load()
    work = Path(tempfile.mkdtemp(dir=args.workdir, prefix="flexolmo-bench-experts-"))
    rows = []
    try:
        for layers in layers_list:
            case = work / f"L{layers}"
            # three experts: the owners' packages must differ (merge refuses the same expert twice)
            info = make_checkpoint(case / "hf", layers, num_experts=3, **shape)
            convert("hf-to-mcore", case / "hf", case / "anchor", quick)
            shutil.rmtree(case / "hf")
            timings: dict[str, list[dict]] = {"package": [], "merge": [], "opt-out": []}
            copies = []
            for i in range(repeats):
                for expert, owner in ((1, "a"), (2, "b")):
                    warm(case / "anchor")
                    result = run("package", case / "anchor", case / f"pkg_{owner}{i}", owner, expert,
                                 in_process=quick)
                    if owner == "a":
                        timings["package"].append(result)
                for source in ("anchor", f"pkg_a{i}", f"pkg_b{i}"):
                    warm(case / source)
                timings["merge"].append(
                    run(
                        "merge",
                        case / "anchor",
                        case / f"pkg_a{i}",
                        case / f"pkg_b{i}",
                        case / f"merged{i}",
                        in_process=quick,
                    )
                )
                warm(case / f"merged{i}")
                timings["opt-out"].append(
                    run("opt-out", case / f"merged{i}", case / f"opted{i}", "b", in_process=quick)
                )
                copies.append(raw_copy(case / f"merged{i}", case / f"copy{i}"))
                merged_bytes = dir_bytes(case / f"merged{i}")
                for name in (f"pkg_a{i}", f"pkg_b{i}", f"merged{i}", f"opted{i}", f"copy{i}"):
                    shutil.rmtree(case / name)
            copy_s = min(copies)
            for op, results in timings.items():
                best = min(results, key=lambda r: r["seconds"])
                rows.append(
                    {
                        "op": op,
                        "layers": layers,
                        "merged_bytes": merged_bytes,
                        "seconds": best["seconds"],
                        "copy_seconds": copy_s,
                        "peak_rss": None if quick else max(r["peak_rss"] for r in results),
                        "baseline_rss": best["baseline_rss"],
                        "largest": info["largest_tensor"],
                    }
                )
            shutil.rmtree(case)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    dims = {"hidden": 1024, "intermediate": 2816, "vocab": 32000, **shape}
    conditions = {
        "when": f"{time.strftime('%Y-%m-%d')}, `OMP_NUM_THREADS=1`",
        "load": load_note(load_before, load()),
        "shape": f"hidden {dims['hidden']}, FFN {dims['intermediate']}, vocab {dims['vocab']}; "
        f"{' and '.join(map(str, layers_list))} layers",
        "process": "Every step in this process (quick mode)" if quick else "Fresh process per step",
        "repeats": repeats,
        "quick": quick,
    }
    write_section(args.markdown, section(rows, conditions))


if __name__ == "__main__":
    main()
