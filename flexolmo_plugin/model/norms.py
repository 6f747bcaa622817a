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
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint
from torch import nn


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


def _rms_normalize(x32: torch.Tensor, mean_square: torch.Tensor, eps: float) -> torch.Tensor:
    return x32 * torch.rsqrt(mean_square + eps)


class FlexOlmoRMSNorm(nn.Module):
    """Post-sublayer and final RMSNorm (replicated over TP; signature of a Megatron norm builder)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Under sequence parallelism each TP rank sees different tokens, so Megatron must
        # all-reduce this replicated weight's gradient over TP; the attribute asks for that.
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = _rms_normalize(x32, x32.pow(2).mean(-1, keepdim=True), self.eps)
        return (self.weight.float() * normed).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class FullWidthRMSNorm(nn.Module):
    """RMSNorm over all heads of a q or k projection, whose heads are split over a TP group.

    Input ``[..., local_heads, head_dim]`` (what Megatron's attention hands to its q/k norm);
    the weight is this rank's contiguous slice ``[local_heads * head_dim]`` of the full-width
    weight, so checkpoints store it sharded along axis 0 like a column-parallel output.
    """

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
        x32 = flat.float()
        if self.is_sharded:
            sum_sq = _AllReduceSum.apply(x32.pow(2).sum(-1, keepdim=True), self.tp_group)
            mean_square = sum_sq / self.full_width
        else:
            mean_square = x32.pow(2).mean(-1, keepdim=True)
        out = self.weight.float() * _rms_normalize(x32, mean_square, self.eps)
        return out.to(x.dtype).reshape(shape)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {"weight": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])

    def extra_repr(self) -> str:
        return f"full_width={self.full_width}, local_width={self.local_width}, eps={self.eps}"
