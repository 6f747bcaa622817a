"""DirectFile: the bytes on disk are exactly what was written, whatever the piece sizes, with or
without O_DIRECT; errors in background writes surface; existing files are never touched."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from flexolmo_plugin.conversion.direct_io import (
    ALIGN,
    DirectFile,
    Staging,
    direct_io_enabled,
)

ROOT = Path(__file__).resolve().parents[2]

# sizes around every boundary the writer cares about: block alignment and the staging buffer size
SMALL_BUFFER = 2 * ALIGN
PIECES = [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, SMALL_BUFFER - 1, SMALL_BUFFER, SMALL_BUFFER + 1, 3 * SMALL_BUFFER + 7,
          5, 10 * SMALL_BUFFER, 13]


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("cut", range(0, len(PIECES) + 1, 3))
def test_bytes_and_positions_match_a_plain_file(tmp_path, direct, cut):
    generator = torch.Generator().manual_seed(cut)
    pieces = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=generator).numpy().tobytes()
              for n in PIECES[:cut] + PIECES[cut:][::-1]]
    staging = Staging(buffer_bytes=SMALL_BUFFER, buffers=2, io_threads=2)
    try:
        with DirectFile(tmp_path / "out.bin", staging, direct=direct) as f:
            expected_positions = []
            positions = []
            total = 0
            for piece in pieces:
                assert f.write(memoryview(piece)) == len(piece)
                total += len(piece)
                expected_positions.append(total)
                positions.append(f.tell())
        assert positions == expected_positions
    finally:
        staging.close()
    assert (tmp_path / "out.bin").read_bytes() == b"".join(pieces)


def test_torch_save_stream_round_trips(tmp_path):
    """The converters torch.save chunks into a DirectFile; each record must load back exactly."""
    tensors = [torch.randn(3, 1000), torch.arange(17, dtype=torch.int64), torch.randn(257).to(torch.bfloat16)]
    staging = Staging()
    offsets = []
    try:
        with DirectFile(tmp_path / "chunks.bin", staging) as f:
            for t in tensors:
                start = f.tell()
                torch.save(t, f)
                offsets.append((start, f.tell()))
    finally:
        staging.close()
    data = (tmp_path / "chunks.bin").read_bytes()
    assert offsets[-1][1] == len(data)
    for t, (start, end) in zip(tensors, offsets):
        loaded = torch.load(io.BytesIO(data[start:end]), weights_only=True)
        assert loaded.dtype == t.dtype and torch.equal(loaded, t)


def test_existing_file_is_refused_and_kept(tmp_path):
    target = tmp_path / "keep.bin"
    target.write_bytes(b"precious")
    staging = Staging()
    try:
        with pytest.raises(FileExistsError):
            DirectFile(target, staging)
    finally:
        staging.close()
    assert target.read_bytes() == b"precious"


def test_switch_turns_direct_writes_off(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXOLMO_DIRECT_IO", "0")
    assert not direct_io_enabled()
    staging = Staging()
    try:
        with DirectFile(tmp_path / "a.bin", staging) as f:
            assert not f.direct
            f.write(b"abc")
    finally:
        staging.close()
    assert (tmp_path / "a.bin").read_bytes() == b"abc"


def test_write_after_close_is_an_error(tmp_path):
    staging = Staging()
    try:
        f = DirectFile(tmp_path / "a.bin", staging)
        f.close()
        with pytest.raises(ValueError, match="closed"):
            f.write(b"x")
    finally:
        staging.close()


@pytest.mark.parametrize("direct", [True, False])
def test_background_write_error_surfaces(tmp_path, direct):
    """A real I/O error in an I/O thread (file-size limit: EFBIG) is raised to the writer, not lost."""
    script = textwrap.dedent(f"""
        import errno, resource, signal, sys
        from flexolmo_plugin.conversion.direct_io import DirectFile, Staging
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
        staging = Staging(buffer_bytes=1 << 18, buffers=2)
        try:
            with DirectFile({str(tmp_path / "big.bin")!r}, staging, direct={direct}) as f:
                for _ in range(32):
                    f.write(bytes(1 << 18))
        except OSError as error:
            print("raised", errno.errorcode[error.errno])
        else:
            print("no error")
        finally:
            staging.close()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "raised EFBIG"
