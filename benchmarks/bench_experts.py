"""Expert-package, merge and opt-out benchmark: time and peak memory vs model size.

For each size: a synthetic 2-expert anchor checkpoint (bf16) is converted from HF; its expert is
packaged twice (as two owners); the packages are merged onto the anchor (3 experts); one owner is
opted out again.  Each step runs in a fresh process reporting wall time and peak RSS (VmHWM); the
baseline is a raw copy of the merged checkpoint on the same disk.  Fastest of --repeats runs.

    .venv/bin/python benchmarks/bench_experts.py [--layers 16 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_conversion import ROOT, convert, make_checkpoint, mib, raw_copy  # noqa: E402

CHILD = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
import flexolmo_plugin.distributed as d
from flexolmo_plugin.experts.package import package_expert
from flexolmo_plugin.experts.merge import merge_experts
from flexolmo_plugin.experts.opt_out import opt_out
d.ensure_model_parallel()
op, args = sys.argv[1], sys.argv[2:]
base = rss("VmRSS:")
start = time.perf_counter()
if op == "package":
    package_expert(args[0], args[1], name=args[2])
elif op == "merge":
    merge_experts(args[0], args[1:-1], args[-1])
else:
    opt_out(args[0], args[1], drop=[args[2]])
print(json.dumps({"seconds": time.perf_counter() - start, "baseline_rss": base, "peak_rss": rss("VmHWM:")}))
"""


def run(op: str, *args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", CHILD, op, *map(str, args)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--layers", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.workdir, prefix="flexolmo-bench-experts-"))
    rows = []
    try:
        for layers in args.layers:
            case = work / f"L{layers}"
            info = make_checkpoint(case / "hf", layers, num_experts=2)
            convert("hf-to-mcore", case / "hf", case / "anchor")
            shutil.rmtree(case / "hf")
            timings: dict[str, list[dict]] = {"package": [], "merge": [], "opt-out": []}
            copies = []
            for i in range(args.repeats):
                for owner in ("a", "b"):
                    result = run("package", case / "anchor", case / f"pkg_{owner}{i}", owner)
                    if owner == "a":
                        timings["package"].append(result)
                timings["merge"].append(run("merge", case / "anchor", case / f"pkg_a{i}", case / f"pkg_b{i}",
                                            case / f"merged{i}"))
                timings["opt-out"].append(run("opt-out", case / f"merged{i}", case / f"opted{i}", "b"))
                copies.append(raw_copy(case / f"merged{i}", case / f"copy{i}"))
                merged_bytes = dir_bytes(case / f"merged{i}")
                for name in (f"pkg_a{i}", f"pkg_b{i}", f"merged{i}", f"opted{i}", f"copy{i}"):
                    shutil.rmtree(case / name)
            copy_s = min(copies)
            for op, results in timings.items():
                best = min(results, key=lambda r: r["seconds"])
                rows.append({"op": op, "layers": layers, "merged_bytes": merged_bytes, "seconds": best["seconds"],
                             "copy_seconds": copy_s, "peak_rss": max(r["peak_rss"] for r in results),
                             "baseline_rss": best["baseline_rss"], "largest": info["largest_tensor"]})
            shutil.rmtree(case)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print("| step | merged model size | time | raw copy of merged | peak RSS | RSS after imports | peak − imports |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} (L={r['layers']}) | {mib(r['merged_bytes'])} | {r['seconds']:.1f} s | {r['copy_seconds']:.1f} s | "
              f"{mib(r['peak_rss'])} | {mib(r['baseline_rss'])} | {mib(r['peak_rss'] - r['baseline_rss'])} |")


if __name__ == "__main__":
    main()
