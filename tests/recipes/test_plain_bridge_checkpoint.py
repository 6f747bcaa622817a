"""A checkpoint written by Megatron-Bridge's own ``pretrain()`` (not ``flexolmo train``) is read by every tool.

Such a checkpoint has no ``flexolmo_config.json``: the tools reconstruct the configuration from the
``run_config.yaml`` Bridge writes into each ``iter_*`` (the provider's fields under ``model:``), read as
data only, and the dtype from the tensors' own metadata.  The run here is a data owner's anchored
expert training as a Bridge user would write it: our recipe function builds the ``ConfigContainer``,
Bridge's ``pretrain()`` runs it (in a spawned process, as in ``test_bridge_pretrain.py``).  Then
``convert mcore-to-hf`` (logits equal to ``from_mcore``'s), ``eval``, ``package-expert`` and ``merge``
run on its output through the CLI; each flags the checkpoint as unverified (Bridge writes no checksums)
and succeeds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import flexolmo_plugin as fp
from flexolmo_plugin.cli import main
from flexolmo_plugin.conversion import bridge_run_config
from flexolmo_plugin.conversion.checkpoint_dir import McoreCheckpointError, has_config, load_config
from flexolmo_plugin.lifecycle.data import prepare_dataset
from flexolmo_plugin.lifecycle.upcycle import upcycle
from tests.support import make_dense_model, make_tokenizer, run_distributed

HIDDEN, VOCAB, ITERS = 48, 320, 2  # the tokenizer has 300 entries: it fits the vocabulary
DOCS = ["def add(a, b): return a + b", "the quick brown fox jumps", "lorem ipsum dolor sit amet"] * 8


def _bridge_pretrain_worker(rank, world_size, anchor: str, save: str):
    """Bridge's ``pretrain()`` itself, on a ConfigContainer from our expert recipe function."""
    from flexolmo_plugin.compat import enable_bridge_compat

    enable_bridge_compat()
    import torch.distributed as dist
    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.pretrain import pretrain

    from flexolmo_plugin.recipes.phases import flexolmo_expert_config

    cfg = flexolmo_expert_config(init_from=anchor, save_dir=save, seq_length=16, train_iters=ITERS,
                                 global_batch_size=2, micro_batch_size=2, lr_warmup_iters=1, save_interval=ITERS,
                                 cpu=True)
    Path(save).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    pretrain(cfg, forward_step)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain_bridge")
    make_dense_model(root / "public_hf", seed=1, vocab_size=VOCAB, hidden_size=HIDDEN)
    embeddings = []
    for seed in (0, 1):
        embeddings.append(root / f"e{seed}.npy")
        np.save(embeddings[-1], (torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed)) * 2).numpy())
    # Without the learned router bias, so that the HF export computes exactly what the checkpoint does.
    upcycle(root / "public_hf", root / "anchor", public_embedding=embeddings[0], domain_embedding=embeddings[1],
            expert_names=("public", "code"), router_bias_init=None)
    run_distributed(_bridge_pretrain_worker, 1, str(root / "anchor"), str(root / "owner"))
    make_tokenizer(root / "tokenizer")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    prepare_dataset(docs, root / "data", tokenizer_dir=root / "tokenizer")
    return root


def _cli(argv, capsys) -> str:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 0, err
    return err


def test_bridge_pretrain_checkpoint_is_read_from_its_run_config(world, megatron_single_process):
    owner = world / "owner"
    assert not list(owner.rglob("flexolmo_config.json")), "Bridge alone writes no flexolmo_config.json"
    latest = owner / f"iter_{ITERS:07d}"
    assert (latest / "run_config.yaml").is_file()
    assert has_config(owner) and has_config(latest) and not has_config(world / "public_hf")
    config, dtype, payload = load_config(owner)
    anchor, anchor_dtype, _ = load_config(world / "anchor")
    # The expert recipe's routing settings; everything else is the upcycled model's.
    expected = anchor.replace(top_k=2, router_z_loss_coeff=1e-3, load_balancing_coeff=0.0,
                              head_dim=None if anchor.kv_channels == HIDDEN // anchor.num_attention_heads
                              else anchor.head_dim)
    assert config == expected
    # the source config.json's transformers settings, through Bridge's run_config.yaml, for the export
    assert config.hf_settings == (("initializer_range", 0.02), ("use_cache", True))
    assert config.expert_names == ("public", "code") and dtype == anchor_dtype == torch.float32
    assert payload["source"]["format"] == "megatron-bridge" and payload["source"]["trainable"] == "anchored"
    assert load_config(latest)[0] == config  # the iter_* directory itself too


def test_every_tool_accepts_it(world, tmp_path, capsys, megatron_single_process):
    owner = world / "owner"
    err = _cli(["convert", "mcore-to-hf", owner, tmp_path / "hf", "--quiet"], capsys)
    assert "unverified" in err
    from transformers import FlexOlmoForCausalLM

    hf = FlexOlmoForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = hf(ids).logits
    ours = fp.logits(fp.from_mcore(owner), ids)
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0), (ours - reference).abs().max()

    assert "unverified" in _cli(["eval", owner, "--data", f"code={world / 'data'}", "--seq-len", 8], capsys)
    assert "unverified" in _cli(["package-expert", owner, tmp_path / "pkg", "--name", "code"], capsys)
    # The public model of the merge is the Bridge checkpoint too: anchored training left expert 0,
    # r_pub and the shared weights exactly as upcycled.
    assert "unverified" in _cli(["merge", owner, tmp_path / "pkg", "--out", tmp_path / "merged", "--quiet"], capsys)
    merged, _, _ = load_config(tmp_path / "merged")
    assert merged.expert_names == ("public", "code") and merged.num_experts == 2
    _cli(["eval", tmp_path / "merged", owner, "--data", f"code={world / 'data'}", "--seq-len", 8], capsys)


def _edited(world, tmp_path, edit) -> Path:
    """A copy of the Bridge checkpoint whose run_config.yaml text went through ``edit``."""
    copy = tmp_path / "copy"
    shutil.copytree(world / "owner", copy)
    path = copy / f"iter_{ITERS:07d}" / "run_config.yaml"
    path.write_text(edit(path.read_text()))
    return copy


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.replace("flexolmo_plugin.recipes.provider.FlexOlmoModelProvider",
                         "megatron.bridge.models.gpt_provider.GPTModelProvider").replace("  router_bias: false\n", ""),
     r"run_config\.yaml: model\._target_ is 'megatron\.bridge\.models\.gpt_provider\.GPTModelProvider', not "
     "FlexOlmo's provider"),
    (lambda t: t.replace("  num_moe_experts: 2\n", ""), r"run_config\.yaml: model\.num_moe_experts is missing"),
    (lambda t: t.replace("  qk_layernorm: false\n", "  qk_layernorm: true\n"),
     r"run_config\.yaml: model\.qk_layernorm is True; FlexOlmo needs False"),
    (lambda t: t.replace("  activation_func:\n    _call_: false\n    _target_: torch.nn.functional.silu\n",
                         "  activation_func:\n    _call_: false\n    _target_: torch.nn.functional.gelu\n"),
     r"model\.activation_func is 'torch\.nn\.functional\.gelu'; FlexOlmo needs 'torch\.nn\.functional\.silu'"),
    (lambda t: t.replace("  rope_scaling: false\n", "  rope_scaling: true\n"), r"model\.rope_scaling=True"),
    (lambda t: t.replace("  router_bias: false\n", "  router_bias: maybe\n"), r"model\.router_bias is 'maybe'"),
    (lambda t: t.replace("  vocab_size: 320\n", "  vocab_size: -1\n"),
     r"run_config\.yaml: the model fields do not describe a FlexOlmo model \(vocab_size must be a positive"),
    (lambda t: "model: [1, 2\n", r"run_config\.yaml: not readable YAML"),
])
def test_a_run_config_that_is_not_flexolmo_is_refused_naming_file_and_field(world, tmp_path, edit, match):
    copy = _edited(world, tmp_path, edit)
    with pytest.raises(McoreCheckpointError, match=match):
        load_config(copy)


def test_python_tags_stay_data_and_names_default(world, tmp_path, monkeypatch):
    """A tag safe_load refuses is read as plain data (never constructed); no expert names → None."""
    constructed = []
    monkeypatch.setattr("os.system", lambda *a: constructed.append(a))
    copy = _edited(world, tmp_path, lambda t: t.replace(
        "  expert_names:\n  - public\n  - code\n",
        "  expert_names: null\n  pwned: !!python/object/apply:os.system ['echo pwned']\n"
        "  also: !!python/tuple [1, 2]\n  name: !custom {a: 1}\n"))
    config, dtype, _ = load_config(copy)
    assert config.expert_names is None and dtype == torch.float32 and not constructed


def test_invariant_fields_mirror_the_provider():
    from flexolmo_plugin.compat import enable_bridge_compat

    enable_bridge_compat()
    from flexolmo_plugin.recipes import provider

    assert bridge_run_config.INVARIANT_FIELDS == provider._INVARIANT_FIELDS
    assert bridge_run_config.PROVIDER_TARGET == f"{provider.__name__}.{provider.FlexOlmoModelProvider.__qualname__}"
