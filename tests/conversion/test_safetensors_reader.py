"""Tests for conversion.safetensors_reader, built on real files written to tmp_path."""

from __future__ import annotations

import json
import os
import pathlib
import struct

import pytest
import torch
from safetensors.torch import save_file

from flexolmo_plugin.conversion.safetensors_reader import (
    PICKLE_SUFFIXES,
    CheckpointFormatError,
    SafetensorsCheckpoint,
)


def _raw_file(path: pathlib.Path, header: dict, data: bytes) -> None:
    """Write a safetensors file byte by byte so the header can lie."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _write_index(directory: pathlib.Path, weight_map: dict[str, str]) -> None:
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))


def _sharded(tmp_path: pathlib.Path) -> dict[str, torch.Tensor]:
    a = {"layer.0.w": torch.randn(4, 3), "embed": torch.arange(6, dtype=torch.int64)}
    b = {"layer.1.w": torch.randn(2, 2).to(torch.bfloat16)}
    save_file(a, tmp_path / "model-00001-of-00002.safetensors")
    save_file(b, tmp_path / "model-00002-of-00002.safetensors")
    _write_index(tmp_path, {**{k: "model-00001-of-00002.safetensors" for k in a},
                            **{k: "model-00002-of-00002.safetensors" for k in b}})
    return {**a, **b}


def test_single_file_round_trip(tmp_path: pathlib.Path) -> None:
    tensors = {
        "w": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "h": torch.randn(2, 2).to(torch.float16),
        "ids": torch.tensor([1, 2, 3], dtype=torch.int32),
        "mask": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt", "note": "x"})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "flex_olmo", "num_experts": 2}))

    with SafetensorsCheckpoint.open(tmp_path) as ckpt:
        assert ckpt.directory == tmp_path
        assert ckpt.files == (tmp_path / "model.safetensors",)
        assert ckpt.keys() == sorted(tensors)
        assert len(ckpt) == len(tensors)
        assert "w" in ckpt and "nope" not in ckpt
        for key, t in tensors.items():
            assert ckpt.shape(key) == tuple(t.shape)
            assert ckpt.dtype(key) == t.dtype
            assert ckpt.nbytes(key) == t.numel() * t.element_size()
            assert ckpt.file_of(key) == tmp_path / "model.safetensors"
            got = ckpt.get(key)
            assert got.dtype == t.dtype and got.device.type == "cpu"
            assert torch.equal(got, t)
        assert ckpt.dtype("b") == torch.bfloat16
        assert ckpt.metadata() == {"format": "pt", "note": "x"}
        assert ckpt.config() == {"model_type": "flex_olmo", "num_experts": 2}


def test_no_config_and_no_metadata(tmp_path: pathlib.Path) -> None:
    save_file({"x": torch.ones(1)}, tmp_path / "weights.safetensors")
    ckpt = SafetensorsCheckpoint.open(str(tmp_path))
    assert ckpt.config() is None
    assert ckpt.metadata() == {}
    assert ckpt.files == (tmp_path / "weights.safetensors",)
    ckpt.close()


def test_sharded_with_index(tmp_path: pathlib.Path) -> None:
    tensors = _sharded(tmp_path)
    ckpt = SafetensorsCheckpoint.open(tmp_path)
    first, second = (tmp_path / "model-00001-of-00002.safetensors",
                     tmp_path / "model-00002-of-00002.safetensors")
    assert ckpt.files == (first, second)
    assert ckpt.keys() == sorted(tensors)
    assert ckpt.file_of("layer.0.w") == first
    assert ckpt.file_of("embed") == first
    assert ckpt.file_of("layer.1.w") == second
    assert torch.equal(ckpt.get("layer.0.w"), tensors["layer.0.w"])
    assert torch.equal(ckpt.get("layer.1.w"), tensors["layer.1.w"])
    ckpt.close()
    ckpt.close()  # idempotent


def test_symlinked_shards_are_followed(tmp_path: pathlib.Path) -> None:
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snap.mkdir()
    save_file({"x": torch.arange(4.0)}, blobs / "abc123")
    os.symlink(blobs / "abc123", snap / "model.safetensors")
    with SafetensorsCheckpoint.open(snap) as ckpt:
        assert torch.equal(ckpt.get("x"), torch.arange(4.0))


def test_pickle_only_dir_is_refused(tmp_path: pathlib.Path) -> None:
    assert ".bin" in PICKLE_SUFFIXES
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointFormatError, match="pickle") as info:
        SafetensorsCheckpoint.open(tmp_path)
    assert "pytorch_model.bin" in str(info.value)
    assert "safe_serialization=True" in str(info.value)


def test_empty_dir(tmp_path: pathlib.Path) -> None:
    with pytest.raises(CheckpointFormatError, match="no safetensors weights"):
        SafetensorsCheckpoint.open(tmp_path)


def test_missing_dir_and_file_path(tmp_path: pathlib.Path) -> None:
    with pytest.raises(CheckpointFormatError, match="does not exist"):
        SafetensorsCheckpoint.open(tmp_path / "nowhere")
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointFormatError, match="not a directory"):
        SafetensorsCheckpoint.open(tmp_path / "f")


def test_truncated_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(4), "big": torch.zeros(64)}, path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointFormatError, match=r"'big'.*truncated") as info:
        SafetensorsCheckpoint.open(tmp_path)
    assert "model.safetensors" in str(info.value)


def test_header_claims_more_bytes_than_present(tmp_path: pathlib.Path) -> None:
    header = {"x": {"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}}
    _raw_file(tmp_path / "model-00002.safetensors", header, b"\0" * 100)
    with pytest.raises(CheckpointFormatError,
                       match=r"model-00002\.safetensors: tensor 'x' claims bytes \[0, 4096\) "
                             r"but the file's data section has only 100 bytes"):
        SafetensorsCheckpoint.open(tmp_path)


def test_header_length_larger_than_file(tmp_path: pathlib.Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 5000) + b"{}")
    with pytest.raises(CheckpointFormatError, match="larger than the file"):
        SafetensorsCheckpoint.open(tmp_path)


def test_header_length_absurd_and_tiny_file(tmp_path: pathlib.Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(CheckpointFormatError, match="limit"):
        SafetensorsCheckpoint.open(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointFormatError, match="too short"):
        SafetensorsCheckpoint.open(tmp_path)


@pytest.mark.parametrize("entry, message", [
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}, "needs 16 bytes"),
    ({"dtype": "F16", "shape": [4], "data_offsets": [0, 16]}, "needs 8 bytes"),
    ({"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}, "unsupported dtype"),
    ({"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}, "non-negative"),
    ({"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}, "shape must be"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}, "data_offsets"),
    ({"dtype": "F32", "shape": [4]}, "data_offsets"),
])
def test_header_entry_mismatch(tmp_path: pathlib.Path, entry: dict, message: str) -> None:
    _raw_file(tmp_path / "model.safetensors", {"t": entry}, b"\0" * 16)
    with pytest.raises(CheckpointFormatError, match=message) as info:
        SafetensorsCheckpoint.open(tmp_path)
    assert "'t'" in str(info.value) and "model.safetensors" in str(info.value)


def test_header_not_json_object_or_overlapping(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2) + b"[]")
    with pytest.raises(CheckpointFormatError, match="JSON object"):
        SafetensorsCheckpoint.open(tmp_path)
    path.write_bytes(struct.pack("<Q", 3) + b"{x}")
    with pytest.raises(CheckpointFormatError, match="not valid"):
        SafetensorsCheckpoint.open(tmp_path)
    both = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    _raw_file(path, both, b"\0" * 12)
    with pytest.raises(CheckpointFormatError, match="'b'.*overlaps"):
        SafetensorsCheckpoint.open(tmp_path)


def test_index_points_to_missing_file(tmp_path: pathlib.Path) -> None:
    _sharded(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointFormatError, match=r"missing file 'model-00002-of-00002"):
        SafetensorsCheckpoint.open(tmp_path)


def test_index_key_not_in_its_file(tmp_path: pathlib.Path) -> None:
    _sharded(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    _write_index(tmp_path, index["weight_map"])
    with pytest.raises(CheckpointFormatError, match="'ghost'.*does not contain it"):
        SafetensorsCheckpoint.open(tmp_path)


def test_index_key_mapped_to_wrong_shard(tmp_path: pathlib.Path) -> None:
    _sharded(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["embed"] = "model-00002-of-00002.safetensors"
    _write_index(tmp_path, index["weight_map"])
    with pytest.raises(CheckpointFormatError, match="'embed' is mapped to model-00002"):
        SafetensorsCheckpoint.open(tmp_path)


def test_shard_key_missing_from_index(tmp_path: pathlib.Path) -> None:
    _sharded(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    del index["weight_map"]["embed"]
    _write_index(tmp_path, index["weight_map"])
    with pytest.raises(CheckpointFormatError, match="'embed' is not listed"):
        SafetensorsCheckpoint.open(tmp_path)


@pytest.mark.parametrize(
    "name", ["../x.safetensors", "sub/../../x.safetensors", "/etc/x.safetensors"])
def test_index_escaping_directory(tmp_path: pathlib.Path, name: str) -> None:
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    save_file({"x": torch.ones(1)}, tmp_path / "x.safetensors")  # exists, but outside
    _write_index(ckpt_dir, {"x": name})
    with pytest.raises(CheckpointFormatError, match="outside the checkpoint directory"):
        SafetensorsCheckpoint.open(ckpt_dir)


@pytest.mark.parametrize(
    "text", ["{not json", json.dumps({"weights": {}}), json.dumps({"weight_map": {}}), "[1]"])
def test_index_malformed(tmp_path: pathlib.Path, text: str) -> None:
    save_file({"x": torch.ones(1)}, tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointFormatError, match="model.safetensors.index.json"):
        SafetensorsCheckpoint.open(tmp_path)


def test_duplicate_key_without_index(tmp_path: pathlib.Path) -> None:
    save_file({"x": torch.ones(1), "y": torch.ones(1)}, tmp_path / "a.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointFormatError,
                       match=r"'x' appears in both a\.safetensors and b\.safetensors"):
        SafetensorsCheckpoint.open(tmp_path)


def test_model_safetensors_preferred_over_other_files(tmp_path: pathlib.Path) -> None:
    save_file({"x": torch.ones(1)}, tmp_path / "model.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "adapter.safetensors")
    with SafetensorsCheckpoint.open(tmp_path) as ckpt:
        assert ckpt.files == (tmp_path / "model.safetensors",)


def test_non_finite_tensor(tmp_path: pathlib.Path) -> None:
    bad = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 2.0]).to(torch.bfloat16)
    save_file({"bad.weight": bad, "ints": torch.tensor([1, 2])}, tmp_path / "model.safetensors")
    with SafetensorsCheckpoint.open(tmp_path) as ckpt:
        with pytest.raises(CheckpointFormatError, match=r"'bad\.weight' has 3 non-finite"):
            ckpt.get("bad.weight")
        got = ckpt.get("bad.weight", check_finite=False)
        assert torch.isnan(got[1]) and torch.isinf(got[2])
        assert torch.equal(ckpt.get("ints"), torch.tensor([1, 2]))


def test_unknown_key(tmp_path: pathlib.Path) -> None:
    save_file({"model.layers.0.mlp.weight": torch.ones(1)}, tmp_path / "model.safetensors")
    with SafetensorsCheckpoint.open(tmp_path) as ckpt:
        with pytest.raises(CheckpointFormatError,
                           match=r"'model\.layers\.0\.mlp\.weights'.*did you mean "
                                 r"'model\.layers\.0\.mlp\.weight'"):
            ckpt.get("model.layers.0.mlp.weights")
        for method in (ckpt.shape, ckpt.dtype, ckpt.nbytes, ckpt.file_of):
            with pytest.raises(CheckpointFormatError, match="'zzz'"):
                method("zzz")


def test_data_section_must_be_exactly_covered(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "model.safetensors"
    one = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    _raw_file(path, one, b"\0" * 12)
    with pytest.raises(CheckpointFormatError, match="trailing garbage"):
        SafetensorsCheckpoint.open(tmp_path)
    gap = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    _raw_file(path, gap, b"\0" * 8)
    with pytest.raises(CheckpointFormatError, match="'a'.*gap at 0"):
        SafetensorsCheckpoint.open(tmp_path)
    blob = (b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
            b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}')
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0")
    with pytest.raises(CheckpointFormatError, match="duplicate keys"):
        SafetensorsCheckpoint.open(tmp_path)


def test_read_into_fills_a_slice_of_a_bigger_tensor(tmp_path: pathlib.Path) -> None:
    """The converters read a gated FFN's gate and up halves straight into their rows of fc1."""
    gate, up = torch.randn(3, 5), torch.randn(3, 5)
    gate[1, 2] = float("nan")
    save_file({"gate": gate, "up": up}, tmp_path / "model.safetensors")
    with SafetensorsCheckpoint.open(tmp_path) as ckpt:
        fc1 = torch.zeros(6, 5)
        ckpt.read_into("up", fc1[3:])
        assert torch.equal(fc1[3:], up) and torch.equal(fc1[:3], torch.zeros(3, 5))
        with pytest.raises(CheckpointFormatError, match="non-finite"):
            ckpt.read_into("gate", fc1[:3])
        ckpt.read_into("gate", fc1[:3], check_finite=False)
        torch.testing.assert_close(fc1[:3], gate, rtol=0, atol=0, equal_nan=True)
        for wrong in (torch.empty(3, 5, dtype=torch.float64), torch.empty(5, 3), torch.empty(5, 6)[:, :5][:3]):
            with pytest.raises(ValueError, match="cannot read"):
                ckpt.read_into("up", wrong)
