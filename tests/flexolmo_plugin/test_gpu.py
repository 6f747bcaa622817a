"""GPU and Transformer Engine paths: run wherever CUDA (and TE) exist, skipped with a reason elsewhere.

Run on a GPU machine with ``scripts/test.sh -m "gpu or te"``.
"""

import pytest
import torch

import flexolmo_plugin as fp
from flexolmo_plugin.model.spec import transformer_engine_available
from tests.support import hf_reference, make_hf_model, save_hf_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI machines have none)")
needs_te = pytest.mark.skipif(not (torch.cuda.is_available() and transformer_engine_available()),
                              reason="needs CUDA and transformer-engine (install the 'te' extra in an NGC container)")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_parity(dtype, tmp_path, megatron_single_process):
    hf = make_hf_model(seed=4)
    model = fp.from_hf(save_hf_model(hf, tmp_path / "hf"), params_dtype=dtype)
    assert next(model.parameters()).is_cuda
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    ref32, _ = hf_reference(hf, ids)
    ours = fp.logits(model, ids).float().cpu()
    if dtype == torch.float32:
        # TF32 matmuls may be on by default on Ampere+; allow their rounding
        assert (ours - ref32).abs().max().item() <= 5e-3
    else:
        ref16, _ = hf_reference(hf.to(torch.bfloat16), ids)
        assert (ours - ref32).abs().max().item() <= 2 * (ref16.float() - ref32).abs().max().item() + 1e-2


@pytest.mark.te
@needs_te
def test_te_backend_matches_local_backend(tmp_path, megatron_single_process):
    hf = make_hf_model(seed=6)
    hf_dir = save_hf_model(hf, tmp_path / "hf")
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    local = fp.logits(fp.from_hf(hf_dir, params_dtype=torch.bfloat16), ids).float()
    te = fp.logits(fp.from_hf(hf_dir, params_dtype=torch.bfloat16, backend="te"), ids).float()
    assert (te - local).abs().max().item() <= 5e-2


def test_te_backend_is_refused_clearly_without_transformer_engine(megatron_single_process):
    if transformer_engine_available():
        pytest.skip("transformer-engine is installed here")
    from flexolmo_plugin.model.spec import flexolmo_layer_spec

    with pytest.raises(RuntimeError, match="transformer-engine"):
        flexolmo_layer_spec(backend="te")


@pytest.mark.te
@needs_te
def test_te_backend_keeps_the_public_expert_frozen_under_anchoring(tmp_path, megatron_single_process):
    """TE's grouped linear shares requires_grad across experts; our TE experts are per-expert modules."""
    from flexolmo_plugin.lifecycle.freezing import anchor

    hf = make_hf_model(seed=6, num_experts=2, num_experts_per_tok=2)
    model = fp.from_hf(save_hf_model(hf, tmp_path / "hf"), params_dtype=torch.bfloat16, backend="te")
    anchor(model, owner_expert=1)
    model.train()
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    fp.next_token_loss(fp.logits(model, ids, grad=True), ids).backward()
    for layer in model.decoder.layers:
        public, owner = layer.mlp.experts.local_experts
        assert all(p.grad is None and not p.requires_grad for p in public.parameters())
        assert all(p.requires_grad and p.grad is not None for p in owner.parameters())


@pytest.mark.gpu
@needs_cuda
def test_bench_gpu_measures_flexolmo_against_stock_moe(tmp_path):
    """The GPU benchmark runs at a small shape and reports the ratio to Megatron's stock MoE layer."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    md = tmp_path / "gpu.md"
    out = subprocess.run(
        [
            sys.executable,
            str(root / "benchmarks" / "bench_gpu.py"),
            "--hidden",
            "1024",
            "--ffn",
            "2816",
            "--seq",
            "1024",
            "--steps",
            "5",
            "--warmup",
            "2",
            "--markdown",
            str(md),
        ],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert out.returncode == 0, out.stderr
    assert "vs stock" in md.read_text() and "anchored / full step time" in md.read_text()


@pytest.mark.te
@needs_te
@pytest.mark.parametrize("recipe", ["tensorwise", "blockwise"])
def test_fp8_anchored_step_keeps_the_public_expert_frozen(recipe, tmp_path, megatron_single_process):
    """One FP8 training step of the TE backend under Megatron's own FP8 context (Hopper recipes)."""
    from megatron.core.fp8_utils import get_fp8_context

    from flexolmo_plugin.lifecycle.freezing import anchor
    from flexolmo_plugin.recipes.precision import check_device_supports

    capability = torch.cuda.get_device_capability()
    check_device_supports(f"fp8-{recipe}", capability)
    hf = make_hf_model(
        seed=6,
        num_experts=2,
        num_experts_per_tok=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    model = fp.from_hf(save_hf_model(hf, tmp_path / "hf"), params_dtype=torch.bfloat16, backend="te")
    config = model.config
    config.fp8, config.fp8_recipe = "hybrid", recipe
    anchor(model, owner_expert=1)
    model.train()
    ids = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    with get_fp8_context(config):
        loss = fp.next_token_loss(fp.logits(model, ids, grad=True), ids)
    loss.backward()
    assert torch.isfinite(loss)
    for layer in model.decoder.layers:
        public, owner = layer.mlp.experts.local_experts
        assert all(p.grad is None for p in public.parameters())
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in owner.parameters())
