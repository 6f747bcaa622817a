"""benchmarks/run_all.py end to end on tiny sizes: every section, the date and the machine line.

Runs the real benchmark scripts (in --quick mode: tiny models, a step or two) and writes to a temporary
file -- never to docs/benchmarks.md, which only a full run may rewrite.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _benchmarks() -> list[list[str]]:
    """``benchmarks.run_all.BENCHMARKS``, read in a child run from the repository root (the way run_all itself
    runs: under importlib mode the repository root is not importable from the test process)."""
    code = "import json; from benchmarks.run_all import BENCHMARKS; print(json.dumps(BENCHMARKS))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def test_run_all_quick_writes_every_section_with_date_and_machine(tmp_path):
    docs = ROOT / "docs" / "benchmarks.md"
    before = docs.read_bytes() if docs.exists() else None
    out = tmp_path / "benchmarks.md"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = out.read_text()
    for script, _ in _benchmarks():
        headers = [line for line in text.splitlines() if line.startswith("## ") and f"`benchmarks/{script}`" in line]
        assert headers, f"no section for {script}"
        if script != "bench_gpu.py":  # the GPU one legitimately says "not measured" without CUDA
            assert "benchmark failed" not in text.split(headers[0], 1)[1].split("\n## ", 1)[0], script
    assert time.strftime("%Y-%m-%d") in text
    machine = next(line for line in text.splitlines() if line.startswith("Machine: "))
    for field in ("cores", "RAM", "GPU:", "Python", "torch", "megatron-core"):
        assert field in machine
    assert "P1: FlexOlmo MoE layer vs Megatron's stock MoE layer" in text
    assert (docs.read_bytes() if docs.exists() else None) == before


def test_run_all_refuses_quick_results_in_the_real_document():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "--out" in proc.stderr
