"""Proxy data (paper §3.6): the owner's classifier picks owner-like public documents; only public
identifiers leave the owner; the coordinator's router-tuning mix samples every source equally."""

import json
import random

import pytest

from flexolmo_plugin.cli import EXIT_BAD_INPUT, EXIT_OK, main
from flexolmo_plugin.lifecycle.data import DataError
from flexolmo_plugin.lifecycle.proxy import router_mix, select_proxy
from tests.support import make_tokenizer

CODE_WORDS = ["def", "return", "lambda", "x", "y", "(", ")", ":", "+", "=", "if", "else", "for", "in", "range"]
PROSE_WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "across", "green", "field", "under", "sky",
               "morning", "quiet"]


def _docs(words, n, rng, length=24):
    return [" ".join(rng.choice(words) for _ in range(length)) for _ in range(n)]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """An owner with code-like text; a public set of prose with a few code-like documents (the proxies)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    root = tmp_path_factory.mktemp("proxy")
    rng = random.Random(0)
    owner = _docs(CODE_WORDS, 40, rng)
    prose, codeish = _docs(PROSE_WORDS, 60, rng), _docs(CODE_WORDS, 8, rng)
    public = [{"id": f"p{i}", "text": t} for i, t in enumerate(prose)] + \
             [{"id": f"c{i}", "text": t} for i, t in enumerate(codeish)]
    rng.shuffle(public)
    tokenizer = make_tokenizer(root / "tok", texts=owner + prose + codeish, vocab_size=300)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)).eval().save_pretrained(root / "enc")
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(root / "enc")
    return dict(root=root, enc=root / "enc", owner=_jsonl(root / "owner.jsonl", [{"text": t} for t in owner]),
                public=_jsonl(root / "public.jsonl", public), owner_texts=owner,
                codeish={r["id"] for r in public if r["id"].startswith("c")})


def test_classifier_picks_the_owner_like_public_documents_and_writes_only_their_ids(setting, tmp_path):
    out = tmp_path / "proxy.json"
    selection = select_proxy(setting["owner"], setting["public"], out, embedder=setting["enc"], owner="code",
                             num_docs=len(setting["codeish"]), method="encoder")
    assert set(selection.selected) == setting["codeish"]
    assert selection.cross_validated_accuracy > 0.9
    payload = json.loads(out.read_text())
    assert payload["selected"] == selection.selected and payload["owner"] == "code"
    raw = out.read_text()
    for text in setting["owner_texts"]:  # not one 16-character window of any owner document
        assert not any(text[i:i + 16] in raw for i in range(0, len(text) - 16, 4))


def test_proxy_selection_refuses_bad_input_and_leaves_nothing(setting, tmp_path):
    kwargs = dict(embedder=setting["enc"], owner="code", method="encoder")
    empty = _jsonl(tmp_path / "empty.jsonl", [])
    cases = [
        (dict(owner_path=empty, public_path=setting["public"], fraction=0.1), "no non-empty documents"),
        (dict(owner_path=setting["owner"], public_path=empty, fraction=0.1), "no public documents"),
        (dict(owner_path=setting["owner"], public_path=setting["public"], fraction=0.0), r"--fraction must be in"),
        (dict(owner_path=setting["owner"], public_path=setting["public"], fraction=1.5), r"--fraction must be in"),
        (dict(owner_path=setting["owner"], public_path=setting["public"]), "exactly one of"),
        (dict(owner_path=setting["owner"], public_path=setting["public"], num_docs=0), "--num-docs must be"),
    ]
    for args, match in cases:
        with pytest.raises(DataError, match=match):
            select_proxy(out_path=tmp_path / "p.json", **args, **kwargs)
    # no overlap: nothing in a prose-only public set resembles code
    public = [json.loads(line) for line in setting["public"].read_text().splitlines()]
    prose_only = _jsonl(tmp_path / "prose.jsonl", [r for r in public if r["id"].startswith("p")])
    with pytest.raises(DataError, match="no public document resembles"):
        select_proxy(setting["owner"], prose_only, tmp_path / "p.json", num_docs=5, **kwargs)
    duplicated = _jsonl(tmp_path / "dup.jsonl", [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}])
    with pytest.raises(DataError, match="duplicate document identifier"):
        select_proxy(setting["owner"], duplicated, tmp_path / "p.json", num_docs=1, **kwargs)
    assert not (tmp_path / "p.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_router_mix_samples_every_source_equally_from_the_same_public_file(setting, tmp_path):
    selections = []
    for name, words in (("code", CODE_WORDS), ("prose", PROSE_WORDS)):
        owner = _jsonl(tmp_path / f"{name}.jsonl", [{"text": t} for t in _docs(words, 30, random.Random(1))])
        assert main(["select-proxy", str(owner), str(setting["public"]), "--out", str(tmp_path / f"{name}.json"),
                     "--name", name, "--embedder", str(setting["enc"]), "--method", "encoder", "--num-docs", "6",
                     "--quiet"]) == EXIT_OK
        selections.append(tmp_path / f"{name}.json")
    report = router_mix(setting["public"], selections, tmp_path / "mix.jsonl", seed=3)
    assert report.per_source == {"public": 6, "proxy:code": 6, "proxy:prose": 6}
    rows = [json.loads(line) for line in (tmp_path / "mix.jsonl").read_text().splitlines()]
    public_texts = {r["id"]: r["text"] for r in map(json.loads, setting["public"].read_text().splitlines())}
    assert len(rows) == 18 and all(public_texts[r["id"]] == r["text"] for r in rows)
    # a selection made from another public file is refused
    other = _jsonl(tmp_path / "other.jsonl", [{"id": "z", "text": "different"}])
    assert main(["router-mix", str(other), *map(str, selections), "--out", str(tmp_path / "mix2.jsonl")]) \
        == EXIT_BAD_INPUT
    assert not (tmp_path / "mix2.jsonl").exists()
