"""Megatron-Bridge's ``AutoBridge`` on FlexOlmo and OLMo-2, as a Bridge user calls it (issue #15 item 1).

References are independent of the bridge: ``transformers``' own models (logits), the source
safetensors files (exported tensors, bitwise) and our streaming converter ``flexolmo convert``
(``hf_to_mcore`` / ``mcore_to_hf``: the Bridge path must write the same tensors, both read back
with our reader).  Every Bridge call runs in spawned gloo processes (``tests/support.run_distributed``):
Bridge needs ``enable_bridge_compat()``'s process-wide training shims, which must not leak into the
test process.  That the bridges are registered by ``import flexolmo_plugin`` alone (an import hook,
no explicit call) is checked in the worker before Bridge is imported.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from tests.support import make_dense_model, make_hf_model, run_distributed

SEQ = 12
TOL = 1e-5


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(3))


def _bridge():
    """``AutoBridge`` after the CPU shims; asserts the registration came from the import hook."""
    from flexolmo_plugin.compat import enable_bridge_compat

    assert "flexolmo_plugin" in sys.modules and "megatron.bridge" not in sys.modules
    assert "flexolmo_plugin.recipes.bridges" not in sys.modules  # `import flexolmo_plugin` imported no Bridge
    enable_bridge_compat()  # imports part of Bridge (to patch it): the hook registers ours then
    from megatron.bridge import AutoBridge

    assert "flexolmo_plugin.recipes.bridges" in sys.modules
    return AutoBridge


def _hf_logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()(ids).logits


def _export_matches(exported: dict[str, torch.Tensor], directory: Path) -> dict:
    """Names, dtypes and bytes of an export against the source checkpoint's safetensors."""
    from safetensors.torch import load_file

    source = {}
    for file in sorted(directory.glob("*.safetensors")):
        source.update(load_file(file))
    return {"names": sorted(set(source) ^ set(exported)),
            "unequal": sorted(k for k in source if k in exported and not (
                exported[k].dtype == source[k].dtype and torch.equal(exported[k], source[k])))}


def _roundtrip(AutoBridge, directory: Path, out: Path, ids: torch.Tensor) -> dict:
    """from_hf_pretrained -> provider -> model: logits, streamed export, save_hf_pretrained reloaded."""
    import flexolmo_plugin as fp
    from flexolmo_plugin.recipes.provider import FlexOlmoModelProvider

    bridge = AutoBridge.from_hf_pretrained(directory)
    provider = bridge.to_megatron_provider()
    provider.finalize()
    model = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
    reference = _hf_logits(directory, ids)
    exported = dict(bridge.export_hf_weights(model, cpu=True, show_progress=False))
    bridge.save_hf_pretrained(model, out, show_progress=False)
    return {"provider": type(provider) is FlexOlmoModelProvider,
            "logits": (fp.logits(model[0].eval(), ids) - reference).abs().max().item(),
            "export": _export_matches(exported, directory),
            "saved": (_hf_logits(out, ids) - reference).abs().max().item(),
            "bridge": type(bridge._model_bridge).__name__,
            "provider_config": provider.to_flexolmo_config()}


def _router_bias_refused(AutoBridge, directory: Path) -> dict:
    """A model with a learned router bias: exported while the bias is zero, refused once it is not."""
    from flexolmo_plugin.recipes.bridges import RouterBiasExportError

    bridge = AutoBridge.from_hf_pretrained(directory)
    provider = bridge.to_megatron_provider()
    provider.router_bias = True
    provider.finalize()
    model = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
    zero = _export_matches(dict(bridge.export_hf_weights(model, cpu=True, show_progress=False)), directory)
    with torch.no_grad():
        model[0].decoder.layers[1].mlp.router.domain_biases[0].fill_(-0.5)
    try:
        list(bridge.export_hf_weights(model, cpu=True, show_progress=False))
        refused = None
    except RouterBiasExportError as error:
        refused = str(error)
    return {"zero": zero, "refused": refused}


def _missing_tensor_refused(AutoBridge, directory: Path, broken: Path) -> str | None:
    """An HF checkpoint without one expert tensor: a FlexOlmoError naming it, not a random weight."""
    import shutil

    from safetensors.torch import load_file, save_file

    from flexolmo_plugin.recipes.bridges import MissingHFTensorError

    shutil.copytree(directory, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    try:
        AutoBridge.from_hf_pretrained(broken).to_megatron_model(wrap_with_ddp=False, use_cpu_initialization=True)
    except MissingHFTensorError as error:
        return str(error)
    return None


def _single_worker(rank, world_size, root: str):
    """TP=1: both architectures, the bias refusal, import_ckpt / export_ckpt against flexolmo convert."""
    from flexolmo_plugin.conversion.convert import hf_to_mcore, mcore_to_hf
    from flexolmo_plugin.conversion.mapping import entries
    from flexolmo_plugin.conversion.mcore_io import CanonicalReader
    from flexolmo_plugin.model.config import FlexOlmoConfig
    from flexolmo_plugin.model.parallel import ensure_model_parallel, teardown_model_parallel

    root = Path(root)
    AutoBridge = _bridge()
    ensure_model_parallel()
    results = {"flex": _roundtrip(AutoBridge, root / "flex", root / "flex_saved", _ids(100)),
               "olmo2": _roundtrip(AutoBridge, root / "olmo2", root / "olmo2_saved", _ids(100)),
               "bias": _router_bias_refused(AutoBridge, root / "flex"),
               "missing": _missing_tensor_refused(AutoBridge, root / "flex", root / "broken")}

    AutoBridge.import_ckpt(root / "flex", root / "bridge_ckpt")
    hf_to_mcore(root / "flex", root / "ours_ckpt")
    config = FlexOlmoConfig.from_hf(_read_json(root / "flex" / "config.json"))
    theirs, ours = CanonicalReader(root / "bridge_ckpt"), CanonicalReader(root / "ours_ckpt")
    results["import"] = sorted(e.megatron for e in entries(config)
                               if not torch.equal(theirs.read(e.megatron), ours.read(e.megatron)))
    results["import_count"] = len(list(entries(config)))

    # export_ckpt sets up (and tears down) a world of its own, on a port of its own.
    teardown_model_parallel()
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    AutoBridge.from_hf_pretrained(root / "flex").export_ckpt(root / "bridge_ckpt", root / "bridge_hf",
                                                               show_progress=False)
    mcore_to_hf(root / "bridge_ckpt", root / "ours_hf")
    from safetensors.torch import load_file

    results["export_ckpt"] = _export_matches(load_file(root / "bridge_hf" / "model.safetensors"), root / "ours_hf")
    return results


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def test_autobridge_tp1_flexolmo_olmo2_and_flexolmo_convert(tmp_path):
    make_hf_model(seed=0, num_experts=3, num_experts_per_tok=2).save_pretrained(tmp_path / "flex")  # GQA 6/2
    make_dense_model(tmp_path / "olmo2", seed=1)
    results = run_distributed(_single_worker, 1, str(tmp_path))[0]
    from flexolmo_plugin.model.config import FlexOlmoConfig

    for name, bridge in (("flex", "FlexOlmoBridge"), ("olmo2", "Olmo2Bridge")):
        got = results[name]
        assert got["bridge"] == bridge and got["provider"], got
        assert got["logits"] <= TOL, (name, got["logits"])
        assert got["export"] == {"names": [], "unequal": []}, (name, got["export"])
        assert got["saved"] <= TOL, (name, got["saved"])
    assert results["flex"]["provider_config"] == FlexOlmoConfig.from_hf(_read_json(tmp_path / "flex" / "config.json"))
    assert results["olmo2"]["provider_config"].num_experts == 1
    assert results["bias"]["zero"] == {"names": [], "unequal": []}
    assert results["bias"]["refused"] and "router bias" in results["bias"]["refused"]
    assert "model.layers.1.mlp.experts.2.up_proj.weight" in (results["missing"] or ""), results["missing"]
    assert results["import_count"] > 20 and results["import"] == [], results["import"]
    assert results["export_ckpt"] == {"names": [], "unequal": []}, results["export_ckpt"]


def _parallel_worker(rank, world_size, root: str):
    """TP=2 (sequence parallel) and EP=2 in the same two processes: logits and the streamed export."""
    from megatron.core import parallel_state as ps

    import flexolmo_plugin as fp
    from flexolmo_plugin.model.layout import ParallelLayout
    from flexolmo_plugin.model.parallel import ensure_model_parallel

    root = Path(root)
    AutoBridge = _bridge()
    ids = _ids(100)
    reference = _hf_logits(root / "flex", ids)
    results = {}
    for name, layout in (("tp2", ParallelLayout(tensor_parallel=2, sequence_parallel=True)),
                         ("ep2", ParallelLayout(expert_parallel=2))):
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ensure_model_parallel(layout)
        bridge = AutoBridge.from_hf_pretrained(root / "flex")
        provider = bridge.to_megatron_provider()
        for field, value in layout.megatron_fields().items():
            setattr(provider, field, value)
        provider.finalize()
        model = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
        exported = dict(bridge.export_hf_weights(model, cpu=True, show_progress=False))
        results[name] = {"logits": (fp.logits(model[0].eval(), ids) - reference).abs().max().item(),
                         "export": _export_matches(exported, root / "flex"),
                         "local_experts": len(model[0].decoder.layers[0].mlp.experts.local_experts)}
    return results


@pytest.mark.multiprocess
def test_autobridge_tp2_and_ep2(tmp_path):
    make_hf_model(seed=2, num_experts=4, num_experts_per_tok=2).save_pretrained(tmp_path / "flex")  # GQA 6/2
    results = run_distributed(_parallel_worker, 2, str(tmp_path))
    for rank, per_layout in results.items():
        for name, got in per_layout.items():
            assert got["logits"] <= TOL, (rank, name, got["logits"])
            assert got["export"] == {"names": [], "unequal": []}, (rank, name, got["export"])
        assert per_layout["ep2"]["local_experts"] == 2 and per_layout["tp2"]["local_experts"] == 4, per_layout
