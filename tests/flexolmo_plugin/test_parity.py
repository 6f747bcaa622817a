"""Our Megatron FlexOlmo computes what transformers' FlexOlmoForCausalLM computes (fp32, CPU)."""

import pytest
import torch

import flexolmo_plugin as fp
from tests.support import (
    canonical_reference,
    hf_reference,
    make_hf_model,
    next_token_loss,
    save_hf_model,
    slot_errors,
)

LOGIT_TOL = 1e-5  # measured worst max |Δlogit| 1.0e-6 (seq 128); the product target is 1e-4
LOSS_TOL = 2e-6  # measured worst |Δloss| 4.8e-7

CONFIGS = {
    # GQA, widths that are not powers of two, experts/top-k spread from 2-of-2 to 1-of-8
    "gqa_e4_k2": dict(num_experts=4, num_experts_per_tok=2),
    "mha_e2_k2": dict(num_key_value_heads=6, num_experts=2, num_experts_per_tok=2),
    "gqa_e8_k1": dict(num_experts=8, num_experts_per_tok=1, hidden_size=36, intermediate_size=52),
    "mqa_e5_k5": dict(num_key_value_heads=1, num_experts=5, num_experts_per_tok=5, num_hidden_layers=3),
    "mha_e3_k2_wide": dict(hidden_size=80, num_attention_heads=5, num_key_value_heads=5, intermediate_size=72,
                           num_experts=3, num_experts_per_tok=2, vocab_size=131),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("seq_len", [1, 7, 33])
def test_logits_and_loss_match_transformers(name, seq_len, tmp_path, megatron_single_process):
    hf = make_hf_model(seed=len(name) + seq_len, **CONFIGS[name])
    model = fp.from_hf(save_hf_model(hf, tmp_path / "hf"))
    ids = torch.randint(0, hf.config.vocab_size, (3, seq_len), generator=torch.Generator().manual_seed(seq_len))
    ref_logits, ref_loss = hf_reference(hf, ids)
    ours = fp.logits(model, ids)
    assert ours.shape == ref_logits.shape
    delta = (ours - ref_logits).abs().max().item()
    assert delta <= LOGIT_TOL, f"max |Δlogit| = {delta:.3e}"
    if seq_len > 1:
        assert abs(next_token_loss(ours, ids).item() - ref_loss.item()) <= LOSS_TOL


def test_routing_is_exercised_not_degenerate(tmp_path, megatron_single_process):
    """Guard the parity tests: with k < E different tokens must pick different experts."""
    hf = make_hf_model(seed=3, num_experts=4, num_experts_per_tok=1)
    model = fp.from_hf(save_hf_model(hf, tmp_path / "hf"))
    router = model.decoder.layers[0].mlp.router
    h = torch.randn(16, 2, hf.config.hidden_size)
    _, routing_map = router(h)
    assert routing_map.any(dim=0).sum() >= 2


def test_every_gradient_matches_transformers(tmp_path, megatron_single_process):
    hf = make_hf_model(seed=11, num_experts=3, num_experts_per_tok=2)
    model = fp.from_hf(save_hf_model(hf, tmp_path / "hf"))
    ids = torch.randint(0, hf.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    ids[0, 3] = hf.config.pad_token_id
    hf.zero_grad()
    hf(ids, labels=ids).loss.backward()
    model.zero_grad()
    next_token_loss(fp.logits(model, ids, grad=True), ids).backward()
    # transformers builds nn.Embedding(padding_idx=pad_token_id), so the pad token's row never gets a
    # gradient there; Megatron's embedding (like OLMo-core training) gives it one.  The forward is the
    # same.  Compare everything else, and check that this row really is the only difference.
    pad = hf.config.pad_token_id
    assert (ids == pad).any(), "the input must contain the pad token for this check to mean something"
    embedding_grad = model.embedding.word_embeddings.weight.grad
    assert hf.model.embed_tokens.weight.grad[pad].abs().max() == 0
    assert embedding_grad[pad].abs().max() > 0
    embedding_grad[pad] = 0
    reference = canonical_reference(hf, model.flexolmo_config, grads=True)
    errors = slot_errors(model, reference, grads=True)
    assert len(errors) == sum(1 for _ in model.parameters())
    bad = {name: err for name, err in errors.items() if not err <= 1e-4}
    assert not bad, f"gradients differ from transformers: {bad}"


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_error_is_no_worse_than_transformers_own_bf16_error(seed, tmp_path, megatron_single_process):
    """bf16 cannot be bit-identical (HF computes router logits in bf16, we in fp32), so compare
    errors: our bf16 model may be at most 2x as far from the fp32 reference as HF's bf16 model is
    (measured: 0.9-1.1x)."""
    hf = make_hf_model(seed=seed)
    model = fp.from_hf(save_hf_model(hf, tmp_path / "hf"), params_dtype=torch.bfloat16)
    assert model.decoder.layers[0].mlp.experts.local_experts[0].linear_fc1.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(seed))
    ref32, _ = hf_reference(hf, ids)
    ref16, _ = hf_reference(hf.to(torch.bfloat16), ids)
    ours = fp.logits(model, ids).float()
    hf_error = (ref16.float() - ref32).abs().max().item()
    our_error = (ours - ref32).abs().max().item()
    assert hf_error > 0
    assert our_error <= 2 * hf_error, (our_error, hf_error)
