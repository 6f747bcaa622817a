"""The learned negative router bias min(b_i, 0) (paper §3.3.2), on by default: its initial value, the
clamp, its absence for the public expert, and its way through package -> merge -> opt-out -> HF export."""

import pytest
import torch

import flexolmo_plugin as fp
from flexolmo_plugin.conversion.convert import mcore_to_hf
from flexolmo_plugin.conversion.mcore_io import CanonicalReader, McoreCheckpointError, load_config
from flexolmo_plugin.lifecycle.evaluation import router_bias_logit_change
from flexolmo_plugin.lifecycle.merge import merge_experts
from flexolmo_plugin.lifecycle.opt_out import exclude_experts, opt_out
from flexolmo_plugin.lifecycle.package import load_package, package_expert
from flexolmo_plugin.lifecycle.upcycle import DEFAULT_ROUTER_BIAS_INIT, EmbeddingError, upcycle
from tests.flexolmo_plugin.experts.helpers import IDS, H, dense_model, embedding

BIAS = "decoder.layers.{}.mlp.router.domain_bias"


@pytest.fixture(scope="module")
def biased(tmp_path_factory, megatron_single_process):
    root = tmp_path_factory.mktemp("bias")
    dense = dense_model(root / "dense")
    upcycle(dense, root / "anchor", public_embedding=embedding(root / "e0.npy", 0),
            domain_embedding=embedding(root / "e1.npy", 1))  # the default: bias on
    return root


def _owner(root, name, bias_value, seed):
    """An owner whose training moved its expert, its row and its bias (to ``bias_value``)."""
    model = fp.from_mcore(root / "anchor")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.mlp.experts.local_experts[1].linear_fc2.weight.add_(0.05 * torch.randn(
                layer.mlp.experts.local_experts[1].linear_fc2.weight.shape, generator=generator))
            layer.mlp.router.domain_embeddings[1].add_(torch.randn(H, generator=generator))
            layer.mlp.router.domain_biases[0].fill_(bias_value)
    fp.save_mcore(model, root / name)
    return package_expert(root / name, root / f"pkg_{name}", name=name)


def test_upcycle_starts_the_owner_bias_at_the_default_and_only_for_the_owner(biased):
    config, _, _ = load_config(biased / "anchor")
    assert config.router_bias and config.num_experts == 2
    reader = CanonicalReader(biased / "anchor")
    for layer in range(config.num_layers):  # one bias per non-public expert: none for the public one
        assert torch.equal(reader.read(BIAS.format(layer)), torch.full((1, 1), DEFAULT_ROUTER_BIAS_INIT))
    with pytest.raises(EmbeddingError, match="<= 0"):
        upcycle(biased / "dense", biased / "bad", public_embedding=biased / "e0.npy",
                domain_embedding=biased / "e1.npy", router_bias_init=0.5)
    assert not (biased / "bad").exists()


def test_the_cli_applies_the_chosen_start_or_builds_no_bias(biased, capsys):
    """``flexolmo upcycle --router-bias-init B`` writes B into every layer (the default 0 alone could not
    show that the value is applied); ``--no-router-bias`` builds the model without it."""
    from flexolmo_plugin.cli import main

    args = [str(biased / "dense"), "--public-embedding", str(biased / "e0.npy"),
            "--domain-embedding", str(biased / "e1.npy"), "--quiet"]
    assert main(["upcycle", args[0], str(biased / "start-1.5"), *args[1:], "--router-bias-init", "-1.5"]) == 0
    assert "learned router bias: starts at -1.5" in capsys.readouterr().out
    config, _, _ = load_config(biased / "start-1.5")
    reader = CanonicalReader(biased / "start-1.5")
    for layer in range(config.num_layers):
        assert torch.equal(reader.read(BIAS.format(layer)), torch.full((1, 1), -1.5))
    assert main(["upcycle", args[0], str(biased / "nobias"), *args[1:], "--no-router-bias"]) == 0
    assert not load_config(biased / "nobias")[0].router_bias
    capsys.readouterr()  # bad values of the flags: tests/faults/test_options.py
    with pytest.raises(SystemExit):  # the help states the library's default, not a copy that could drift
        main(["upcycle", "--help"])
    assert f"(default {DEFAULT_ROUTER_BIAS_INIT:g}," in " ".join(capsys.readouterr().out.split())


def test_bias_lowers_only_the_owner_logit_and_is_clamped_at_zero(biased):
    model = fp.from_mcore(biased / "anchor")
    router = model.decoder.layers[0].mlp.router
    hidden = torch.randn(5, H, generator=torch.Generator().manual_seed(3))
    rows = torch.stack(list(router.domain_embeddings)).float()
    plain = hidden @ rows.T
    with torch.no_grad():
        torch.testing.assert_close(router.gating(hidden), plain + torch.tensor([0.0, DEFAULT_ROUTER_BIAS_INIT]))
        router.domain_biases[0].fill_(-1.25)  # a negative b lowers the owner's logit by exactly |b|
        torch.testing.assert_close(router.gating(hidden), plain + torch.tensor([0.0, -1.25]))
        router.domain_biases[0].fill_(2.0)  # a positive b has no effect: min(b, 0) = 0
        torch.testing.assert_close(router.gating(hidden), plain)


def test_bias_travels_through_package_merge_and_opt_out_and_blocks_an_inexact_hf_export(biased, tmp_path):
    packages = [_owner(biased, "code", -0.25, 1), _owner(biased, "math", -3.0, 2)]
    assert all(load_package(p).has_bias for p in packages)
    merged = tmp_path / "merged"
    merge_experts(biased / "anchor", packages, merged)
    config, _, _ = load_config(merged)
    assert config.router_bias and config.expert_names == ("public", "code", "math")
    reader = CanonicalReader(merged)
    assert torch.equal(reader.read(BIAS.format(0)), torch.tensor([[-0.25], [-3.0]]))
    opt_out(merged, tmp_path / "without-code", drop=["code"])
    assert torch.equal(CanonicalReader(tmp_path / "without-code").read(BIAS.format(1)), torch.tensor([[-3.0]]))
    # Every owner out (before: the writer's audit failed on a bias with no owner left to carry it): the
    # public expert alone, a softmax over one expert, computes the upcycled model with its owner masked.
    opt_out(merged, tmp_path / "public-only", drop=["code", "math"])
    alone = fp.from_mcore(tmp_path / "public-only")
    assert not alone.flexolmo_config.router_bias and alone.flexolmo_config.expert_names == ("public",)
    anchor = fp.from_mcore(biased / "anchor", dispatcher="allgather")
    exclude_experts(anchor, [anchor.flexolmo_config.expert_names[1]])
    assert (fp.logits(alone, IDS) - fp.logits(anchor, IDS)).abs().max().item() <= 1e-5

    with pytest.raises(McoreCheckpointError, match="--drop-router-bias"):
        mcore_to_hf(merged, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    model = fp.from_mcore(merged, dispatcher="allgather")
    before = fp.logits(model, IDS)
    change = router_bias_logit_change(model)
    assert change > 1e-4  # the bias matters, so dropping it is reported as a real change ...
    assert torch.equal(fp.logits(model, IDS), before)  # ... and the model keeps its bias afterwards
    mcore_to_hf(merged, tmp_path / "hf", drop_router_bias=True)
    assert (tmp_path / "hf" / "config.json").is_file()
