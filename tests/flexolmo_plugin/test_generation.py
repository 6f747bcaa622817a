"""Generation and attribution on the Megatron model, against transformers, the no-cache path, the
physically opted-out model and the evaluation's own gate weights.

One tiny fp32 model (4 experts, top-2, vocabulary 100) named ``public, a, b, c`` is saved as a Megatron
checkpoint and exported with our converter; transformers' ``FlexOlmoForCausalLM`` loads the export.
"""

from __future__ import annotations

import pytest
import torch

import flexolmo_plugin as fp
from flexolmo_plugin.conversion.convert import mcore_to_hf
from flexolmo_plugin.lifecycle.evaluation import evaluate, routing_counts
from flexolmo_plugin.lifecycle.generation import GenerationError, generate, write_outputs
from flexolmo_plugin.lifecycle.opt_out import opt_out
from flexolmo_plugin.model.build import logits
from tests.support import make_hf_model, save_hf_model

NAMES = ("public", "a", "b", "c")
# three lengths, so that rows are still reading their prompts while others generate
PROMPTS = [[5, 17, 33, 8, 9], [40, 41], [7, 8, 9, 10, 11, 12, 13, 14]]


@pytest.fixture(scope="module")
def world(tmp_path_factory, megatron_single_process):
    root = tmp_path_factory.mktemp("generation")
    model = fp.from_hf(save_hf_model(make_hf_model(seed=3), root / "hf"))
    model.flexolmo_config = model.flexolmo_config.replace(expert_names=NAMES)
    fp.save_mcore(model, root / "mcore")
    mcore_to_hf(root / "mcore", root / "export")
    opt_out(root / "mcore", root / "without-b", drop=["b"])
    from transformers import FlexOlmoForCausalLM

    reference = FlexOlmoForCausalLM.from_pretrained(root / "export", dtype=torch.float32).eval()
    return {"model": fp.from_mcore(root / "mcore"), "reference": reference, "root": root}


def _reference_greedy(reference, prompts, max_new_tokens, eos):
    """transformers' batched greedy generation with left padding; new tokens per row, cut after EOS."""
    width = max(map(len, prompts))
    pad = reference.config.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = reference.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=pad)[:, width:].tolist()
    return [row[: row.index(eos) + 1] if eos in row else row for row in out]


def test_greedy_equals_transformers_batched_with_padding(world):
    model, reference = world["model"], world["reference"]
    free = generate(model, PROMPTS, max_new_tokens=12)
    assert free.tokens == _reference_greedy(reference, PROMPTS, 12, eos=None)
    eos = free.tokens[0][3]  # a token row 0 produces: with it as EOS, row 0 stops after 4 tokens
    stopped = generate(model, PROMPTS, max_new_tokens=12, eos_token_id=eos)
    assert stopped.tokens == _reference_greedy(reference, PROMPTS, 12, eos=eos)
    assert len(stopped.tokens[0]) <= 4 and stopped.tokens[0][-1] == eos


def test_kv_cache_equals_recomputation(world):
    cached = generate(world["model"], PROMPTS, max_new_tokens=10)
    full = generate(world["model"], PROMPTS, max_new_tokens=10, kv_cache=False)
    assert cached.tokens == full.tokens
    for ours, theirs in zip(cached.attribution, full.attribution):
        assert ours.keys() == theirs.keys()
        assert all(abs(ours[k] - theirs[k]) < 1e-6 for k in ours)  # fp32: cache vs full attention


def test_exclude_equals_the_physically_opted_out_model(world):
    masked = generate(world["model"], PROMPTS, max_new_tokens=10, exclude=["b"])
    removed = generate(fp.from_mcore(world["root"] / "without-b"), PROMPTS, max_new_tokens=10)
    assert masked.tokens == removed.tokens
    assert masked.tokens != generate(world["model"], PROMPTS, max_new_tokens=10).tokens  # b mattered
    assert masked.excluded == ("b",)
    for ours, theirs in zip(masked.attribution, removed.attribution):
        assert ours["b"] == 0.0
        assert all(abs(ours[k] - theirs[k]) < 1e-6 for k in theirs)
    routers = [layer.mlp.router for layer in world["model"].decoder.layers]
    assert all(r.excluded_experts == [] for r in routers)  # the run-time mask is lifted afterwards


def test_seeded_sampling_is_reproducible_and_seeds_differ(world):
    model = world["model"]
    one = generate(model, PROMPTS, max_new_tokens=12, temperature=50.0, seed=7)
    assert one.tokens == generate(model, PROMPTS, max_new_tokens=12, temperature=50.0, seed=7).tokens
    # at temperature 50 every token has probability > 1/200: 36 equal draws would be a ~1e-70 event
    assert one.tokens != generate(model, PROMPTS, max_new_tokens=12, temperature=50.0, seed=8).tokens
    # a nucleus this small holds only the most likely token: sampling becomes greedy
    nucleus = generate(model, PROMPTS, max_new_tokens=12, temperature=50.0, top_p=1e-9, seed=7)
    assert nucleus.tokens == generate(model, PROMPTS, max_new_tokens=12).tokens


def test_attribution_is_the_gate_weights_of_the_positions_that_chose_the_tokens(world):
    model, reference = world["model"], world["reference"]
    result = generate(model, PROMPTS, max_new_tokens=6)
    top_k = model.flexolmo_config.top_k
    for prompt, new, shares in zip(PROMPTS, result.tokens, result.attribution):
        assert abs(sum(shares.values()) - 1) < 1e-12 and list(shares) == list(NAMES)
        sequence = torch.tensor([prompt + new])
        first, last = len(prompt) - 1, len(prompt) + len(new) - 1  # positions [first, last) chose ``new``
        # the evaluation's gate weights (routing_counts): sums over [0, last) minus those over [0, first)
        sums = []
        for end in (last, first):
            weights = torch.zeros(2, len(NAMES), dtype=torch.float64)
            with routing_counts(model, weights):
                logits(model, sequence[:, :end])
            sums.append(weights.sum(0))
        evaluated = sums[0] - sums[1]
        # transformers' router logits: softmax over all experts, top-k, no renormalisation
        with torch.no_grad():
            router_logits = reference(sequence[:, :last], output_router_logits=True).router_logits
        hf = torch.zeros(len(NAMES), dtype=torch.float64)
        for layer_logits in router_logits:
            probs = torch.softmax(layer_logits[first:last].double(), dim=-1)
            top = probs.topk(top_k, dim=-1)
            hf += torch.zeros_like(probs).scatter(-1, top.indices, top.values).sum(0)
        for expected in (evaluated, hf):
            expected = expected / expected.sum()
            assert max(abs(shares[n] - expected[i].item()) for i, n in enumerate(NAMES)) < 1e-5


def test_eval_attribution_of_one_window_is_its_mean_gate_weight(world, tmp_path):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp_path / "data.bin"), dtype=np.uint16)
    builder.add_document(torch.randint(0, 100, (12,), generator=torch.Generator().manual_seed(0)), [12])
    builder.finalize(str(tmp_path / "data.idx"))
    records: list[dict] = []
    [result] = evaluate(world["model"], {"d": tmp_path / "data"}, seq_len=8, max_tokens=8, attribution=records)
    assert [(r["domain"], r["window"], r["tokens"]) for r in records] == [("d", 0, 8)]
    mean = result.weights.double().mean(0)
    expected = mean / mean.sum()
    assert max(abs(records[0]["attribution"][n] - expected[i].item()) for i, n in enumerate(NAMES)) < 1e-6


def test_refusals_name_the_problem(world):
    model = world["model"]
    cases = [
        (dict(prompts=[], max_new_tokens=1), "no prompts"),
        (dict(prompts=[[1], []], max_new_tokens=1), "prompt 1 is empty"),
        (dict(prompts=[[1, 100]], max_new_tokens=1), r"prompt 0: token ids must lie in \[0, 100\)"),
        (dict(prompts=[[1.5]], max_new_tokens=1), "not integer token ids"),
        (dict(prompts=[[1] * 120], max_new_tokens=9), "exceeds the model's context of 128"),
        (dict(prompts=[[1]], max_new_tokens=0), "max_new_tokens must be"),
        (dict(prompts=[[1]], max_new_tokens=1, temperature=-1.0), "temperature must be"),
        (dict(prompts=[[1]], max_new_tokens=1, top_p=0.0), "top_p must be"),
        (dict(prompts=[[1]], max_new_tokens=1, eos_token_id=100), "eos_token_id 100"),
    ]
    for kwargs, message in cases:
        with pytest.raises(GenerationError, match=message):
            generate(model, kwargs.pop("prompts"), **kwargs)


def test_two_outputs_are_written_together_or_not_at_all(tmp_path):
    (tmp_path / "taken.jsonl").write_text("")
    with pytest.raises(FileExistsError):
        write_outputs({tmp_path / "first.jsonl": [{"a": 1}], tmp_path / "taken.jsonl": [{"b": 2}]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.jsonl"]


def test_help_lists_generate():
    from flexolmo_plugin.cli import build_parser

    assert "generate" in build_parser().format_help()
