"""A public anchor, three owners who trained only their own expert, their packages, and the merge."""

import pytest

from conversion.upcycle import upcycle
from flexolmo_plugin.experts.merge import merge_experts
from flexolmo_plugin.experts.package import package_expert
from tests.flexolmo_plugin.experts.helpers import OWNERS, dense_model, embedding, make_owner


@pytest.fixture(scope="module")
def world(tmp_path_factory, megatron_single_process):
    root = tmp_path_factory.mktemp("merge")
    dense = dense_model(root / "dense")
    anchor = root / "anchor"
    upcycle(dense, anchor, public_embedding=embedding(root / "e0.npy", 0),
            domain_embedding=embedding(root / "e1.npy", 1))
    owners, packages = {}, {}
    for i, name in enumerate(OWNERS):
        owners[name] = make_owner(anchor, root / f"owner_{name}", seed=10 + i)
        packages[name] = package_expert(owners[name], root / f"pkg_{name}", name=name, tokens_trained=1000 * (i + 1))
    merged = root / "merged"
    merge_experts(anchor, [packages[n] for n in OWNERS], merged)
    return root, anchor, owners, packages, merged
