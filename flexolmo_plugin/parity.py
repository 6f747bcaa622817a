"""The parity check: our Megatron model against ``transformers``' ``FlexOlmoForCausalLM``.

``flexolmo parity`` prints :meth:`ParityReport.describe`; the function is also the quickest way for
a user to confirm, on their own checkpoint and machine, that the Megatron model computes what the
reference does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM

from flexolmo_plugin.api import from_hf, read_hf_config
from flexolmo_plugin.errors import ConfigError
from flexolmo_plugin.model.build import logits, next_token_loss


@dataclass(frozen=True, kw_only=True)
class ParityReport:
    hf_dir: str
    shape: str
    batch: int
    tokens: int
    seed: int
    dtype: torch.dtype
    max_abs_diff: float
    mean_abs_diff: float
    loss_ours: float | None
    loss_reference: float | None
    top1_agreement: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def describe(self) -> str:
        lines = [f"FlexOlmo parity check: {self.hf_dir}", f"  model    : {self.shape}",
                 f"  input    : {self.batch} x {self.tokens} random token ids (seed {self.seed}); ours in "
                 f"{str(self.dtype).removeprefix('torch.')}, reference in float32",
                 f"  max  |Δlogit| : {self.max_abs_diff:.3e}   (tolerance {self.tolerance:.1e})",
                 f"  mean |Δlogit| : {self.mean_abs_diff:.3e}"]
        if self.loss_ours is not None:
            lines.append(f"  loss ours/ref : {self.loss_ours:.6f} / {self.loss_reference:.6f}   "
                         f"(|Δ| {abs(self.loss_ours - self.loss_reference):.2e})")
        lines.append(f"  top-1 agree   : {100 * self.top1_agreement:.2f}%")
        lines.append("PASS" if self.passed else "FAIL: logits differ by more than the tolerance")
        return "\n".join(lines)


def check_parity(hf_dir: str | os.PathLike, *, tokens: int = 32, batch: int = 2, seed: int = 0,
                 params_dtype: torch.dtype = torch.float32, tolerance: float = 1e-4) -> ParityReport:
    """Run the HF checkpoint in ``hf_dir`` through our Megatron model (in ``params_dtype``) and through
    transformers (float32) on the same random tokens and compare the logits.

    Args:
        hf_dir: HF ``flex_olmo`` directory (safetensors + ``config.json``).
        tokens: sequence length; batch: number of sequences; seed: seed of the random token ids.
        params_dtype: parameter dtype of our model (the reference always runs in float32).
        tolerance: largest max |Δlogit| that passes.

    Returns:
        A :class:`ParityReport`; ``report.passed`` says whether the tolerance held.
    """
    if tokens < 1 or batch < 1:
        raise ConfigError("--tokens and --batch must be >= 1")
    config = read_hf_config(hf_dir)
    if tokens > config.max_position_embeddings:
        raise ConfigError(f"--tokens {tokens} exceeds max_position_embeddings {config.max_position_embeddings}")
    ids = torch.randint(0, config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(seed))
    model = from_hf(hf_dir, params_dtype=params_dtype)
    ours = logits(model, ids).float().cpu()
    del model


    reference_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, use_safetensors=True)
    reference_model.eval()
    with torch.no_grad():
        reference = reference_model(ids).logits.float()
    delta = (ours - reference).abs()
    losses = (next_token_loss(ours, ids).item(), next_token_loss(reference, ids).item()) if tokens > 1 else (None, None)
    return ParityReport(
        hf_dir=str(hf_dir), batch=batch, tokens=tokens, seed=seed, dtype=params_dtype, tolerance=tolerance,
        shape=f"{config.num_layers} layers, hidden {config.hidden_size}, {config.num_experts} experts "
              f"(top-{config.top_k}), vocab {config.vocab_size}",
        max_abs_diff=delta.max().item(), mean_abs_diff=delta.mean().item(), loss_ours=losses[0],
        loss_reference=losses[1], top1_agreement=(ours.argmax(-1) == reference.argmax(-1)).float().mean().item())
