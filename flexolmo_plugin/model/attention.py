"""Megatron self-attention with FlexOlmo's full-width q/k RMSNorm (before RoPE), correct under TP.

Megatron's ``qk_layernorm`` normalises each head separately; FlexOlmo (like OLMo-2) normalises the
whole q projection and the whole k projection of a token.  ``SelfAttention`` already applies
``self.q_layernorm`` / ``self.k_layernorm`` to the split heads right after the QKV projection and
before rotary embeddings, so the only change needed is *which* norm sits in those two slots: a
:class:`~flexolmo_plugin.norms.FullWidthRMSNorm` that knows the full width and the TP group.
"""

from __future__ import annotations

from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.identity_op import IdentityOp

from flexolmo_plugin.errors import ConfigError
from flexolmo_plugin.model.norms import FullWidthRMSNorm


class FlexOlmoSelfAttention(SelfAttention):
    """``SelfAttention`` whose q/k norms span all heads of the projection (GQA supported)."""

    def __init__(self, config, submodules, layer_number, **kwargs):
        if config.qk_layernorm or config.qk_l2_norm:
            raise ConfigError("FlexOlmoSelfAttention installs its own full-width q/k norm; "
                             "leave TransformerConfig.qk_layernorm/qk_l2_norm off")
        if any(norm not in (None, IdentityOp) for norm in (submodules.q_layernorm, submodules.k_layernorm)):
            raise ConfigError("FlexOlmoSelfAttention builds its q/k norms itself; leave those spec slots empty")
        super().__init__(config, submodules, layer_number, **kwargs)
        tp_size = self.pg_collection.tp.size()
        if self.config.num_query_groups % tp_size:
            # With fewer KV heads than TP ranks, KV heads are replicated across ranks and a summed
            # k statistic would count them several times.
            raise ConfigError(f"num_query_groups={self.config.num_query_groups} must be divisible by "
                             f"the tensor-parallel size {tp_size} for the full-width k norm")
        head_dim = self.hidden_size_per_attention_head
        common = dict(eps=self.config.layernorm_epsilon, params_dtype=self.config.params_dtype,
                      tp_group=self.pg_collection.tp)
        self.q_layernorm = FullWidthRMSNorm(
            full_width=self.config.num_attention_heads * head_dim,
            local_width=self.num_attention_heads_per_partition * head_dim, **common)
        self.k_layernorm = FullWidthRMSNorm(
            full_width=self.config.num_query_groups * head_dim,
            local_width=self.num_query_groups_per_partition * head_dim, **common)
