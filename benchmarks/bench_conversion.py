"""Conversion benchmark: throughput vs a raw copy, and peak memory vs tensor and model size.

For each model size: write a synthetic HF FlexOlmo checkpoint (bf16, random weights, generated one
tensor at a time), then in fresh processes convert HF -> Megatron and Megatron -> HF, recording wall
time and peak RSS (VmHWM), and copy the HF files on the same disk as the throughput baseline.  Each
measurement is repeated (--repeats) and the fastest run is reported, for the copy and the conversions
alike, because single runs on a shared virtual disk vary by up to 2x.

    .venv/bin/python benchmarks/bench_conversion.py [--workdir DIR] [--layers 12 26] [--json OUT]

Prints a Markdown table (the rows of docs/benchmarks.md).
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, EXPERTS, VOCAB = 1024, 2816, 16, 4, 4, 32000

CHILD = r"""
import json, os, sys, time
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
import torch, warnings
warnings.filterwarnings("ignore")
from conversion.convert import hf_to_mcore, mcore_to_hf
import flexolmo_plugin.distributed as d
d.ensure_model_parallel()
base = rss("VmRSS:")
start = time.perf_counter()
if sys.argv[1] == "hf-to-mcore":
    report = hf_to_mcore(sys.argv[2], sys.argv[3])
else:
    report = mcore_to_hf(sys.argv[2], sys.argv[3])
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "bytes": report.bytes, "baseline_rss": base, "peak_rss": rss("VmHWM:")}))
"""


def make_checkpoint(directory: Path, layers: int, seed: int = 0, num_experts: int = EXPERTS) -> dict:
    import torch

    from conversion.mapping import hf_shapes
    from conversion.safetensors_writer import ShardedSafetensorsWriter
    from flexolmo_plugin.config import FlexOlmoConfig

    config = FlexOlmoConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_layers=layers,
                            num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, num_experts=num_experts, top_k=2)
    shapes = hf_shapes(config)
    directory.mkdir(parents=True)
    plan = [(name, torch.bfloat16, shape) for name, shape in shapes.items()]
    writer = ShardedSafetensorsWriter(directory, plan, max_shard_bytes=1 << 30)
    generator = torch.Generator().manual_seed(seed)
    largest = 0
    for name, shape in shapes.items():
        tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        largest = max(largest, tensor.numel() * 2)
        writer.write(name, tensor)
    writer.close()
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict()))
    return {"bytes": writer.total_bytes, "largest_tensor": largest, "layers": layers}


def convert(direction: str, src: Path, dst: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", CHILD, direction, str(src), str(dst)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def raw_copy(src: Path, dst: Path) -> float:
    start = time.perf_counter()
    shutil.copytree(src, dst)
    os.sync()
    return time.perf_counter() - start


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 26])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.workdir, prefix="flexolmo-bench-"))
    rows = []
    try:
        for layers in args.layers:
            case = work / f"L{layers}"
            info = make_checkpoint(case / "hf", layers)
            copies, to_mcores, to_hfs = [], [], []
            for i in range(args.repeats):
                copies.append(raw_copy(case / "hf", case / f"copy{i}"))
                shutil.rmtree(case / f"copy{i}")
                to_mcores.append(convert("hf-to-mcore", case / "hf", case / f"mcore{i}"))
                to_hfs.append(convert("mcore-to-hf", case / f"mcore{i}", case / f"back{i}"))
                if i:
                    shutil.rmtree(case / f"mcore{i}")
                shutil.rmtree(case / f"back{i}")
            copy_s = min(copies)
            fastest = lambda runs: min(runs, key=lambda r: r["seconds"])  # noqa: E731
            to_mcore = dict(fastest(to_mcores), peak_rss=max(r["peak_rss"] for r in to_mcores))
            to_hf = dict(fastest(to_hfs), peak_rss=max(r["peak_rss"] for r in to_hfs))
            for direction, result in (("HF → Megatron", to_mcore), ("Megatron → HF", to_hf)):
                rows.append({
                    "direction": direction, "model_bytes": info["bytes"], "largest_tensor": info["largest_tensor"],
                    "seconds": result["seconds"], "copy_seconds": copy_s,
                    "throughput_vs_copy": (info["bytes"] / result["seconds"]) / (info["bytes"] / copy_s),
                    "peak_rss": result["peak_rss"], "baseline_rss": result["baseline_rss"],
                })
            shutil.rmtree(case)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print("| direction | model size | largest tensor | time | raw copy | throughput vs copy | peak RSS | "
          "RSS after imports | peak − imports | 3×largest + 300 MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        budget = 3 * r["largest_tensor"] + 300 * 2**20
        print(f"| {r['direction']} | {mib(r['model_bytes'])} | {mib(r['largest_tensor'])} | {r['seconds']:.1f} s | "
              f"{r['copy_seconds']:.1f} s | {100 * r['throughput_vs_copy']:.0f}% | {mib(r['peak_rss'])} | "
              f"{mib(r['baseline_rss'])} | {mib(r['peak_rss'] - r['baseline_rss'])} | {mib(budget)} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
