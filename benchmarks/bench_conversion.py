"""Conversion benchmark: throughput vs a raw copy, and peak memory vs tensor and model size.

For each model size: write a synthetic HF FlexOlmo checkpoint (bf16, random weights, generated one
tensor at a time), then in fresh processes convert HF -> Megatron and Megatron -> HF, recording wall
time and peak RSS (VmHWM), and copy the HF files on the same disk as the throughput baseline.  Each
measurement is repeated (--repeats) and the fastest run is reported, for the copy and the conversions
alike, because single runs on a shared virtual disk vary by up to 2x.

    .venv/bin/python -m benchmarks.bench_conversion [--workdir DIR] [--layers 12 26] [--json OUT] [--markdown OUT]

Prints (and with ``--markdown`` writes) its section of docs/benchmarks.md: table, conditions, verdict.
``--quick`` converts a tiny model in this process (seconds; peak memory then not measured) -- for the
test that checks ``benchmarks/run_all.py`` end to end, not for numbers.
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

from benchmarks.report import load, load_note, write_section

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, EXPERTS, VOCAB = 1024, 2816, 16, 4, 4, 32000
QUICK = dict(hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=256)
TITLE = "## Checkpoint conversion (issue 3) — `benchmarks/bench_conversion.py`"

CHILD = r"""
import json, os, sys, time
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
import torch, warnings
warnings.filterwarnings("ignore")
t0 = time.perf_counter()
from flexolmo_plugin.conversion.convert import hf_to_mcore, mcore_to_hf
import flexolmo_plugin.model.parallel as d
import flexolmo_plugin.model, megatron.core.dist_checkpointing  # imported lazily by the converters
from flexolmo_plugin import compat
compat.enable_cpu_compat()  # a benchmark is an entry point: CPU shims where CUDA is absent
d.ensure_model_parallel()
imports = time.perf_counter() - t0
base = rss("VmRSS:")
start = time.perf_counter()
if sys.argv[1] == "hf-to-mcore":
    report = hf_to_mcore(sys.argv[2], sys.argv[3])
else:
    report = mcore_to_hf(sys.argv[2], sys.argv[3])
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "bytes": report.bytes, "baseline_rss": base, "peak_rss": rss("VmHWM:"),
                  "import_seconds": imports}))
"""


def make_checkpoint(directory: Path, layers: int, seed: int = 0, num_experts: int = EXPERTS, *,
                    hidden: int = HIDDEN, intermediate: int = INTERMEDIATE, heads: int = HEADS,
                    kv_heads: int = KV_HEADS, vocab: int = VOCAB) -> dict:
    import torch

    from flexolmo_plugin.conversion.mapping import hf_shapes
    from flexolmo_plugin.conversion.safetensors_writer import ShardedSafetensorsWriter
    from flexolmo_plugin.model.config import FlexOlmoConfig

    config = FlexOlmoConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=kv_heads, num_experts=num_experts, top_k=2)
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


def convert(direction: str, src: Path, dst: Path, in_process: bool = False) -> dict:
    warm(src)
    if in_process:  # --quick: no fresh process, so no memory figures
        from flexolmo_plugin.conversion.convert import hf_to_mcore, mcore_to_hf

        start = time.perf_counter()
        report = (hf_to_mcore if direction == "hf-to-mcore" else mcore_to_hf)(src, dst)
        return {"seconds": time.perf_counter() - start, "bytes": report.bytes, "baseline_rss": None, "peak_rss": None,
                "import_seconds": None}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, direction, str(src), str(dst)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def warm(directory: Path) -> None:
    """Read every file of ``directory`` so that each timed run starts with its source in the page
    cache: the copy and both conversions then start from the same state (the converters write past
    the page cache, so a just-converted checkpoint would otherwise be read back from disk)."""
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(64 * 2**20):
                    pass


def raw_copy(src: Path, dst: Path) -> float:
    warm(src)
    start = time.perf_counter()
    shutil.copytree(src, dst)
    os.sync()
    return time.perf_counter() - start


def direct_copy(src: Path, dst: Path) -> float:
    """A second baseline: the same files copied with the converters' own writer (``O_DIRECT``
    where allowed), each file fsynced -- what a converter doing no conversion at all would take."""
    from flexolmo_plugin.conversion.atomic import fsync_path
    from flexolmo_plugin.conversion.direct_io import DirectFile, Staging

    warm(src)
    start = time.perf_counter()
    staging = Staging()
    block = bytearray(8 * 2**20)
    try:
        dst.mkdir()
        for path in sorted(src.iterdir()):
            with open(path, "rb", buffering=0) as f, DirectFile(dst / path.name, staging) as out:
                while n := f.readinto(block):
                    out.write(memoryview(block)[:n])
            fsync_path(dst / path.name)
        fsync_path(dst)
    finally:
        staging.close()
    return time.perf_counter() - start


def direct_io_note(directory: Path) -> str:
    """Whether the converters' writes bypassed the page cache on this file system, as measured."""
    from flexolmo_plugin.conversion.direct_io import DirectFile, Staging

    staging = Staging()
    probe = Path(tempfile.mkdtemp(dir=directory, prefix="flexolmo-probe-"))
    try:
        with DirectFile(probe / "probe", staging) as f:
            f.write(b"x")
        direct = f.direct  # known once the (padded) block was written, at close
    finally:
        staging.close()
        shutil.rmtree(probe, ignore_errors=True)
    return "used on this file system" if direct else "refused by this file system, so buffered writes were used"


def mib(n: float | None) -> str:
    return "not measured" if n is None else f"{n / 2**20:,.0f} MiB"


def section(rows: list[dict], conditions: dict) -> list[str]:
    """The docs/benchmarks.md section: table, conditions and the verdict, all from the measurements."""
    lines = [TITLE, "", f"Conditions: {conditions['when']}; {conditions['load']}. Synthetic FlexOlmo checkpoints "
             f"in bf16 ({conditions['shape']}); each conversion {conditions['process']}; \"RSS after imports\" is "
             "the resident size once torch, megatron-core and the converter's modules are imported (their import "
             f"time, {conditions['imports']}, is not in the conversion time); \"peak\" is VmHWM. Conversion times "
             f"and the raw copy (`shutil.copytree` of the same HF files on the same disk + one `sync`, as the "
             f"conversions end with every output file fsynced) are the fastest of {conditions['repeats']} runs, "
             "interleaved; before each run its source files are read once, so the copy and both conversions "
             "start with their source in the page cache. The copy writes through the page cache; the "
             f"converters write past it (`O_DIRECT`, {conditions['direct']}).", "",
             "Column \"vs writer-only copy\" (not the target's baseline) compares with the same files copied "
             "through the converters' own writer (`O_DIRECT` where allowed, every file fsynced; its time in "
             "brackets), fastest of the same runs.", "",
             "| direction | model size | largest tensor | time | raw copy | throughput vs copy | vs writer-only copy | "
             "peak RSS | "
             "RSS after imports | peak − imports | 3×largest + 300 MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        budget = 3 * r["largest_tensor"] + 300 * 2**20
        over = None if r["peak_rss"] is None else r["peak_rss"] - r["baseline_rss"]
        lines.append(f"| {r['direction']} | {mib(r['model_bytes'])} | {mib(r['largest_tensor'])} | "
                     f"{r['seconds']:.2f} s | {r['copy_seconds']:.2f} s | {100 * r['throughput_vs_copy']:.0f}% | "
                     f"{100 * r['direct_copy_seconds'] / r['seconds']:.0f}% ({r['direct_copy_seconds']:.2f} s) | "
                     f"{mib(r['peak_rss'])} | {mib(r['baseline_rss'])} | {mib(over)} | {mib(budget)} |")
    worst = min(r["throughput_vs_copy"] for r in rows)
    if conditions["quick"]:
        return lines + ["", "* Quick mode (a smoke test of the report on a tiny model): no verdict."]
    lines += ["", f"* **Throughput: {'met' if worst >= 0.6 else 'not met'}** (target ≥ 60% of the raw copy; "
              f"measured {100 * worst:.0f}–{100 * max(r['throughput_vs_copy'] for r in rows):.0f}%)."]
    if all(r["peak_rss"] is not None for r in rows):
        overs = {(r["direction"], r["model_bytes"]): r["peak_rss"] - r["baseline_rss"] for r in rows}
        within = all(r["peak_rss"] - r["baseline_rss"] <= 3 * r["largest_tensor"] + 300 * 2**20 for r in rows)
        growth = []
        for direction in dict.fromkeys(r["direction"] for r in rows):
            sizes = sorted((b, v) for (d, b), v in overs.items() if d == direction)
            if len(sizes) > 1:
                growth.append(f"{direction} {(sizes[-1][1] - sizes[0][1]) / 2**20:+.0f} MiB from "
                              f"{mib(sizes[0][0])} to {mib(sizes[-1][0])}")
        lines.append(f"* **Memory above the import baseline: {'met' if within else 'not met'}** (≤ 3 × largest "
                     f"tensor + 300 MiB){'; growth with model size: ' + ', '.join(growth) if growth else ''}.")
    else:
        lines.append("* Memory: not measured (quick mode converts in this process).")
    return lines


def main() -> None:
    from flexolmo_plugin import compat

    compat.enable_cpu_compat()  # a benchmark is an entry point: CPU shims where CUDA is absent
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--layers", type=int, nargs="+", default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", type=Path, default=None, help="write this benchmark's section here")
    parser.add_argument("--quick", action="store_true", help="tiny model, in-process, one run (a smoke test)")
    args = parser.parse_args()
    shape = QUICK if args.quick else {}
    layers_list = args.layers or ([2] if args.quick else [12, 26])
    repeats = 1 if args.quick else args.repeats
    load_before = load()
    work = Path(tempfile.mkdtemp(dir=args.workdir, prefix="flexolmo-bench-"))
    rows, imports = [], []
    try:
        for layers in layers_list:
            case = work / f"L{layers}"
            info = make_checkpoint(case / "hf", layers, **shape)
            copies, direct_copies, to_mcores, to_hfs = [], [], [], []
            for i in range(repeats):
                copies.append(raw_copy(case / "hf", case / f"copy{i}"))
                shutil.rmtree(case / f"copy{i}")
                direct_copies.append(direct_copy(case / "hf", case / f"dcopy{i}"))
                shutil.rmtree(case / f"dcopy{i}")
                to_mcores.append(convert("hf-to-mcore", case / "hf", case / f"mcore{i}", args.quick))
                to_hfs.append(convert("mcore-to-hf", case / f"mcore{i}", case / f"back{i}", args.quick))
                shutil.rmtree(case / f"mcore{i}")
                shutil.rmtree(case / f"back{i}")
            copy_s = min(copies)
            imports += [r["import_seconds"] for r in to_mcores + to_hfs if r["import_seconds"] is not None]
            fastest = lambda runs: min(runs, key=lambda r: r["seconds"])  # noqa: E731, B023
            peak = lambda runs: None if args.quick else max(r["peak_rss"] for r in runs)  # noqa: E731
            for direction, runs in (("HF → Megatron", to_mcores), ("Megatron → HF", to_hfs)):
                result = fastest(runs)
                rows.append({
                    "direction": direction, "model_bytes": info["bytes"], "largest_tensor": info["largest_tensor"],
                    "seconds": result["seconds"], "copy_seconds": copy_s, "direct_copy_seconds": min(direct_copies),
                    "throughput_vs_copy": copy_s / result["seconds"],
                    "peak_rss": peak(runs), "baseline_rss": result["baseline_rss"],
                })
            shutil.rmtree(case)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    dims = {"hidden": HIDDEN, "intermediate": INTERMEDIATE, "heads": HEADS, "kv_heads": KV_HEADS, "vocab": VOCAB,
            **shape}
    conditions = {
        "when": f"{time.strftime('%Y-%m-%d')}, `OMP_NUM_THREADS=1`",
        "load": load_note(load_before, load()),
        "shape": f"hidden {dims['hidden']}, FFN {dims['intermediate']}, {dims['heads']} heads / {dims['kv_heads']} KV "
        f"heads, {EXPERTS} experts, vocab {dims['vocab']}; {' and '.join(map(str, layers_list))} layers",
        "process": "runs in this process (quick mode)" if args.quick else "runs in a fresh process",
        "imports": f"{min(imports):.1f}–{max(imports):.1f} s" if imports else "not measured",
        "repeats": repeats,
        "quick": args.quick,
        "direct": direct_io_note(work.parent),
    }
    write_section(args.markdown, section(rows, conditions))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
