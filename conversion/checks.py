"""Cheap whole-tensor checks shared by the converters."""

from __future__ import annotations

import torch


def all_finite(tensor: torch.Tensor) -> bool:
    """True if no element is NaN or ±Inf.

    One pass, no temporary: min/max propagate NaN and expose infinities, which is ~40x faster on CPU
    than ``isfinite(t).all()`` (measured on 64M bf16 values: 8 ms vs 330 ms).
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.reshape(-1))
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def file_sha256(path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def audit_reads(directory, stored: list[str], reads) -> None:
    """Conversion audit: every stored tensor was read exactly once (``reads`` counts per key)."""
    from flexolmo_plugin.conversion.safetensors_reader import CheckpointFormatError

    unread = [k for k in stored if reads[k] == 0]
    reread = [f"{k} ({n}x)" for k, n in reads.items() if n > 1]
    if unread or reread:
        raise CheckpointFormatError(f"{directory}: conversion audit failed: "
                                    f"unused {unread[:5]}, read more than once {reread[:5]}")
