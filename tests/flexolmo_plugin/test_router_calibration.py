"""Owner-side router calibration (``flexolmo calibrate-router``): the owner's rows become a
discriminant of its text against public text, and nothing else of the model changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from flexolmo_plugin.errors import ConfigError
from flexolmo_plugin.lifecycle.router_calibration import calibrate_router
from flexolmo_plugin.lifecycle.routing import router_outputs
from flexolmo_plugin.model.build import build_model, logits
from flexolmo_plugin.model.config import FlexOlmoConfig
from tests.support import upcycled_start

VOCAB, SEQ = 64, 16


@pytest.fixture(autouse=True)
def _groups(megatron_single_process):
    yield


def owner_model(*, num_experts=2, names=("public", "own"), router_bias=False, seed=0):
    config = FlexOlmoConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, num_experts=num_experts, top_k=num_experts,
                            router_bias=router_bias, expert_names=names)
    torch.manual_seed(seed)
    model = build_model(config).eval()
    with torch.no_grad():
        for layer in model.decoder.layers:
            for row in layer.mlp.router.domain_embeddings:
                row.normal_(0.0, 0.3)
    return model


def windows(low: int, high: int, n: int = 24, seed: int = 0) -> torch.Tensor:
    """Token windows drawn from [low, high): disjoint ranges make clearly separable toy domains."""
    return torch.randint(low, high, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def own_share(model, ids: torch.Tensor) -> float:
    """Mean gate weight of expert 1 over layers and tokens."""
    shares = []
    with router_outputs(model, lambda layer, probs, routing_map: shares.append(probs[:, 1].mean().item())):
        with torch.no_grad():
            logits(model, ids)
    return float(np.mean(shares))


def layer0_inputs(model, ids: torch.Tensor) -> np.ndarray:
    seen = []
    handle = model.decoder.layers[0].mlp.router.register_forward_hook(
        lambda m, args, out: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).float()))
    with torch.no_grad():
        logits(model, ids)
    handle.remove()
    return torch.cat(seen).numpy()


def test_separable_domains_are_routed_to_their_expert_and_nothing_else_changes():
    model = owner_model()
    own, public = windows(50, VOCAB, seed=1), windows(3, 17, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items() if v is not None and torch.is_tensor(v)}
    report = calibrate_router(model, own, public, scale=2.0)
    assert report.expert == "own" and len(report.layers) == 2
    assert all(layer.accuracy > 0.9 for layer in report.layers), report
    # unseen windows of each toy domain: the owner's expert takes most of its own text, little of public
    assert own_share(model, windows(50, VOCAB, seed=3)) > 0.8
    assert own_share(model, windows(3, 17, seed=4)) < 0.2
    after = model.state_dict()
    changed = sorted(k for k, v in before.items() if not torch.equal(v, after[k]))
    assert changed and all(k.endswith("domain_embeddings.1") for k in changed), changed


def test_row_is_public_row_plus_scale_times_the_balanced_no_intercept_regression():
    """Layer 0's router inputs do not depend on any router, so its row can be derived independently."""
    own, public = windows(20, VOCAB, seed=5), windows(3, 40, seed=6)
    rows = {}
    for scale in (1.0, 3.0):
        model = owner_model(seed=7)
        features = np.concatenate([layer0_inputs(model, public), layer0_inputs(model, own)])
        labels = np.r_[np.zeros(public.numel()), np.ones(own.numel())]
        expected_w = LogisticRegression(fit_intercept=False, class_weight="balanced", max_iter=5000).fit(
            features, labels).coef_[0]
        r_pub = model.decoder.layers[0].mlp.router.domain_embeddings[0].detach().clone()
        calibrate_router(model, own, public, scale=scale)
        router = model.decoder.layers[0].mlp.router
        assert torch.equal(router.domain_embeddings[0].detach(), r_pub)
        got = (router.domain_embeddings[1].detach() - r_pub).numpy()
        np.testing.assert_allclose(got, scale * expected_w, rtol=1e-4, atol=1e-6)
        rows[scale] = got
    np.testing.assert_allclose(rows[3.0], 3 * rows[1.0], rtol=1e-4, atol=1e-6)


def test_learned_bias_is_set_to_zero():
    model = owner_model(router_bias=True)
    for layer in model.decoder.layers:
        with torch.no_grad():
            layer.mlp.router.domain_biases[0].fill_(-0.7)
    calibrate_router(model, windows(32, VOCAB), windows(3, 32))
    for layer in model.decoder.layers:
        assert layer.mlp.router.domain_bias_vector().tolist() == [0.0, 0.0]


@pytest.mark.parametrize("bad", [
    dict(model=dict(num_experts=4, names=("public", "a", "b", "c"))),
    dict(model=dict(names=None)),
    dict(scale=0.0), dict(scale=-1.0), dict(scale=float("nan")), dict(scale=True), dict(regularization=0.0),
    dict(own=torch.empty(0, SEQ, dtype=torch.long)), dict(public=torch.rand(4, SEQ)),
])
def test_refusals(bad):
    model = owner_model(**bad.get("model", {}))
    state = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    kwargs = {k: v for k, v in bad.items() if k in ("scale", "regularization")}
    with pytest.raises(ConfigError):
        calibrate_router(model, bad.get("own", windows(32, VOCAB)), bad.get("public", windows(3, 32)), **kwargs)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # loses nothing


@pytest.mark.multiprocess
def test_cli_calibrates_a_checkpoint_and_refuses_an_existing_output(tmp_path):
    from flexolmo_plugin.lifecycle.data import prepare_dataset

    tokenizer = upcycled_start(tmp_path, ("public", "code"))
    for name, text in (("own", "def add(a, b): return a + b\n"), ("public", "the quick brown fox jumps\n")):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for i in range(40):
                f.write(json.dumps({"text": text * (1 + i % 3)}) + "\n")
        prepare_dataset(tmp_path / f"{name}.jsonl", tmp_path / name, tokenizer_dir=tokenizer)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "flexolmo_plugin", "calibrate-router", str(tmp_path / "init"), "--own-data",
            str(tmp_path / "own"), "--public-data", str(tmp_path / "public"), "--out", str(tmp_path / "cal"),
            "--max-tokens", "512", "--seq-len", "32"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "expert 'code'" in done.stdout
    from flexolmo_plugin.api import from_mcore

    start, calibrated = from_mcore(tmp_path / "init"), from_mcore(tmp_path / "cal")
    for a, b in zip(start.decoder.layers, calibrated.decoder.layers):
        assert torch.equal(a.mlp.router.domain_embeddings[0], b.mlp.router.domain_embeddings[0])
        assert not torch.equal(a.mlp.router.domain_embeddings[1], b.mlp.router.domain_embeddings[1])
        assert torch.equal(a.mlp.experts.local_experts[1].linear_fc1.weight,
                           b.mlp.experts.local_experts[1].linear_fc1.weight)
    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1, again.stderr


# ---------------------------------------------------------------- coordinator side: align-router
def merged_model(seed=0, layers=3):
    config = FlexOlmoConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, num_experts=4, top_k=4,
                            expert_names=("public", "a", "b", "c"))
    torch.manual_seed(seed)
    model = build_model(config).eval()
    with torch.no_grad():
        for layer in model.decoder.layers:
            for row in layer.mlp.router.domain_embeddings:
                row.normal_(0.0, 0.5)
    return model


def per_layer_probs(model, ids):
    out = {}
    with router_outputs(model, lambda layer, probs, routing_map: out.setdefault(layer, probs.double())):
        with torch.no_grad():
            logits(model, ids)
    return out


def test_soft_target_fit_matches_scikit_learn_on_hard_labels():
    from flexolmo_plugin.lifecycle.router_calibration import _fit_soft_softmax

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 5))
    labels = (x @ rng.normal(size=(5, 3))).argmax(1)
    reference = LogisticRegression(C=0.5, fit_intercept=False, max_iter=10000, tol=1e-10).fit(x, labels).coef_
    ours = _fit_soft_softmax(x, np.eye(3)[labels], 0.5).numpy()
    np.testing.assert_allclose(ours, reference, atol=2e-3)


def test_align_makes_every_later_layer_route_as_layer_0_and_changes_only_their_owner_rows():
    from flexolmo_plugin.lifecycle.router_calibration import align_router

    model = merged_model()
    ids = windows(3, VOCAB, n=32, seed=8)
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    gap_before = [(p - per_layer_probs(model, ids)[0]).abs().mean().item()
                  for layer, p in sorted(per_layer_probs(model, ids).items()) if layer > 0]
    report = align_router(model, ids)
    probs = per_layer_probs(model, ids)
    gap_after = [(probs[layer] - probs[0]).abs().mean().item() for layer in (1, 2)]
    assert len(report.layers) == 2 and all(kl < 0.05 for kl in report.layers), report
    assert max(gap_after) < 0.5 * min(gap_before), (gap_before, gap_after)
    # unseen windows: the later layers still follow layer 0
    fresh = per_layer_probs(model, windows(3, VOCAB, n=8, seed=9))
    assert max((fresh[layer] - fresh[0]).abs().mean().item() for layer in (1, 2)) < 0.5 * min(gap_before)
    changed = sorted(k for k, v in before.items() if not torch.equal(v, model.state_dict()[k]))
    allowed = {f"decoder.layers.{layer}.mlp.router.domain_embeddings.{e}" for layer in (1, 2) for e in (1, 2, 3)}
    assert changed and set(changed) <= allowed, changed


@pytest.mark.parametrize("bad", [dict(windows=torch.empty(0, SEQ, dtype=torch.long)), dict(regularization=-1.0),
                                 dict(regularization=float("inf")), dict(layers=1)])
def test_align_refusals(bad):
    from flexolmo_plugin.lifecycle.router_calibration import align_router

    model = merged_model(layers=bad.get("layers", 2))
    state = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(ConfigError):
        align_router(model, bad.get("windows", windows(3, VOCAB)), regularization=bad.get("regularization", 1.0))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_a_failure_midway_leaves_the_model_as_it_was():
    """Non-finite router inputs at layer 1 are found after layer 0 was already refitted: undone."""
    model = owner_model()
    with torch.no_grad():
        model.decoder.layers[1].self_attention.linear_proj.weight.fill_(float("nan"))
    state = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(ConfigError, match="layer 1: non-finite router inputs"):
        calibrate_router(model, windows(50, VOCAB), windows(3, 17))
    assert all(torch.equal(v, model.state_dict()[k]) or torch.isnan(v).all() for k, v in state.items())
    r0 = model.decoder.layers[0].mlp.router.domain_embeddings[1]
    assert torch.equal(r0, state["decoder.layers.0.mlp.router.domain_embeddings.1"])
