"""The memory-lean RMSNorm (model/norms.py): eager FlexOlmo numerics, a fraction of the saved memory.

Forward results must be bitwise those of autograd of the eager formula (the previous implementation,
still selectable with ``memory_lean = False``) and of ``transformers``' own RMSNorm, in fp32 and bf16;
gradients equal within fp32 rounding, checked against the eager path and against float64 autograd of
the formula.  Saved-activation bytes are measured with ``torch.autograd.graph.saved_tensors_hooks``
(distinct storages, parameters excluded) and must drop by exactly the amount derived in the module
docstring: per norm of width ``w`` over ``N`` tokens, bf16 ``8Nw + 4w`` (fp32 upcast, normalised
value, fp32 copy of the weight) becomes ``2Nw`` (the input), fp32 ``8Nw`` becomes ``4Nw``; both keep
the ``4N`` bytes of ``rstd``.
"""

import pytest
import torch
from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoRMSNorm as HFRMSNorm

from flexolmo_plugin.model.norms import FlexOlmoRMSNorm, FullWidthRMSNorm, rms_norm
from tests.support import run_distributed

EPS = 1e-6


class _Config:  # what a Megatron norm builder reads of the TransformerConfig
    def __init__(self, dtype):
        self.params_dtype, self.sequence_parallel = dtype, False


def _inputs(dtype, shape=(5, 3, 48), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(shape, generator=g)).to(dtype)
    weight = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(dtype)
    grad = torch.randn(shape, generator=g).to(dtype)
    return x, weight, grad


def _run(norm, x, grad):
    x = x.clone().requires_grad_()
    out = norm(x)
    out.backward(grad)
    return out.detach(), x.grad, norm.weight.grad


def _formula64(x, weight, grad):
    """Float64 autograd of OLMo-2's RMSNorm formula: the gradients' reference."""
    x, weight = x.double().requires_grad_(), weight.double().requires_grad_()
    out = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))
    out.backward(grad.double())
    return x.grad, weight.grad


def _max_rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["post_norm", "qk_norm"])
def test_forward_bitwise_gradients_within_rounding(kind, dtype):
    x, weight, grad = _inputs(dtype, (5, 3, 48))
    if kind == "qk_norm":  # [..., heads, head_dim], normalised over all 48 features of a token
        x, grad = x.reshape(5, 3, 6, 8), grad.reshape(5, 3, 6, 8)
    results = {}
    for lean in (True, False):
        if kind == "qk_norm":  # [..., heads, head_dim], normalised over all 48 features of a token
            norm = FullWidthRMSNorm(full_width=48, local_width=48, eps=EPS, params_dtype=dtype)
        else:
            norm = FlexOlmoRMSNorm(_Config(dtype), 48, eps=EPS)
        norm.memory_lean = lean
        with torch.no_grad():
            norm.weight.copy_(weight)
        results[lean] = _run(norm, x, grad)
    (out, dx, dw), (eager_out, eager_dx, eager_dw) = results[True], results[False]
    hf = HFRMSNorm(48, eps=EPS).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(weight)
        hf_out = hf(x.reshape(*x.shape[:2], 48)).reshape(x.shape)
    assert torch.equal(out, eager_out) and torch.equal(out, hf_out)
    assert dx.dtype == dtype and dw.dtype == dtype
    ref_dx, ref_dw = _formula64(x.reshape(*x.shape[:2], 48), weight, grad.reshape(*x.shape[:2], 48))
    ref_dx = ref_dx.reshape(x.shape)
    if dtype == torch.float32:
        # fp32 rounding of a handful of operations: relative errors of order 1e-7
        assert _max_rel(dx, eager_dx) < 1e-6 and _max_rel(dw, eager_dw) < 1e-6
        assert _max_rel(dx, ref_dx) < 1e-6 and _max_rel(dw, ref_dw) < 1e-6
    else:
        # the same fp32 values rounded to bf16: at most one bf16 step (2^-8 relative) apart
        for ours, eager in ((dx, eager_dx), (dw, eager_dw)):
            step = eager.float().abs() * 2.0 ** -7 + 1e-30
            assert ((ours.float() - eager.float()).abs() <= step).all()
        assert _max_rel(dx, ref_dx) < 2.0 ** -7 and _max_rel(dw, ref_dw) < 2.0 ** -7


class _SavedBytes:
    """Bytes of the distinct storages autograd saves for backward, parameters excluded."""

    def __init__(self, exclude=()):
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self.storages = {}

    def __enter__(self):
        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in self.exclude:
                self.storages[storage.data_ptr()] = storage.nbytes()
            return t

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("weight_trains", [True, False], ids=["trained", "frozen"])
def test_one_norm_saves_its_input_and_rstd_only(dtype, weight_trains):
    n, w = 40, 48
    x, weight, _ = _inputs(dtype, (n, w))
    saved = {}
    for lean in (True, False):
        norm = FlexOlmoRMSNorm(_Config(dtype), w, eps=EPS)
        norm.memory_lean = lean
        norm.weight.requires_grad_(weight_trains)
        inp = x.clone().requires_grad_()
        with _SavedBytes(exclude=[norm.weight]) as counter:
            norm(inp)
        saved[lean] = counter.total
    size = 4 if dtype == torch.float32 else 2
    assert saved[True] == size * n * w + 4 * n  # the input, fp32 rstd
    # eager: the fp32 upcast (the input itself in fp32), rstd, the normalised value if the weight
    # trains, and in bf16 the weight's fp32 copy
    eager = 4 * n * w + 4 * n + (4 * n * w if weight_trains else 0) + (4 * w if dtype == torch.bfloat16 else 0)
    assert saved[False] == eager


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_model_saved_bytes_drop_by_the_derived_amount(dtype, megatron_single_process):
    """Two FlexOlmo layers (GQA: q 48, kv 16 wide; h 48) and the final norm, training mode."""
    from flexolmo_plugin.model.build import build_model, causal_attention_mask, next_token_loss
    from flexolmo_plugin.model.config import FlexOlmoConfig

    config = FlexOlmoConfig(vocab_size=128, hidden_size=48, intermediate_size=40, num_layers=2, num_attention_heads=6,
                            num_key_value_heads=2, num_experts=2, top_k=2, make_vocab_size_divisible_by=128)
    torch.manual_seed(0)
    model = build_model(config, params_dtype=dtype).train()
    batch, seq = 2, 16
    ids = torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(1))
    position_ids = torch.arange(seq).expand(batch, seq)
    saved, outputs, grads = {}, {}, {}
    for lean in (False, True):
        for module in model.modules():
            if hasattr(module, "memory_lean"):
                module.memory_lean = lean
        model.zero_grad()
        with _SavedBytes(exclude=model.parameters()) as counter:
            logits = model(ids, position_ids, causal_attention_mask(seq, ids.device))
        next_token_loss(logits, ids).backward()
        saved[lean], outputs[lean] = counter.total, logits.detach()
        grads[lean] = {name: p.grad.clone() for name, p in model.named_parameters()}
    assert torch.equal(outputs[True], outputs[False])
    for name, eager in grads[False].items():
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert _max_rel(grads[True][name], eager) < tol, name
    tokens, h, widths = batch * seq, 48, 48 + 48 + 48 + 16  # post-attn, post-MoE, q, k norm widths
    if dtype == torch.float32:  # the normalised fp32 value (the input is saved either way)
        drop = 2 * 4 * tokens * widths + 4 * tokens * h
    else:  # fp32 upcast + normalised value + the weight's fp32 copy, minus the bf16 input
        drop = 2 * (6 * tokens * widths + 4 * widths) + 6 * tokens * h + 4 * h
    assert saved[False] - saved[True] == drop


def _tensor_parallel_norm(rank, world_size, x, weight, grad):
    """Each rank holds half of the heads of a full-width q norm; lean and eager, then gathered."""
    import torch.distributed as dist

    group = dist.new_group(list(range(world_size)))
    local = x.shape[-1] // world_size
    part = slice(rank * local, (rank + 1) * local)
    results = {}
    for lean in (True, False):
        inp = x[..., part].contiguous().requires_grad_()
        w = weight[part].clone().requires_grad_()
        out = rms_norm(inp, w, EPS, width=x.shape[-1], group=group, memory_lean=lean)
        out.backward(grad[..., part])
        results[lean] = (out.detach(), inp.grad, w.grad)
    return results


def test_tensor_parallel_full_width_norm_matches_single_process():
    """TP=2 (gloo): the sum of squares and the backward row statistic are all-reduced."""
    x, weight, grad = _inputs(torch.float32, (7, 2, 48), seed=3)
    full = FullWidthRMSNorm(full_width=48, local_width=48, eps=EPS, params_dtype=torch.float32)
    with torch.no_grad():
        full.weight.copy_(weight)
    out, dx, dw = _run(full, x.reshape(7, 2, 6, 8), grad.reshape(7, 2, 6, 8))
    ranks = run_distributed(_tensor_parallel_norm, 2, x, weight, grad, timeout=180)
    for lean in (True, False):
        gathered = [torch.cat([ranks[r][lean][i] for r in (0, 1)], dim=-1) for i in range(3)]
        assert _max_rel(gathered[0], out.reshape(7, 2, 48)) < 1e-6
        assert _max_rel(gathered[1], dx.reshape(7, 2, 48)) < 1e-6
        assert _max_rel(gathered[2], dw) < 1e-6
    for r in (0, 1):  # lean forward is bitwise the eager TP forward
        assert torch.equal(ranks[r][True][0], ranks[r][False][0])
