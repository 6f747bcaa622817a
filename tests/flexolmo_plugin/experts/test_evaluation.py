"""flexolmo eval: per-domain loss and routing shares, with and without run-time exclusion."""

import numpy as np
import pytest
import torch

import flexolmo_plugin as fp
from flexolmo_plugin.lifecycle.evaluation import evaluate, read_windows
from flexolmo_plugin.lifecycle.opt_out import exclude_experts


def write_dataset(prefix, documents):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for doc in documents:
        builder.add_item(torch.tensor(doc, dtype=torch.int64))
        builder.end_document()
    builder.finalize(str(prefix) + ".idx")
    return prefix


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generator = torch.Generator().manual_seed(0)
    low = [torch.randint(3, 50, (40,), generator=generator).tolist() for _ in range(4)]
    high = [torch.randint(50, 100, (40,), generator=generator).tolist() for _ in range(4)]
    return {"low": write_dataset(root / "low", low), "high": write_dataset(root / "high", high)}


def test_loss_and_routing_match_an_independent_computation(world, datasets):
    root, anchor, owners, packages, merged = world
    model = fp.from_mcore(merged)
    results = evaluate(model, datasets, seq_len=16, max_tokens=160, batch_size=3)
    assert [r.name for r in results] == ["low", "high"]
    for result in results:
        windows = read_windows(datasets[result.name], seq_len=16, max_tokens=160)
        assert windows.shape == (10, 16)
        expected = fp.next_token_loss(fp.logits(model, windows), windows).item()
        assert abs(result.loss - expected) < 1e-5 and result.tokens == 10 * 15
        assert result.routing.shape == (2, 4)
        # every token is computed by exactly top-k (= 4) experts in every layer
        torch.testing.assert_close(result.routing.sum(1), torch.full((2,), 4.0))
        # all experts selected and no renormalisation: each token's gate weights are its full softmax
        torch.testing.assert_close(result.weights.sum(1), torch.ones(2))
        assert (result.weights > 0).all()


def test_excluded_expert_receives_nothing(world, datasets):
    root, anchor, owners, packages, merged = world
    model = fp.from_mcore(merged, dispatcher="allgather")
    exclude_experts(model, ["math"])
    for result in evaluate(model, datasets, seq_len=16, max_tokens=160):
        assert (result.routing[:, 2] == 0).all() and (result.weights[:, 2] == 0).all()
        torch.testing.assert_close(result.routing.sum(1), torch.full((2,), 3.0))
        torch.testing.assert_close(result.weights.sum(1), torch.ones(2))  # softmax over the remaining three


def test_eval_cli_prints_tables(world, datasets, capsys):
    from flexolmo_plugin.cli import EXIT_BAD_INPUT, EXIT_OK, main

    root, anchor, owners, packages, merged = world
    args = ["eval", str(merged), "--data", f"low={datasets['low']}", f"high={datasets['high']}", "--seq-len", "16"]
    assert main(args + ["--exclude", "news"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "excluding news" in out and "ppl" in out and "public" in out
    assert main(["eval", str(merged), "--data", "nonsense"]) == EXIT_BAD_INPUT


def test_routing_heatmap_is_written_as_png(world, datasets, tmp_path):
    from flexolmo_plugin.cli import EXIT_OK, main

    root, anchor, owners, packages, merged = world
    png = tmp_path / "routing.png"
    assert main(["eval", str(merged), "--data", f"low={datasets['low']}", f"high={datasets['high']}", "--seq-len",
                 "16", "--plot", str(png)]) == EXIT_OK
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_oracle_and_composition_efficiency_follow_their_definitions():
    from flexolmo_plugin.lifecycle.evaluation import composition_efficiency, oracle

    losses = {"public": {"a": 2.0, "b": 2.0}, "owner a": {"a": 1.0, "b": 2.5}, "owner b": {"a": 2.2, "b": 1.5}}
    best = oracle(losses)
    assert best == {"a": 1.0, "b": 1.5}
    # public mean 2.0, oracle mean 1.25: a composed model at mean 1.75 captures a third of the gain
    assert composition_efficiency(losses["public"], {"a": 1.5, "b": 2.0}, best) == pytest.approx(1 / 3)
    assert composition_efficiency(losses["public"], best, best) == pytest.approx(1.0)
    assert composition_efficiency(losses["public"], {"a": 2.5, "b": 2.0}, best) < 0


def test_eval_cli_compares_models_with_the_models_own_context_length(world, datasets, capsys):
    from flexolmo_plugin.cli import EXIT_BAD_INPUT, EXIT_OK, main

    root, anchor, owners, packages, merged = world
    data = ["--data", f"low={datasets['low']}", f"high={datasets['high']}", "--max-tokens", "256"]
    assert main(["eval", str(anchor), str(owners["code"]), str(merged), *data, "--public", str(anchor),
                 "--composed", str(merged)]) == EXIT_OK  # no --seq-len: the models' 64 positions
    out = capsys.readouterr().out
    assert "mean gate weight" in out and "oracle" in out and "composition efficiency" in out
    assert main(["eval", str(merged), *data, "--seq-len", "0"]) == EXIT_BAD_INPUT


def test_a_non_finite_loss_is_refused_with_its_cause(world, datasets):
    """Not a ``nan`` row: the error names the model, the domain and why -- a bad weight, or (all
    weights finite) an overflow, which a scan of the weights up front would have missed."""
    from flexolmo_plugin.lifecycle.evaluation import NonFiniteLossError

    root, anchor, owners, packages, merged = world
    model = fp.from_mcore(merged)
    with torch.no_grad():
        model.decoder.layers[1].mlp.experts.local_experts[2].linear_fc1.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"^model merged-with-inf produces a non-finite loss \(nan\) on "
                       r"domain 'low'; its weights are not finite: first bad tensor "
                       r"decoder\.layers\.1\.mlp\.experts\.local_experts\.2\.linear_fc1\.weight \(1 of \d+ values\)$"):
        evaluate(model, datasets, seq_len=16, max_tokens=160, model_name="merged-with-inf")
    model = fp.from_mcore(merged)
    with torch.no_grad():
        model.output_layer.weight.mul_(1e37)  # finite, but the logits overflow float32
    with pytest.raises(NonFiniteLossError, match=r"^the model produces .* its weights are finite, so its activations"):
        evaluate(model, datasets, seq_len=16, max_tokens=160)
