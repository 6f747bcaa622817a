"""RMSNorms with FlexOlmo's numerics, including the full-width q/k norm under tensor parallelism.

Both norms compute in fp32 and multiply by the weight in fp32 before casting back, exactly as
OLMo-2 / ``transformers`` ``FlexOlmoRMSNorm`` do; torch's ``RMSNorm`` computes in the input
dtype, which is visibly different in bf16.

FlexOlmo normalises q over all ``heads * head_dim`` features of a token (and k over all
``kv_heads * head_dim``), not per head.  With tensor parallelism each rank holds only some heads,
so the sum of squares must be all-reduced over the TP group before normalising; the all-reduce
must also run in the backward pass, because each rank's loss depends on the shared statistic
through *different* heads (Megatron's ``reduce_from_tensor_model_parallel_region`` is the
identity in backward and would drop the other ranks' contributions).

**Memory.**  Autograd of the eager formula keeps two fp32 ``[tokens, width]`` tensors per norm for
the backward pass (the fp32 upcast, saved by ``pow`` and the product, and the normalised value,
saved for the weight gradient) -- four norms per layer, ~8 bytes per element on top of 16-bit
activations, and Megatron's "layernorm" selective recompute cannot reach them (it covers only the
input / pre-MLP norm slots, identities here).  :class:`_LeanRMSNorm` runs the same fp32 operations
in the same order (so its output is bitwise the eager one) but saves only the input in its own
dtype and the per-row ``rstd`` (fp32 ``[tokens, 1]``); the backward recomputes ``x · rstd`` (one
elementwise product) and applies the closed-form RMSNorm gradient.  It is always on: unlike a
checkpoint of the norm it never re-runs the reduction or, under TP, the forward all-reduce, and needs
no recompute setting.  ``memory_lean = False`` on an instance restores autograd of the eager
formula (the reference for the tests and ``benchmarks/bench_norm_memory.py``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint
from torch import nn
from torch.autograd.function import once_differentiable


class _AllReduceSum(torch.autograd.Function):
    """Sum over a process group in forward, and (since every rank consumes it) in backward."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _eager_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, width: int, group) -> torch.Tensor:
    """OLMo-2's formula through plain autograd (saves the fp32 upcast and the normalised value)."""
    x32 = x.float()
    if group is None:
        mean_square = x32.pow(2).mean(-1, keepdim=True)
    else:
        mean_square = _AllReduceSum.apply(x32.pow(2).sum(-1, keepdim=True), group) / width
    return (weight.float() * (x32 * torch.rsqrt(mean_square + eps))).to(x.dtype)


class _LeanRMSNorm(torch.autograd.Function):
    """The eager formula's forward, op for op; saves ``x`` (own dtype) and fp32 ``rstd`` only.

    With ``n = x·rstd`` and ``g_n = g · w`` (fp32), the gradients are ``dw = Σ_rows g · n`` and
    ``dx = rstd · (g_n − n · Σ_width(g_n · n) / width)``; under TP the width sum spans all ranks,
    so that row statistic is all-reduced in backward, as the sum of squares is in forward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, width: int, group) -> torch.Tensor:
        x32 = x.float()
        if group is None:
            mean_square = x32.pow(2).mean(-1, keepdim=True)
        else:
            sum_sq = x32.pow(2).sum(-1, keepdim=True)
            dist.all_reduce(sum_sq, op=dist.ReduceOp.SUM, group=group)
            mean_square = sum_sq / width
        rstd = torch.rsqrt(mean_square + eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.width, ctx.group = width, group
        return (weight.float() * (x32 * rstd)).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        g = grad_out.float()
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (g * normed).reshape(-1, normed.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            g_normed = g * weight.float()
            dot = (g_normed * normed).sum(-1, keepdim=True)
            if ctx.group is not None:
                dist.all_reduce(dot, op=dist.ReduceOp.SUM, group=ctx.group)
            grad_x = ((g_normed - normed * (dot / ctx.width)) * rstd).to(x.dtype)
        return grad_x, grad_weight, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, width: int | None = None, group=None,
             memory_lean: bool = True) -> torch.Tensor:
    """FlexOlmo's fp32 RMSNorm over the last dim (``width`` features in all, summed over ``group``)."""
    width = x.shape[-1] if width is None else width
    if memory_lean:
        return _LeanRMSNorm.apply(x, weight, eps, width, group)
    return _eager_rms_norm(x, weight, eps, width, group)


class FlexOlmoRMSNorm(nn.Module):
    """Post-sublayer and final RMSNorm (replicated over TP; signature of a Megatron norm builder)."""

    memory_lean = True  # see the module docstring; False = autograd of the eager formula

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Under sequence parallelism each TP rank sees different tokens, so Megatron must
        # all-reduce this replicated weight's gradient over TP; the attribute asks for that.
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, memory_lean=self.memory_lean)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class FullWidthRMSNorm(nn.Module):
    """RMSNorm over all heads of a q or k projection, whose heads are split over a TP group.

    Input ``[..., local_heads, head_dim]`` (what Megatron's attention hands to its q/k norm);
    the weight is this rank's contiguous slice ``[local_heads * head_dim]`` of the full-width
    weight, so checkpoints store it sharded along axis 0 like a column-parallel output.  The flattened
    input it saves for backward is a copy of Megatron's split q or k, except with one local KV head, where
    it is a view that keeps the whole fused QKV output (v included) alive: measured, 2·kv bytes per token more.
    """

    memory_lean = True  # see the module docstring; False = autograd of the eager formula

    def __init__(self, *, full_width: int, local_width: int, eps: float, params_dtype: torch.dtype,
                 tp_group=None):
        super().__init__()
        if full_width % local_width:
            raise ValueError(f"local width {local_width} does not divide full width {full_width}")
        self.full_width = full_width
        self.local_width = local_width
        self.eps = eps
        self.tp_group = tp_group
        self.weight = nn.Parameter(torch.ones(local_width, dtype=params_dtype))
        # Tensor-parallel attributes read by Megatron's grad reduction and optimizer utilities.
        self.weight.tensor_model_parallel = full_width != local_width
        self.weight.partition_dim = 0
        self.weight.partition_stride = 1

    @property
    def is_sharded(self) -> bool:
        return self.full_width != self.local_width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(*shape[:-2], shape[-2] * shape[-1])
        if flat.shape[-1] != self.local_width:
            raise ValueError(f"expected {self.local_width} features per token, got {flat.shape[-1]}")
        out = rms_norm(flat, self.weight, self.eps, width=self.full_width,
                       group=self.tp_group if self.is_sharded else None, memory_lean=self.memory_lean)
        return out.reshape(shape)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {"weight": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])

    def extra_repr(self) -> str:
        return f"full_width={self.full_width}, local_width={self.local_width}, eps={self.eps}"
