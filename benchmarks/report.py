"""Shared pieces of the benchmark reports: the machine line, the load line, writing a section.

Every benchmark script writes its own markdown section (``--markdown OUT``) so that
``benchmarks/run_all.py`` can regenerate docs/benchmarks.md from measurements alone; these helpers
keep the conditions they state (machine, versions, load) worded the same way everywhere.
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable
from importlib import metadata
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.0f} GiB"
    except OSError:
        pass
    return "unknown"


def gpu_name() -> str:
    """The first CUDA device's name, or "none" (asked in a way that never initialises CUDA here)."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20)
            names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
            if out.returncode == 0 and names:
                return f"{len(names)} x {names[0]}"
        except (OSError, subprocess.SubprocessError):
            pass
    return "none"


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_line() -> str:
    return (f"{cpu_model()}, {os.cpu_count()} cores, {ram_gib()} RAM, GPU: {gpu_name()}; "
            f"Python {platform.python_version()}, torch {version('torch')}, "
            f"megatron-core {version('megatron-core')}")


def load() -> str:
    """1/5/15-minute load averages: other jobs on the machine slow every timing down."""
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def load_note(before: str, after: str) -> str:
    cores = os.cpu_count() or 1
    try:
        busy = max(float(before.split("/")[0]), float(after.split("/")[0])) > 0.5 * cores
    except ValueError:
        busy = False
    text = f"load average (1/5/15 min) {before} at the start, {after} at the end"
    return text + (f" -- other jobs were running on these {cores} cores, so times are slower than on an idle "
                   "machine" if busy else "")


def write_section(path: Path | None, lines: list[str]) -> None:
    text = "\n".join(lines).rstrip() + "\n"
    print(text)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def parse_arguments(description: str, sizes: tuple[tuple[str, int], ...], quick: dict, *, quick_help: str,
                    extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The command line every benchmark script takes: its integer sizes (``--NAME``), ``--markdown OUT``
    (its section for run_all) and ``--quick`` (the ``quick`` sizes: a smoke test that measures nothing)."""
    parser = argparse.ArgumentParser(description=description)
    for name, default in sizes:
        parser.add_argument(f"--{name}", type=int, default=default)
    if extra is not None:
        extra(parser)
    parser.add_argument("--markdown", type=Path, default=None, help="write this benchmark's section here")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    args = parser.parse_args()
    if args.quick:
        vars(args).update(quick)
    return args
