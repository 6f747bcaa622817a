"""prepare-data (Megatron indexed datasets) and embed-domain (router rows from documents)."""

import json

import pytest
import torch

from flexolmo_plugin.lifecycle.data import DataError, prepare_dataset
from flexolmo_plugin.lifecycle.domain_embedding import embed_documents, sample_documents
from tests.support import make_tokenizer

DOCS = ["def add(a, b): return a + b", "the quick brown fox", "lorem ipsum dolor sit amet, consectetur"]


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_prepare_data_round_trips_through_megatron_indexed_dataset(tokenizer_dir, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": d, "meta": 1} for d in DOCS])
    report = prepare_dataset(src, tmp_path / "owner", tokenizer_dir=tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    expected = [tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for d in DOCS]
    dataset = IndexedDataset(str(tmp_path / "owner"))
    assert len(dataset) == report.documents == 3
    assert [dataset[i].tolist() for i in range(3)] == expected
    assert report.tokens == sum(map(len, expected))


@pytest.mark.parametrize("records,match", [
    ([{"text": "fine"}, "{not json", {"text": "x"}], r"docs\.jsonl:2: not valid JSON"),
    ([{"text": "fine"}, {"body": "no text"}], r"docs\.jsonl:2: expected an object with a string field 'text'"),
    ([], "no documents"),
])
def test_bad_data_is_refused_with_its_line_and_leaves_nothing(records, match, tokenizer_dir, tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", records)
    with pytest.raises(DataError, match=match):
        prepare_dataset(src, tmp_path / "out", tokenizer_dir=tokenizer_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


def test_existing_dataset_is_not_overwritten(tokenizer_dir, tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS])
    prepare_dataset(src, tmp_path / "out", tokenizer_dir=tokenizer_dir)
    with pytest.raises(FileExistsError):
        prepare_dataset(src, tmp_path / "out", tokenizer_dir=tokenizer_dir)


def test_document_sample_is_uniform_sized_and_seeded(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"doc {i}"} for i in range(50)] + [{"text": "  "}])
    a, b = sample_documents(src, num_docs=10, seed=1), sample_documents(src, num_docs=10, seed=1)
    assert a == b and len(a) == 10 and len(set(a)) == 10
    assert sample_documents(src, num_docs=10, seed=2) != a
    assert len(sample_documents(src, num_docs=500)) == 50  # blank documents are skipped
    with pytest.raises(DataError, match="no non-empty documents"):
        sample_documents(write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}]))


def _reference_mean(model, tokenizer, docs, hidden_of, *, unit=True):
    vectors = []
    for doc in docs:  # one at a time: no padding, plain token mean
        batch = tokenizer(doc, return_tensors="pt")
        with torch.no_grad():
            vector = hidden_of(model(**batch, output_hidden_states=True))[0].mean(0)
        vectors.append(vector / vector.norm() if unit else vector)
    return torch.stack(vectors).mean(0)


def test_encoder_embedding_is_the_mean_of_mean_pooled_documents(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=300, hidden_size=48, num_hidden_layers=1, num_attention_heads=4,
                                   intermediate_size=64)).eval()
    encoder.save_pretrained(tmp_path / "enc")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "enc")
    got = embed_documents(tmp_path / "enc", DOCS, method="encoder", batch_size=2, expected_width=48)
    ref = _reference_mean(encoder, AutoTokenizer.from_pretrained(tokenizer_dir), DOCS, lambda o: o.last_hidden_state)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(DataError, match="hidden size is 64"):
        embed_documents(tmp_path / "enc", DOCS, method="encoder", expected_width=64)


def test_public_model_embedding_uses_its_final_hidden_states(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer, Olmo2Config, Olmo2ForCausalLM

    torch.manual_seed(0)
    model = Olmo2ForCausalLM(Olmo2Config(vocab_size=300, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                                         num_attention_heads=6, num_key_value_heads=2, pad_token_id=1,
                                         eos_token_id=2)).eval()
    model.save_pretrained(tmp_path / "public")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "public")
    got = embed_documents(tmp_path / "public", DOCS)  # auto-detects the public model
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ref = _reference_mean(model, tokenizer, DOCS, lambda o: o.hidden_states[-1])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert got.norm() <= 1 + 1e-5  # a mean of unit vectors
    raw = embed_documents(tmp_path / "public", DOCS, normalize=False)
    raw_ref = _reference_mean(model, tokenizer, DOCS, lambda o: o.hidden_states[-1], unit=False)
    torch.testing.assert_close(raw, raw_ref, rtol=1e-4, atol=1e-5)
    assert raw.norm() > 1.5 * got.norm()  # final hidden states after RMSNorm are far longer than 1


def test_unit_length_mean_skips_zero_documents_and_refuses_all_zero(tmp_path):
    from flexolmo_plugin.lifecycle.domain_embedding import _finish

    vectors = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 2.0]])
    torch.testing.assert_close(_finish(vectors, 2, tmp_path, normalize=True), torch.tensor([0.3, 0.9]))
    torch.testing.assert_close(_finish(vectors, 2, tmp_path, normalize=False), torch.tensor([1.0, 2.0]))
    with pytest.raises(DataError, match="every document embedding was zero"):
        _finish(torch.zeros(3, 2), 2, tmp_path, normalize=True)


def test_embed_domain_cli_writes_a_loadable_router_row(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertModel

    from flexolmo_plugin.cli import EXIT_BAD_INPUT, EXIT_OK, main
    from flexolmo_plugin.lifecycle.upcycle import load_embedding

    BertModel(BertConfig(vocab_size=300, hidden_size=48, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(tmp_path / "enc")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "enc")
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS])
    assert main(["embed-domain", str(docs), str(tmp_path / "e.safetensors"), "--model", str(tmp_path / "enc"),
                 "--quiet"]) == EXIT_OK
    assert load_embedding(tmp_path / "e.safetensors", 48).shape == (48,)
    assert main(["embed-domain", str(docs), str(tmp_path / "raw.safetensors"), "--model", str(tmp_path / "enc"),
                 "--no-normalize", "--quiet"]) == EXIT_OK
    unit, raw = load_embedding(tmp_path / "e.safetensors", 48), load_embedding(tmp_path / "raw.safetensors", 48)
    assert unit.norm() <= 1 + 1e-5 and raw.norm() > 2  # BERT's last hidden states are LayerNorm-ed: norm ~ sqrt(48)
    from safetensors import safe_open
    for name, flag in (("e", "true"), ("raw", "false")):
        with safe_open(str(tmp_path / f"{name}.safetensors"), "pt") as handle:
            assert handle.metadata()["normalized"] == flag
    assert main(["embed-domain", str(tmp_path / "missing.jsonl"), str(tmp_path / "f.safetensors"),
                 "--model", str(tmp_path / "enc"), "--quiet"]) == EXIT_BAD_INPUT


# ------------------------------------------------------------------ refusals with a file and a line
def write_bytes_jsonl(path, lines: list[bytes]):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


NOT_UTF8 = [b'{"text": "fine"}', b'{"text": "caf\xe9 \xff"}', b'{"text": "x"}']


def test_non_utf8_input_names_its_file_and_line(tokenizer_dir, tmp_path):
    """A byte that is not UTF-8 used to escape as a bare UnicodeDecodeError (no file, no line)."""
    from flexolmo_plugin.lifecycle.proxy import public_documents

    src = write_bytes_jsonl(tmp_path / "docs.jsonl", NOT_UTF8)
    match = r"docs\.jsonl:2: not valid UTF-8 \(byte 0xe9"
    with pytest.raises(DataError, match=match):
        prepare_dataset(src, tmp_path / "out", tokenizer_dir=tokenizer_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]
    with pytest.raises(DataError, match=match):
        sample_documents(src)
    with pytest.raises(DataError, match=match):
        public_documents(src)


def test_crlf_lines_still_read(tokenizer_dir, tmp_path):
    src = write_bytes_jsonl(tmp_path / "docs.jsonl", [json.dumps({"text": d}).encode() + b"\r" for d in DOCS])
    assert prepare_dataset(src, tmp_path / "out", tokenizer_dir=tokenizer_dir).documents == 3


def test_a_directory_without_tokenizer_files_is_refused(tmp_path):
    """AutoTokenizer builds an *empty* tokenizer for a model directory without tokenizer files, which
    tokenized every document to nothing: a dataset of end-of-document tokens, exit 0."""
    from tests.support import make_dense_model

    make_dense_model(tmp_path / "model")
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS])
    with pytest.raises(DataError, match="no tokenizer here"):
        prepare_dataset(src, tmp_path / "out", tokenizer_dir=tmp_path / "model")
    assert not list(tmp_path.glob("out*"))


# ------------------------------------------------------------------ outputs: never replaced, never mixed
def _unnamed(final):
    from flexolmo_plugin.lifecycle.data import _UnnamedFile

    file = _UnnamedFile(final)
    with open(file.path, "wb") as f:
        f.write(b"mine:" + final.name.encode())
    return file


@pytest.mark.parametrize("taken", [".bin", ".idx"])
def test_a_name_taken_meanwhile_refuses_and_removes_only_this_runs_files(taken, tmp_path):
    """Two runs on one prefix race at the naming: the loser must name nothing (``.bin`` taken) or
    take back its ``.bin`` (``.idx`` taken), and never touch the winner's files."""
    from flexolmo_plugin.conversion.atomic import OutputExistsError
    from flexolmo_plugin.lifecycle.data import _name_together

    prefix = tmp_path / "out"
    files = [_unnamed(tmp_path / "out.bin"), _unnamed(tmp_path / "out.idx")]
    (tmp_path / f"out{taken}").write_bytes(b"the winner's")
    try:
        with pytest.raises(OutputExistsError, match=rf"out\{taken} appeared while this run was writing it.*nothing "
                                                    "was replaced"):
            _name_together(files, prefix)
    finally:
        for file in files:
            file.close()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {f"out{taken}": b"the winner's"}


def test_unnamed_outputs_are_named_only_when_complete(tmp_path):
    from flexolmo_plugin.lifecycle.data import _name_together

    files = [_unnamed(tmp_path / "out.bin"), _unnamed(tmp_path / "out.idx")]
    assert not (tmp_path / "out.bin").exists() and not (tmp_path / "out.idx").exists()
    _name_together(files, tmp_path / "out")
    for file in files:
        file.close()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {"out.bin": b"mine:out.bin",
                                                                     "out.idx": b"mine:out.idx"}


# ------------------------------------------------------------------ embed-domain refusals
@pytest.fixture(scope="module")
def public_model(tokenizer_dir, tmp_path_factory):
    """A tiny HF OLMo-2 (vocabulary 320 >= the tokenizer's 300) with its tokenizer."""
    from transformers import AutoTokenizer

    from tests.support import make_dense_model

    directory = tmp_path_factory.mktemp("public")
    make_dense_model(directory, vocab_size=320)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return directory


def test_model_width_reads_hf_and_megatron_configs_and_refuses_a_missing_one(tmp_path):
    from flexolmo_plugin.lifecycle.domain_embedding import model_width

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"hidden_size": 48}))
    (tmp_path / "mcore").mkdir()
    (tmp_path / "mcore" / "flexolmo_config.json").write_text(json.dumps({"config": {"hidden_size": 64}}))
    assert model_width(tmp_path / "hf") == 48 and model_width(tmp_path / "mcore") == 64
    for name, content in [("no_width", {"model_type": "olmo2"}), ("text", {"hidden_size": "48"}),
                          ("zero", {"hidden_size": 0}), ("list", [48])]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(content))
        with pytest.raises(DataError, match=r"(no integer 'hidden_size'|not a model configuration)"):
            model_width(tmp_path / name)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a model directory"):
        model_width(tmp_path / "empty")


def test_embedding_options_out_of_range_are_refused(public_model):
    with pytest.raises(DataError, match=r"max_tokens \(--max-tokens\) must be a whole number >= 1, got 0"):
        embed_documents(public_model, DOCS, max_tokens=0)
    with pytest.raises(DataError, match="batch_size must be"):
        embed_documents(public_model, DOCS, batch_size=0)


def test_a_model_without_tokenizer_is_refused(tmp_path):
    """It used to crash in the attention ('cannot reshape tensor of 0 elements'): the empty
    tokenizer AutoTokenizer builds for a model directory without tokenizer files."""
    from tests.support import make_dense_model

    make_dense_model(tmp_path / "model", vocab_size=320)
    with pytest.raises(DataError, match="no tokenizer here"):
        embed_documents(tmp_path / "model", DOCS)


def test_a_tokenizer_beyond_the_models_vocabulary_is_refused(tokenizer_dir, tmp_path):
    """Token ids past the embedding table ended in torch.embedding's IndexError."""
    from transformers import AutoTokenizer

    from tests.support import make_dense_model

    make_dense_model(tmp_path / "model", vocab_size=100)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "model")
    with pytest.raises(DataError, match=r"token id \d+ \(it has 300 tokens\) but the model's embedding table has "
                                        "100 rows"):
        embed_documents(tmp_path / "model", DOCS)


def test_embed_domain_writes_the_format_its_suffix_names(public_model, tmp_path):
    """``out.npy`` used to get safetensors bytes, which ``upcycle`` then called pickled data."""
    import numpy as np

    from flexolmo_plugin.cli import EXIT_OK, main
    from flexolmo_plugin.lifecycle.upcycle import load_embedding

    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS])
    for name in ("e.npy", "e.safetensors"):
        assert main(["embed-domain", str(docs), str(tmp_path / name), "--model", str(public_model), "--quiet"]) \
            == EXIT_OK
    array = np.load(tmp_path / "e.npy", allow_pickle=False)
    assert array.dtype == np.float32 and array.shape == (48,)
    torch.testing.assert_close(load_embedding(tmp_path / "e.npy", 48), load_embedding(tmp_path / "e.safetensors", 48))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "docs.jsonl", "e.npy", "e.npy.checksums.json", "e.safetensors", "e.safetensors.checksums.json"]


def test_a_dataset_whose_checksums_cannot_be_written_is_not_published(tokenizer_dir, tmp_path, monkeypatch):
    """The .bin/.idx are named first, then their checksum file: if that last write fails (here its
    name is taken meanwhile, as by a concurrent run), the dataset is taken back, not left unverified."""
    from flexolmo_plugin.conversion.atomic import OutputExistsError
    from flexolmo_plugin.lifecycle import data

    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS])
    real = data.checksums_payload

    def taken_meanwhile(root, files):
        (tmp_path / "out.checksums.json").write_text("someone else's")
        return real(root, files)

    monkeypatch.setattr(data, "checksums_payload", taken_meanwhile)
    with pytest.raises(OutputExistsError):
        prepare_dataset(src, tmp_path / "out", tokenizer_dir=tokenizer_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "out.checksums.json"]
