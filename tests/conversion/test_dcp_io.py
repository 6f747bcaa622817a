"""The fast checkpoint I/O of conversion.dcp_io: few files, direct chunk reads, zero-copy slices."""

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

import flexolmo_plugin as fp
from flexolmo_plugin.conversion.convert import hf_to_mcore
from flexolmo_plugin.conversion.dcp_io import ChunkReader, exact_storage
from tests.support import make_hf_model, save_hf_model


@pytest.fixture(autouse=True)
def _groups(megatron_single_process):
    yield


def _plain(directory):
    from megatron.core import dist_checkpointing

    return {k: v for k, v in dist_checkpointing.load_plain_tensors(str(directory)).items()
            if isinstance(v, torch.Tensor)}


def _read_all_directly(directory):
    """Every key read with ChunkReader alone (no dcp.load fallback allowed)."""
    metadata = FileSystemReader(str(directory)).read_metadata()
    reader = ChunkReader(directory, metadata)
    out = {}
    for key, meta in metadata.state_dict_metadata.items():
        if not hasattr(meta, "chunks"):
            continue
        buffer = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        assert reader.read_into(key, (0,) * len(meta.size), buffer), key
        out[key] = buffer
    reader.close()
    return out


def test_exact_storage_aliases_a_contiguous_slice_without_copying():
    base = torch.arange(24, dtype=torch.bfloat16).reshape(6, 4)
    half = exact_storage(base[3:])
    assert half.data_ptr() == base[3:].data_ptr() and torch.equal(half, base[3:])
    assert half.untyped_storage().nbytes() == half.numel() * half.element_size()
    column = exact_storage(base[:, 1])  # not contiguous: copied
    assert torch.equal(column, base[:, 1]) and column.untyped_storage().nbytes() == 12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_converted_and_megatron_saved_checkpoints_read_directly_and_identically(dtype, tmp_path):
    src = save_hf_model(make_hf_model(seed=3, num_experts=3, num_experts_per_tok=2).to(dtype), tmp_path / "hf")
    hf_to_mcore(src, tmp_path / "mcore")
    files = sorted(p.name for p in (tmp_path / "mcore").glob("*.distcp"))
    assert len(files) == 1, files  # a small model: one file, not one file per chunk
    for directory in (tmp_path / "mcore", _resaved(tmp_path)):  # ours, and Megatron's own writer's
        direct, reference = _read_all_directly(directory), _plain(directory)
        assert sorted(direct) == sorted(reference)
        for key, tensor in reference.items():
            assert direct[key].dtype == tensor.dtype and torch.equal(direct[key], tensor), key


def _resaved(tmp_path):
    model = fp.from_mcore(tmp_path / "mcore")
    fp.save_mcore(model, tmp_path / "resaved")
    return tmp_path / "resaved"


def test_partial_chunk_reads_match(tmp_path):
    """A region inside a stored chunk (what a TP-sharded read asks for) reads correctly."""
    src = save_hf_model(make_hf_model(seed=4, num_experts=2, num_experts_per_tok=2), tmp_path / "hf")
    hf_to_mcore(src, tmp_path / "mcore")
    metadata = FileSystemReader(str(tmp_path / "mcore")).read_metadata()
    reader = ChunkReader(tmp_path / "mcore", metadata)
    key = "embedding.word_embeddings.weight"
    whole = _plain(tmp_path / "mcore")[key]
    part = torch.empty(5, whole.shape[1] - 3, dtype=whole.dtype)
    assert reader.read_into(key, (7, 3), part)
    assert torch.equal(part, whole[7:12, 3:])
    reader.close()


def test_a_reader_left_open_at_interpreter_exit_closes_without_an_error(tmp_path):
    """Readers still alive at exit are closed after their module's globals (``os``) may be gone."""
    import subprocess
    import sys

    (tmp_path / "chunk").write_bytes(b"x")
    script = ("import pathlib, sys\nimport flexolmo_plugin.compat\nfrom flexolmo_plugin.conversion import dcp_io\n"
              "reader = dcp_io.ChunkReader(pathlib.Path(sys.argv[1]), None)\nreader._fd('chunk')\n"
              "dcp_io._left_open = reader  # torn down with the module itself\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Exception ignored" not in done.stderr and "Error" not in done.stderr, done.stderr
