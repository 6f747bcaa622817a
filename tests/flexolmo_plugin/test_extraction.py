"""The extraction audit (paper §5.3): a deliberately memorised expert is caught, an unseen text is not,
removing the expert removes the risk; the similarity and interval are the textbook ones.

The memorised model is a 2-expert FlexOlmo whose *owner expert alone* (FFN and router row, as in
anchored training) was trained for many steps on four random-letter documents, so that only that
expert can hold them: the audit must report them extracted with the expert and not without it."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

import flexolmo_plugin as fp
from flexolmo_plugin.cli import main
from flexolmo_plugin.errors import ConfigError
from flexolmo_plugin.lifecycle import extraction as ex
from flexolmo_plugin.lifecycle.data import load_tokenizer
from flexolmo_plugin.model.build import logits, next_token_loss, unwrap
from tests.support import make_hf_model, make_tokenizer, save_hf_model

PREFIX, CONTINUATION = 8, 24
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _documents(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join("".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 7))) for _ in range(14))
            for _ in range(count)]


def _write(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory, megatron_single_process):
    root = tmp_path_factory.mktemp("extraction")
    secret, unseen = _documents(0, 4), _documents(1, 4)
    tok_dir = make_tokenizer(root / "tok", texts=secret + unseen + [LETTERS] * 4, vocab_size=300)
    tokenizer = load_tokenizer(tok_dir)
    hf = make_hf_model(seed=5, vocab_size=300, num_experts=2, num_experts_per_tok=2, intermediate_size=256)
    with torch.no_grad():  # a head that can express confident predictions (HF's 0.02 init cannot, at width 48)
        hf.lm_head.weight.normal_(0.0, 0.5)
        hf.model.embed_tokens.weight.normal_(0.0, 1.0)
    model = fp.from_hf(save_hf_model(hf, root / "hf"))
    model.flexolmo_config = model.flexolmo_config.replace(expert_names=("public", "owner"))
    fp.save_mcore(model, root / "public-like")  # the same weights before the owner trains: nothing memorised

    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][: PREFIX + CONTINUATION] for t in secret]
    assert all(len(x) == PREFIX + CONTINUATION for x in ids)
    batch = torch.tensor(ids)
    trained = [p for n, p in unwrap(model).named_parameters()
               if ("local_experts.1." in n) or n.endswith("domain_embeddings.1")]
    for param in unwrap(model).parameters():
        param.requires_grad_(False)
    for param in trained:
        param.requires_grad_(True)
    assert trained
    optimizer = torch.optim.Adam(trained, lr=1e-2)
    model.train()
    for _ in range(200):
        optimizer.zero_grad()
        loss = next_token_loss(logits(model, batch, grad=True), batch)
        loss.backward()
        optimizer.step()
        if loss.item() < 0.02:
            break
    model.eval()
    fp.save_mcore(model, root / "memorised")
    return {"root": root, "tok": tok_dir, "tokenizer": tokenizer, "model": model, "final_loss": loss.item(),
            "secret": _write(root / "secret.jsonl", secret), "unseen": _write(root / "unseen.jsonl", unseen)}


def _protocol(**overrides):
    fields = dict(num_docs=10, prefix_tokens=PREFIX, continuation_tokens=CONTINUATION, samples=2, seed=0)
    return ex.ExtractionProtocol(**{**fields, **overrides})


def test_memorised_expert_is_extracted_and_unseen_text_is_not(lab):
    assert lab["final_loss"] < 0.05, lab["final_loss"]  # the fixture really memorised the documents
    protocol = _protocol()
    model, tokenizer = lab["model"], lab["tokenizer"]
    secret, short = ex.select_probes(lab["secret"], tokenizer, protocol)
    unseen, _ = ex.select_probes(lab["unseen"], tokenizer, protocol)
    assert len(secret) == 4 and short == 0
    with_expert = ex.audit(model, tokenizer, secret, protocol, label="memorised")
    assert with_expert.rate("greedy")[0] == 1.0 and with_expert.rate("sampled")[0] >= 0.75
    without = ex.audit(model, tokenizer, secret, protocol, label="without owner", exclude=["owner"])
    assert without.rate("greedy")[0] == 0.0 and without.rate("sampled")[0] == 0.0
    other = ex.audit(model, tokenizer, unseen, protocol, label="unseen")
    assert other.rate("greedy")[0] == 0.0 and max(other.greedy) < 0.6


def test_cli_table_and_report(lab, tmp_path, capsys):
    root = lab["root"]
    report = tmp_path / "report.json"
    code = main(["audit-extraction", str(root / "memorised"), str(lab["secret"]), "--tokenizer", str(lab["tok"]),
                 "--exclude", "owner", "--compare", str(root / "public-like"), "--prefix-tokens", str(PREFIX),
                 "--continuation-tokens", str(CONTINUATION), "--samples", "2", "--quiet", "--out", str(report)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "auditing 4 documents" in out and "without owner" in out
    models = json.loads(report.read_text())["models"]
    rates = {m["model"]: m["greedy"]["rate"] for m in models}
    assert rates == {str(root / "memorised"): 1.0, f"{root / 'memorised'} without owner": 0.0,
                     str(root / "public-like"): 0.0}
    first = models[0]
    assert first["greedy"]["extracted"] == 4 and len(first["per_document"]) == 4
    low, high = first["greedy"]["ci95"]
    assert (low, high) == pytest.approx(ex.wilson_interval(4, 4))


def test_refusals_name_the_problem(lab, tmp_path, capsys):
    root = lab["root"]
    base = ["audit-extraction", str(root / "memorised"), str(lab["secret"]), "--tokenizer", str(lab["tok"])]
    assert main(base + ["--threshold", "1.5"]) == 2
    assert main(base + ["--temperature", "0"]) == 2
    assert main(base + ["--samples", "-1"]) == 2
    assert main(base + ["--compare", str(tmp_path / "missing")]) == 2
    # the default protocol needs 288 tokens per document; these have 32+: refused, naming the fix
    assert main(base + ["--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no document has the 288 tokens" in err and "--continuation-tokens" in err
    existing = tmp_path / "exists.json"
    existing.write_text("{}")
    assert main(base + ["--prefix-tokens", "8", "--continuation-tokens", "24", "--out", str(existing)]) == 2
    assert existing.read_text() == "{}"
    with pytest.raises(ConfigError, match="top_p"):
        ex.ExtractionProtocol(top_p=0.0)
    with pytest.raises(ConfigError, match="num_docs"):
        ex.ExtractionProtocol(num_docs=0)


def _levenshtein(a: str, b: str) -> int:
    """Textbook dynamic programme (independent of rapidfuzz)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return row[-1]


@pytest.mark.parametrize("a,b,distance", [("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3),
                                          ("same", "same", 0), ("abc", "", 3)])
def test_similarity_is_normalised_levenshtein(a, b, distance):
    assert _levenshtein(a, b) == distance
    expected = 1.0 if not (a or b) else 1 - distance / max(len(a), len(b))
    assert ex.similarity(a, b) == pytest.approx(expected)
    rng = random.Random(distance)
    x, y = ("".join(rng.choice("ab ") for _ in range(rng.randint(0, 30))) for _ in range(2))
    assert ex.similarity(x, y) == pytest.approx(1 - _levenshtein(x, y) / max(len(x), len(y), 1))


def test_wilson_interval_matches_the_formula():
    # 0 of 10: the upper end is z²/(n + z²) (the closed form at p = 0)
    z = 1.959964
    assert ex.wilson_interval(0, 10) == pytest.approx((0.0, z * z / (10 + z * z)))
    low, high = ex.wilson_interval(5, 10)
    assert low == pytest.approx(1 - high) and 0.18 < low < 0.24  # symmetric at p = 1/2 (0.2366)
    assert ex.wilson_interval(0, 0) == (0.0, 1.0)
    assert math.isclose(sum(ex.wilson_interval(3, 100)) / 2, (0.03 + z * z / 200) / (1 + z * z / 100))
