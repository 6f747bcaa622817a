"""Builders for expert tests: a dense public model, domain embeddings, owners who trained only their expert."""

import numpy as np
import pytest
import torch

import flexolmo_plugin as fp
from flexolmo_plugin.lifecycle.merge import merge_experts
from flexolmo_plugin.lifecycle.package import package_expert
from flexolmo_plugin.lifecycle.upcycle import upcycle
from tests.support import make_dense_model

H = 48
IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
OWNERS = ("code", "math", "news")


def dense_model(tmp, hidden=H, seed=1):
    make_dense_model(tmp, seed=seed, hidden_size=hidden)
    return tmp


def embedding(path, seed, hidden=H):
    np.save(path, (torch.randn(hidden, generator=torch.Generator().manual_seed(seed)) * 2).numpy())
    return path


def make_owner(anchor_dir, out_dir, seed):
    """An owner's checkpoint: only its expert (1) and router row moved, as anchored training does."""
    model = fp.from_mcore(anchor_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.decoder.layers:
            for param in layer.mlp.experts.local_experts[1].parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
            layer.mlp.router.domain_embeddings[1].add_(torch.randn(H, generator=generator))
    fp.save_mcore(model, out_dir)
    return out_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory, megatron_single_process):
    root = tmp_path_factory.mktemp("merge")
    dense = dense_model(root / "dense")
    anchor = root / "anchor"
    # Without the learned router bias: this world checks the HF-exportable path (test_bias.py the bias).
    upcycle(dense, anchor, public_embedding=embedding(root / "e0.npy", 0),
            domain_embedding=embedding(root / "e1.npy", 1), router_bias_init=None)
    owners, packages = {}, {}
    for i, name in enumerate(OWNERS):
        owners[name] = make_owner(anchor, root / f"owner_{name}", seed=10 + i)
        packages[name] = package_expert(owners[name], root / f"pkg_{name}", name=name, tokens_trained=1000 * (i + 1))
    merged = root / "merged"
    merge_experts(anchor, [packages[n] for n in OWNERS], merged)
    return root, anchor, owners, packages, merged
