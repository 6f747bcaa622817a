"""Build a FlexOlmo ``GPTModel`` and run it the way ``transformers`` does (positions, causal mask).

The model is Megatron's ``GPTModel`` with the FlexOlmo block spec; the FlexOlmo configuration is
attached as ``model.flexolmo_config`` so that tools downstream (logits, export, merge) never have to
re-derive it from Megatron's ``TransformerConfig``.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from torch import nn

from flexolmo_plugin.errors import FlexOlmoError
from flexolmo_plugin.model.config import FlexOlmoConfig, gpt_model_fields, to_transformer_config
from flexolmo_plugin.model.layout import ParallelLayout
from flexolmo_plugin.model.spec import Backend, flexolmo_block_spec


def build_model(
    config: FlexOlmoConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    backend: Backend = "local",
    dispatcher: str = "alltoall",
    expert_path: str = "auto",
    **transformer_overrides,
):
    """A FlexOlmo ``GPTModel`` for the current ``parallel_state`` layout (random init).

    Call :func:`flexolmo_plugin.model.parallel.ensure_model_parallel` (or run under a launcher that
    initialises Megatron) first.  Weights are usually loaded afterwards (``from_hf`` / checkpoints).

    Args:
        config: the architecture.
        params_dtype: parameter dtype.
        sequence_parallel: Megatron sequence parallelism (needed to train MoE with TP > 1).
        backend: ``"local"`` (Megatron-Core modules), ``"te"`` (Transformer Engine) or ``"auto"``.
        dispatcher: Megatron's token dispatcher, ``"alltoall"`` (production default) or
            ``"allgather"`` (lets a run-time expert mask shrink top-k).
        expert_path: ``"auto"`` (the dense mixture when top-k = number of experts, else the token
            dispatcher), ``"dense"`` or ``"dispatcher"`` (:mod:`flexolmo_plugin.model.dense_mixture`).
        **transformer_overrides: ``TransformerConfig`` fields that win over the translation.

    Returns:
        The model, with ``model.flexolmo_config`` attached.
    """

    layout = ParallelLayout.current(sequence_parallel=sequence_parallel)
    transformer_config = to_transformer_config(
        config, layout, params_dtype=params_dtype, dispatcher=dispatcher, **transformer_overrides
    )
    spec = flexolmo_block_spec(transformer_config, backend=backend, domain_bias=config.router_bias,
                               expert_path=expert_path)
    model = GPTModel(
        config=transformer_config, transformer_layer_spec=spec, parallel_output=True, **gpt_model_fields(config)
    )
    model.flexolmo_config = config
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The ``GPTModel`` inside DDP / Float16Module wrappers."""
    while not hasattr(model, "flexolmo_config") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "flexolmo_config"):
        raise TypeError("not a FlexOlmo model (build it with flexolmo_plugin.build_model or from_hf)")
    return model


def causal_attention_mask(seq_len: int, device: torch.device) -> torch.Tensor:
    """Megatron's boolean mask convention: ``[1, 1, s, s]``, True where attention is *blocked*."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)[None, None]


def _check_input_ids(input_ids, vocab_size: int) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[-1] == 0:
        raise FlexOlmoError(f"input_ids must be [batch, seq] with seq >= 1, got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise FlexOlmoError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise FlexOlmoError(f"token ids must lie in [0, {vocab_size}), got range [{low}, {high}]")
    return input_ids.long()


def logits(model: nn.Module, input_ids, *, grad: bool = False) -> torch.Tensor:
    """Full-vocabulary logits for causal LM input, gathered over TP.

    Positions are ``0..seq-1`` and the mask is causal, as in ``FlexOlmoForCausalLM``.  Padding rows
    of the vocabulary are cut off.  The model's train/eval mode is left as the caller set it.

    Args:
        model: a FlexOlmo model (possibly wrapped).
        input_ids: ``[batch, seq]`` (or ``[seq]``) integer token ids below the vocabulary size.
        grad: run with autograd (training); off by default.

    Returns:
        ``[batch, seq, vocab_size]`` logits.

    Raises:
        FlexOlmoError: ids out of range, wrong shape or dtype, or a sequence the model cannot take.
    """

    config: FlexOlmoConfig = unwrap(model).flexolmo_config
    device = next(model.parameters()).device
    input_ids = _check_input_ids(input_ids, config.vocab_size).to(device)
    batch, seq = input_ids.shape
    if seq > config.max_position_embeddings:
        raise FlexOlmoError(f"sequence length {seq} exceeds max_position_embeddings {config.max_position_embeddings}")
    tp = ps.get_tensor_model_parallel_world_size()
    if unwrap(model).config.sequence_parallel and seq % tp:
        raise FlexOlmoError(
            f"with sequence parallelism the sequence length ({seq}) must be a multiple "
            f"of the tensor-parallel size ({tp})"
        )
    position_ids = torch.arange(seq, device=device).expand(batch, seq)
    mask = causal_attention_mask(seq, device)
    with torch.set_grad_enabled(grad):
        out = model(input_ids, position_ids, mask)
        if tp > 1:
            out = gather_from_tensor_model_parallel_region(out)
    return out[..., : config.vocab_size]


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 at position t (HF's ``labels=input_ids`` loss)."""
    vocab = logits.shape[-1]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).float(), input_ids[:, 1:].reshape(-1).to(logits.device)
    )
