"""Coordinator-side per-expert logit scales (``flexolmo scale-router``).

The reference is a brute-force evaluation written here: for a one-owner model the coordinate search is
exhaustive, so the scale it reports must be the grid's argmin of the search half's loss (computed
with rows set directly), and it must be kept exactly when that scale lowers the held-out half's loss.
Several models are tried, and both outcomes (kept, not kept) must occur among them.
"""

from __future__ import annotations

import pytest
import torch

from flexolmo_plugin.errors import ConfigError
from flexolmo_plugin.lifecycle.router_scaling import scale_router
from flexolmo_plugin.model.build import logits, next_token_loss
from tests.flexolmo_plugin.test_router_calibration import VOCAB, merged_model, owner_model, windows

GRID = (0.0, 0.5, 1.0, 2.0, 4.0)


@pytest.fixture(autouse=True)
def _groups(megatron_single_process):
    yield


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def mean_loss(model, ids):
    with torch.no_grad():
        total = sum(next_token_loss(logits(model, batch), batch).item() * len(batch) for batch in ids.split(16))
    return total / len(ids)


def brute_force(model, search, held_out):
    """Loss on each half for every alpha of GRID, rows set to r_pub + alpha (r_1 - r_pub); model restored."""
    saved = state(model)
    out = {}
    for alpha in GRID:
        with torch.no_grad():
            for layer in model.decoder.layers:
                rows = layer.mlp.router.domain_embeddings
                rows[1].copy_(rows[0] + alpha * (saved_row(saved, layer, 1) - rows[0]))
        out[alpha] = (mean_loss(model, search), mean_loss(model, held_out))
    model.load_state_dict(saved, strict=False)
    return out


def saved_row(saved, layer, e):
    return saved[f"decoder.layers.{layer.layer_number - 1}.mlp.router.domain_embeddings.{e}"]


def test_one_owner_search_is_the_grid_argmin_and_kept_only_if_held_out_improves():
    outcomes = set()
    for seed in range(6):
        model = owner_model(seed=seed)
        with torch.no_grad():  # sharper output logits: the expert mix then moves the loss visibly
            model.output_layer.weight.mul_(20.0)
        ids = windows(3, VOCAB, n=8, seed=10 + seed)
        search, held_out = ids[0::2], ids[1::2]
        table = brute_force(model, search, held_out)
        baseline = mean_loss(model, search), mean_loss(model, held_out)
        best = min((a for a in GRID if a != 1.0), key=lambda a: table[a][0])  # first of equal minima
        expected = best if table[best][0] < baseline[0] else 1.0
        before = state(model)
        report = scale_router(model, ids, grid=GRID)
        assert report.searched == (expected,), (seed, report, table)
        assert report.search_loss == pytest.approx((baseline[0], table[expected][0] if expected != 1.0
                                                    else baseline[0]), rel=1e-6)
        kept = expected != 1.0 and table[expected][1] < baseline[1]
        assert report.applied == kept and report.scales == ((expected,) if kept else (1.0,)), (seed, report)
        changed = {k for k, v in before.items() if not torch.equal(v, model.state_dict()[k])}
        if kept:
            assert changed <= {f"decoder.layers.{i}.mlp.router.domain_embeddings.1" for i in (0, 1)} and changed
            assert mean_loss(model, held_out) == pytest.approx(report.held_out_loss[1], rel=1e-6)
        else:
            assert not changed  # bit-identical
            assert "not applied" in report.summary()
        outcomes.add(kept)
    assert outcomes == {True, False}, "the models above no longer exercise both outcomes: pick others"


def test_every_owner_expert_gets_its_own_scale_and_r_pub_stays():
    model = merged_model(layers=2)
    before = state(model)
    report = scale_router(model, windows(3, VOCAB, n=12, seed=7), grid=(0.5, 1.0, 3.0), sweeps=1)
    assert report.experts == ("a", "b", "c") and len(report.searched) == 3
    for i, layer in enumerate(model.decoder.layers):
        rows = layer.mlp.router.domain_embeddings
        r_pub = before[f"decoder.layers.{i}.mlp.router.domain_embeddings.0"]
        assert torch.equal(rows[0], r_pub)
        for e, alpha in enumerate(report.scales, start=1):
            old = before[f"decoder.layers.{i}.mlp.router.domain_embeddings.{e}"]
            expected = old if alpha == 1.0 and not report.applied else r_pub + alpha * (old - r_pub)
            torch.testing.assert_close(rows[e], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(windows=torch.zeros(1, 16, dtype=torch.long)), r"\[n >= 2, seq\]"),
    (dict(windows=torch.zeros(4, 16)), "integer tensor"),
    (dict(grid=()), "non-empty"),
    (dict(grid=(1.0, -1.0)), ">= 0"),
    (dict(grid=(float("nan"),)), ">= 0"),
    (dict(sweeps=0), "sweeps"),
    (dict(experts=1), "nothing to scale"),
])
def test_refusals_leave_the_model_as_it_was(bad, match):
    model = owner_model(num_experts=1, names=("public",)) if bad.get("experts") == 1 else owner_model()
    before = state(model)
    with pytest.raises(ConfigError, match=match):
        scale_router(model, bad.get("windows", windows(3, VOCAB, n=4)), grid=bad.get("grid", GRID),
                     sweeps=bad.get("sweeps", 1))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_non_finite_loss_midway_restores_the_model():
    """Scale 1e38 overflows the router logits to a NaN loss after the rows were already changed."""
    model = owner_model()
    before = state(model)
    with pytest.raises(ConfigError, match="not finite"):
        scale_router(model, windows(3, VOCAB, n=4), grid=(1e38,), sweeps=1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
