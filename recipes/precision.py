"""Numerics of the production recipes: BF16 or FP8 through Megatron's own configuration.

FP8 is not ours to implement: Transformer Engine runs the GEMMs and Megatron-Core wraps each layer
in TE's autocast (``TransformerConfig.fp8`` / ``fp8_recipe``); Megatron-Bridge sets those fields from
a :class:`~megatron.bridge.training.mixed_precision.MixedPrecisionConfig`.  This module picks the
setting per recipe name and refuses the combinations that would fail late (after model
construction on hundreds of GPUs) or silently do something else:

* ``fp8-tensorwise`` (per-tensor current scaling) and ``fp8-blockwise`` (1x128 / 128x128 block
  scaling, Megatron's recommendation for MoE on Hopper) run on Hopper (sm_90) and later;
  ``fp8-blockwise`` also needs cuBLAS 12.9 or later (its block-scaled FP8 GEMM), i.e. a PyTorch
  built against CUDA >= 12.9 -- Transformer Engine's ``check_fp8_block_scaling_support`` decides on
  ``torch.version.cuda`` the same way, but only once the first FP8 layer runs;
  ``fp8-mxfp8`` and ``nvfp4`` need Blackwell (sm_100+) tensor cores and are refused on Hopper
  with a message naming the alternatives;
* FP8 GEMMs need every GEMM dimension on a rank to be a multiple of 16 (Megatron's
  ``get_fp8_align_size``): hidden size, each expert's FFN width per expert-TP rank, the q/k/v
  widths per TP rank, and the tokens of a micro-batch per rank;
* the router GEMM stays fp32 (``moe_router_dtype="fp32"``: FlexOlmo's routing is a softmax over
  domain-embedding scores that is compared across experts, and Megatron never puts the router
  through TE); ``moe_router_padding_for_quantization`` stays off: our experts are Megatron's
  ``SequentialMLP``, which pads each expert's tokens for FP8/FP4 itself, so padding in the routing map
  too is redundant and makes the all-to-all dispatcher's output size data-dependent (an earlier
  device-to-host sync); at top-k = E (the dense mixture path) there is nothing it could pad;
* optional BF16 first/last layers (``bf16_edge_layers``), NVIDIA's stabiliser for current scaling.
"""

from __future__ import annotations

from typing import Any

import torch

from flexolmo_plugin.compat import cuda_build_version, device_capability
from flexolmo_plugin.model.config import ConfigError, FlexOlmoConfig

PRECISIONS = ("bf16", "fp8-tensorwise", "fp8-blockwise")  # valid on H100
BLACKWELL_ONLY = ("fp8-mxfp8", "nvfp4")
FP8_ALIGN = 16
HOPPER = (9, 0)
BLACKWELL = (10, 0)
BLOCKWISE_MIN_CUDA = (12, 9)  # cuBLAS's block-scaled FP8 GEMM (TE: check_fp8_block_scaling_support)
_LOCAL = "local"  # check_container_precision: the CUDA version of this process's PyTorch
# Bridge preset behind each name (megatron/bridge/training/mixed_precision.py), and the number of
# BF16 edge layers that preset's authors chose (0 = none).
_PRESETS = {
    "bf16": ("bf16_mixed", 0),
    "fp8-tensorwise": ("bf16_with_fp8_current_scaling_mixed", 1),
    "fp8-blockwise": ("bf16_with_fp8_subchannel_scaling_mixed", 0),
    "fp8-mxfp8": ("bf16_with_mxfp8_mixed", 0),
    "nvfp4": ("bf16_with_nvfp4_mixed", 0),
}
_RECIPE_OF = {"tensorwise": "fp8-tensorwise", "blockwise": "fp8-blockwise", "mxfp8": "fp8-mxfp8",
              "delayed": "fp8-delayed", "custom": "fp8-custom"}


def check_precision_name(precision: str) -> None:
    if precision in PRECISIONS or precision in BLACKWELL_ONLY:
        return
    raise ConfigError(f"precision={precision!r}; expected one of {PRECISIONS} (Hopper and later) "
                      f"or {BLACKWELL_ONLY} (Blackwell only)")


def parse_cuda_version(version: str | None) -> tuple[int, int] | None:
    """``"12.8"`` -> ``(12, 8)``; None for a CPU-only PyTorch (compared as numbers: 12.10 > 12.9)."""
    if not version:
        return None
    parts = str(version).split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise ConfigError(f"cannot read the CUDA version {version!r}") from None


def current_cuda_version() -> tuple[int, int] | None:
    """The CUDA version PyTorch was built against (``torch.version.cuda``), whose cuBLAS it loads;
    None for a CPU-only build.  Needs no GPU, so a login node knows it too."""
    return parse_cuda_version(cuda_build_version())


def check_device_supports(precision: str, capability: tuple[int, int] | None,
                          cuda_version: tuple[int, int] | None = None) -> None:
    """Refuse a precision the GPU (compute capability ``(major, minor)``) or the CUDA libraries
    (``cuda_version``, see :func:`current_cuda_version`) cannot run.

    ``capability=None`` (no GPU visible, e.g. building a recipe on a login node) checks nothing of
    the GPU; ``cuda_version=None`` checks nothing of the libraries.
    """
    check_precision_name(precision)
    if precision == "fp8-blockwise" and cuda_version is not None and tuple(cuda_version[:2]) < BLOCKWISE_MIN_CUDA:
        have = ".".join(map(str, cuda_version[:2]))
        need = ".".join(map(str, BLOCKWISE_MIN_CUDA))
        raise ConfigError(
            f"precision 'fp8-blockwise' needs cuBLAS >= {need} for its block-scaled FP8 GEMMs, but this PyTorch "
            f"is built against CUDA {have} (torch.version.cuda); Transformer Engine would refuse it at the first "
            f"FP8 layer. Use a PyTorch / Transformer Engine built against CUDA >= {need}, or 'fp8-tensorwise' or "
            "'bf16'.")
    if capability is None or precision == "bf16":
        return
    sm = f"sm_{capability[0]}{capability[1]}"
    if precision in BLACKWELL_ONLY and tuple(capability) < BLACKWELL:
        raise ConfigError(
            f"precision {precision!r} needs Blackwell tensor cores (sm_100 or later); this GPU is {sm}"
            f"{' (Hopper: H100/H200)' if tuple(capability[:1]) == HOPPER[:1] else ''}. "
            f"On Hopper use 'fp8-blockwise' (recommended for MoE) or 'fp8-tensorwise', or 'bf16'.")
    if tuple(capability) < (8, 9):
        raise ConfigError(f"FP8 ({precision!r}) needs Ada/Hopper or later (sm_89+); this GPU is {sm}: use 'bf16'")


def current_capability() -> tuple[int, int] | None:
    """The local GPU's compute capability, or None without CUDA."""

    return device_capability()


def check_fp8_alignment(config: FlexOlmoConfig, *, tensor_parallel: int = 1, expert_tensor_parallel: int | None = None,
                        seq_length: int, micro_batch_size: int, sequence_parallel: bool = False) -> None:
    """Every FP8 GEMM dimension on a rank must be a multiple of 16; lists all violations at once."""
    etp = expert_tensor_parallel or tensor_parallel
    q_width = config.num_attention_heads * config.kv_channels
    kv_width = config.num_key_value_heads * config.kv_channels
    dims = {
        "hidden_size": config.hidden_size,
        f"expert FFN width per expert-TP rank (intermediate_size {config.intermediate_size} / ETP {etp})":
            config.intermediate_size / etp,
        f"query width per TP rank ({q_width} / TP {tensor_parallel})": q_width / tensor_parallel,
        f"key/value width per TP rank ({kv_width} / TP {tensor_parallel})": kv_width / tensor_parallel,
        f"tokens per micro-batch per rank (seq {seq_length} x micro-batch {micro_batch_size}"
        f"{f' / TP {tensor_parallel} (sequence parallel)' if sequence_parallel else ''})":
            seq_length * micro_batch_size / (tensor_parallel if sequence_parallel else 1),
    }
    bad = [f"{name} = {value:g}" for name, value in dims.items() if value % FP8_ALIGN]
    if bad:
        raise ConfigError(f"FP8 GEMMs need multiples of {FP8_ALIGN}; not aligned: " + "; ".join(bad) +
                          ". Use 'bf16' or change the sizes / parallel layout.")


def mixed_precision_config(precision: str, *, bf16_edge_layers: int | None = None, fp8_param_gather: bool = False):
    """Bridge ``MixedPrecisionConfig`` for ``precision``.

    ``bf16_edge_layers``: keep this many layers at each end of the stack in BF16 (None: the preset's
    choice, 1 for tensorwise, 0 otherwise).  ``fp8_param_gather`` (keep weights as FP8 tensors and
    all-gather them in FP8) defaults off: weights then stay BF16 for checkpoints, export and the
    anchor digests, and FP8 applies to the GEMMs only.
    """
    from megatron.bridge.training.mixed_precision import get_mixed_precision_config

    check_precision_name(precision)
    preset, default_edges = _PRESETS[precision]
    mp = get_mixed_precision_config(preset)
    if precision == "bf16":
        if bf16_edge_layers:
            raise ConfigError("bf16_edge_layers only applies to FP8 precisions")
        return mp
    edges = default_edges if bf16_edge_layers is None else bf16_edge_layers
    if edges < 0:
        raise ConfigError(f"bf16_edge_layers must be >= 0, got {edges}")
    mp.first_last_layers_bf16 = edges > 0
    mp.num_layers_at_start_in_bf16 = mp.num_layers_at_end_in_bf16 = edges
    if precision.startswith("fp8"):
        mp.fp8_param_gather = fp8_param_gather  # keeps fp8_param in sync (Bridge's __setattr__)
    elif precision == "nvfp4":
        if fp8_param_gather:
            raise ConfigError("fp8_param_gather applies to the FP8 precisions; 'nvfp4' keeps its weights in BF16")
        # Bridge's preset stores the weights as FP4 (fp4_param_gather=True); ours keeps them BF16 for
        # checkpoints, export and the anchor digests, as for FP8: FP4 applies to the GEMMs only.
        mp.fp4_param_gather = False  # keeps fp4_param in sync (Bridge's __setattr__)
    return mp


def precision_of(mixed_precision: Any) -> str:
    """The precision name a (possibly overridden) ``MixedPrecisionConfig`` amounts to."""
    if mixed_precision is None:
        return "fp32"
    if isinstance(mixed_precision, str):
        from megatron.bridge.training.mixed_precision import get_mixed_precision_config

        mixed_precision = get_mixed_precision_config(mixed_precision)
    if getattr(mixed_precision, "fp4", None):
        return "nvfp4"
    if getattr(mixed_precision, "fp8", None):
        return _RECIPE_OF.get(str(mixed_precision.fp8_recipe), f"fp8-{mixed_precision.fp8_recipe}")
    return "bf16" if mixed_precision.bf16 else "fp16" if mixed_precision.fp16 else "fp32"


def saved_params_dtype(container) -> torch.dtype:
    """The dtype the model's weights will have in the run's checkpoints (for ``flexolmo_config.json``).

    Read before ``pretrain()``, when Bridge has not applied the mixed precision yet: its
    ``runtime_config_update`` resolves ``container.mixed_precision`` (a preset name or a
    ``MixedPrecisionConfig``) and its ``setup`` copies ``bf16`` / ``fp16`` / ``params_dtype`` onto the
    model config; the model is then built in ``params_dtype`` and, with bf16 or fp16, wrapped in
    Megatron's ``Float16Module``, which casts every parameter to bf16 / fp16.  The model weights are
    saved in that dtype (the optimizer keeps its fp32 copies separately).  FlexOlmo's domain biases
    stay fp32 under that cast; they are a handful of tensors, not the checkpoint's dtype.
    """
    model = container.model
    bf16, fp16, params_dtype = model.bf16, model.fp16, model.params_dtype
    mixed = container.mixed_precision
    if isinstance(mixed, str):
        from megatron.bridge.training.mixed_precision import get_mixed_precision_config

        mixed = get_mixed_precision_config(mixed)
    if mixed is not None:  # Bridge's update_config_with_precision_overrides copies these fields over
        bf16, fp16, params_dtype = mixed.bf16, mixed.fp16, mixed.params_dtype
    if bf16:
        return torch.bfloat16
    if fp16:
        return torch.float16
    return params_dtype or torch.float32


def apply_precision(container, precision: str, *, bf16_edge_layers: int | None = None,
                    fp8_param_gather: bool = False, capability: tuple[int, int] | None = None,
                    cuda_version: tuple[int, int] | None = None) -> None:
    """Set ``container``'s numerics for ``precision`` and check the model, the layout and (when
    given) the GPU and CUDA version accept them."""
    model = container.model
    check_device_supports(precision, capability, cuda_version)
    if precision == "bf16" and bf16_edge_layers:
        raise ConfigError("bf16_edge_layers only applies to FP8 precisions")
    if precision != "bf16":
        config = model.to_flexolmo_config()
        check_fp8_alignment(config, tensor_parallel=model.tensor_model_parallel_size,
                            expert_tensor_parallel=model.expert_tensor_parallel_size, seq_length=model.seq_length,
                            micro_batch_size=container.train.micro_batch_size,
                            sequence_parallel=model.sequence_parallel)
        edges = _PRESETS[precision][1] if bf16_edge_layers is None else bf16_edge_layers
        if 2 * edges > config.num_layers:
            raise ConfigError(f"bf16_edge_layers={edges} at both ends exceeds the {config.num_layers} layers")
    container.mixed_precision = mixed_precision_config(precision, bf16_edge_layers=bf16_edge_layers,
                                                       fp8_param_gather=fp8_param_gather)
    model.moe_router_padding_for_quantization = False  # SequentialMLP pads per expert (module docstring)
    check_router_fp32(model)


def check_router_fp32(model) -> None:
    """The router GEMM must run in fp32 (it is never an FP8/TE GEMM in Megatron; this keeps it so)."""
    if model.moe_router_dtype != "fp32":
        raise ConfigError(f"moe_router_dtype={model.moe_router_dtype!r}: FlexOlmo's router must compute in fp32")


def check_container_precision(container, capability: tuple[int, int] | None,
                              cuda_version: tuple[int, int] | None | str = _LOCAL) -> str:
    """Run-time check of the (possibly overridden) container on this GPU and with this PyTorch's
    CUDA (``cuda_version="local"``, the default); returns the precision name."""
    if cuda_version == _LOCAL:
        cuda_version = current_cuda_version()
    precision = precision_of(container.mixed_precision)
    if precision in ("fp32", "bf16", "fp16"):
        check_router_fp32(container.model)
        return precision
    if precision not in PRECISIONS and precision not in BLACKWELL_ONLY:
        raise ConfigError(f"mixed precision {precision!r} is not supported by the FlexOlmo recipes; "
                          f"use one of {PRECISIONS + BLACKWELL_ONLY}")
    check_device_supports(precision, capability, cuda_version)
    check_router_fp32(container.model)
    return precision
