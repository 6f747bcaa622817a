"""Upcycling a public model into the [public, domain] 2-expert model a data owner trains."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import flexolmo_plugin as fp
from flexolmo_plugin.conversion.convert import hf_to_mcore
from flexolmo_plugin.conversion.safetensors_reader import CheckpointFormatError
from flexolmo_plugin.lifecycle.upcycle import EmbeddingError, load_embedding, upcycle
from tests.support import hf_reference, make_dense_model, make_hf_model, save_hf_model

H = 48
IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _groups(megatron_single_process):
    yield


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dense") / "hf"
    return make_dense_model(directory, hidden_size=H), directory


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    root = tmp_path_factory.mktemp("emb")
    generator = torch.Generator().manual_seed(2)
    e0, e1 = torch.randn(H, generator=generator), torch.randn(H, generator=generator)
    np.save(root / "public.npy", e0.numpy())  # the official repository's format
    save_file({"embedding": e1}, str(root / "domain.safetensors"))
    return e0, e1, root / "public.npy", root / "domain.safetensors"


def test_upcycled_olmo2_is_two_public_ffns_with_domain_rows(dense, embeddings, tmp_path):
    model_hf, dense_dir = dense
    e0, e1, p0, p1 = embeddings
    upcycle(dense_dir, tmp_path / "owner", public_embedding=p0, domain_embedding=p1, expert_names=("public", "code"))
    config = json.loads((tmp_path / "owner" / "flexolmo_config.json").read_text())
    assert config["config"]["expert_names"] == ["public", "code"] and config["config"]["top_k"] == 2
    model = fp.from_mcore(tmp_path / "owner")
    for index, layer in enumerate(model.decoder.layers):
        torch.testing.assert_close(layer.mlp.router.router_matrix().detach(), torch.stack([e0, e1]), rtol=0, atol=0)
        hf_mlp = model_hf.model.layers[index].mlp
        gate_up = torch.cat([hf_mlp.gate_proj.weight, hf_mlp.up_proj.weight])
        for expert in layer.mlp.experts.local_experts:
            assert torch.equal(expert.linear_fc1.weight, gate_up)
            assert torch.equal(expert.linear_fc2.weight, hf_mlp.down_proj.weight)
    # two identical experts, top-2 of 2: the weights sum to 1, so this is still the dense model
    ref, _ = hf_reference(model_hf, IDS)
    assert (fp.logits(model, IDS) - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("source", ["hf_flexolmo", "megatron"])
def test_upcycling_a_flexolmo_copies_its_public_expert(source, embeddings, tmp_path):
    _, _, p0, p1 = embeddings
    flex = make_hf_model(seed=3, num_experts=4, hidden_size=H)
    public_dir = save_hf_model(flex, tmp_path / "hf")
    if source == "megatron":
        hf_to_mcore(public_dir, tmp_path / "mcore")
        public_dir = tmp_path / "mcore"
    upcycle(public_dir, tmp_path / "owner", public_embedding=p0, domain_embedding=p1)
    model = fp.from_mcore(tmp_path / "owner")
    assert model.flexolmo_config.num_experts == 2
    public_down = flex.model.layers[1].mlp.experts.down_proj[0]
    for expert in model.decoder.layers[1].mlp.experts.local_experts:
        assert torch.equal(expert.linear_fc2.weight, public_down)


def test_embedding_width_must_match_the_model(dense, tmp_path):
    _, dense_dir = dense
    np.save(tmp_path / "narrow.npy", np.ones(32, dtype=np.float32))
    np.save(tmp_path / "ok.npy", np.ones(H, dtype=np.float32))
    with pytest.raises(EmbeddingError, match="width 32 does not match the model's hidden size 48"):
        upcycle(dense_dir, tmp_path / "owner", public_embedding=tmp_path / "ok.npy",
                domain_embedding=tmp_path / "narrow.npy")
    assert not (tmp_path / "owner").exists()


def test_unsafe_or_malformed_embeddings_are_refused(tmp_path):
    (tmp_path / "e.pt").write_bytes(b"\x80\x04")
    with pytest.raises(EmbeddingError, match="pickle"):
        load_embedding(tmp_path / "e.pt")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(EmbeddingError, match="not a plain numeric"):
        load_embedding(tmp_path / "objects.npy")
    np.save(tmp_path / "nan.npy", np.array([1.0, np.nan], dtype=np.float32))
    with pytest.raises(EmbeddingError, match="NaN"):
        load_embedding(tmp_path / "nan.npy")
    np.save(tmp_path / "matrix.npy", np.ones((3, 4), dtype=np.float32))
    with pytest.raises(EmbeddingError, match="1-D"):
        load_embedding(tmp_path / "matrix.npy")


def test_a_public_model_of_another_architecture_is_refused(embeddings, tmp_path):
    _, _, p0, p1 = embeddings
    other = tmp_path / "llama"
    save_hf_model(make_hf_model(seed=0), other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "llama"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointFormatError, match="neither olmo2 nor flex_olmo"):
        upcycle(other, tmp_path / "owner", public_embedding=p0, domain_embedding=p1)
    assert not (tmp_path / "owner").exists()


@pytest.mark.parametrize("names,match", [
    (("public", "a/b"), r"'a/b' is not a safe identifier"),
    (("public", ".."), r"'\.\.' is not a safe identifier"),
    (("public", "x..y"), r"'x\.\.y' is not a safe identifier"),
    (("public", ""), r"'' is not a safe identifier"),
    (("public", "code\n"), r"is not a safe identifier"),
    (("public", "c" * 65), r"is not a safe identifier"),
    (("public", "public"), r"'public' is given twice"),
])
def test_unsafe_or_duplicate_expert_names_are_refused(names, match, dense, embeddings, tmp_path):
    """``upcycle --name a/b`` was accepted: a name becomes part of file names and manifests, and a
    second 'public' makes every later step by name ambiguous."""
    from flexolmo_plugin.errors import ConfigError

    _, dense_dir = dense
    _, _, p0, p1 = embeddings
    with pytest.raises(ConfigError, match=match):
        upcycle(dense_dir, tmp_path / "owner", public_embedding=p0, domain_embedding=p1, expert_names=names)
    assert list(tmp_path.iterdir()) == []


def test_saved_embeddings_have_the_format_of_their_suffix(tmp_path):
    from flexolmo_plugin.conversion.atomic import OutputExistsError
    from flexolmo_plugin.lifecycle.upcycle import check_embedding_output, save_embedding

    vector = torch.randn(H, generator=torch.Generator().manual_seed(3))
    save_embedding(tmp_path / "e.npy", vector, {"documents": "3"})
    save_embedding(tmp_path / "e.safetensors", vector, {"documents": "3"})
    assert np.load(tmp_path / "e.npy", allow_pickle=False).tolist() == vector.tolist()
    for name in ("e.npy", "e.safetensors"):
        torch.testing.assert_close(load_embedding(tmp_path / name, H), vector)
        with pytest.raises(OutputExistsError, match="already exists"):  # never replaced
            save_embedding(tmp_path / name, torch.zeros(H), {})
    for name in ("e.pt", "e.txt", "e"):
        with pytest.raises(EmbeddingError, match=r"written as \.safetensors or \.npy"):
            check_embedding_output(tmp_path / name)
        with pytest.raises(EmbeddingError, match=r"written as \.safetensors or \.npy"):
            save_embedding(tmp_path / name, vector, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "e.npy", "e.npy.checksums.json", "e.safetensors", "e.safetensors.checksums.json"]
    torch.testing.assert_close(load_embedding(tmp_path / "e.npy", H), vector)


def test_safetensors_bytes_under_a_npy_name_are_named_for_what_they_are(tmp_path):
    save_file({"embedding": torch.ones(H)}, str(tmp_path / "e.npy"))
    with pytest.raises(EmbeddingError, match=r"not a \.npy file .*holds safetensors data: rename it to "
                                             r"\.safetensors"):
        load_embedding(tmp_path / "e.npy")
