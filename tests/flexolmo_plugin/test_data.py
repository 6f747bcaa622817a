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


def _reference_mean(model, tokenizer, docs, hidden_of):
    vectors = []
    for doc in docs:  # one at a time: no padding, plain token mean
        batch = tokenizer(doc, return_tensors="pt")
        with torch.no_grad():
            vectors.append(hidden_of(model(**batch, output_hidden_states=True))[0].mean(0))
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
    ref = _reference_mean(model, AutoTokenizer.from_pretrained(tokenizer_dir), DOCS, lambda o: o.hidden_states[-1])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


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
    assert main(["embed-domain", str(tmp_path / "missing.jsonl"), str(tmp_path / "f.safetensors"),
                 "--model", str(tmp_path / "enc"), "--quiet"]) == EXIT_BAD_INPUT
