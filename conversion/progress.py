"""Progress bars and end-of-run reports shared by every tool that streams tensors to an output
(conversion, upcycle, merge, opt-out)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


@dataclass(frozen=True)
class ConversionReport:
    tensors: int
    bytes: int
    seconds: float
    output: Path

    @property
    def throughput_mb_s(self) -> float:
        return self.bytes / 2**20 / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        return (f"{self.tensors} tensors, {self.bytes / 2**20:.1f} MiB in {self.seconds:.1f} s "
                f"({self.throughput_mb_s:.1f} MiB/s) -> {self.output}")


class ProgressMeter:
    def __init__(self, total_bytes: int, enabled: bool, label: str):
        self.bar = None
        if enabled:

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=label)
        self.tensors = 0
        self.bytes = 0

    def __call__(self, name: str, nbytes: int) -> None:
        self.tensors += 1
        self.bytes += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
