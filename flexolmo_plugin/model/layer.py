"""FlexOlmo's "reordered norm" block: ``h = x + N1(Attn(x))``, ``y = h + N2(MoE(h))``.

Megatron's ``TransformerLayer`` is pre-norm and has no slot for a norm *after* a sub-layer.  Its
forward, however, always ends each sub-layer with the bias-dropout-add callable
(``self_attn_bda`` / ``mlp_bda``) that receives the sub-layer output and the residual.  Placing the
post-norm there -- norm the sub-layer output, then Megatron's own bias-dropout-add -- gives the
FlexOlmo block without re-implementing the layer's forward, so recomputation, offloading and
inference hooks keep working.  The input and pre-MLP norm slots stay ``IdentityOp``: the router
and experts see the un-normalised residual stream, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from flexolmo_plugin.errors import ConfigError


@dataclass
class FlexOlmoLayerSubmodules(TransformerLayerSubmodules):
    """Megatron's layer submodules plus the two post-sub-layer norms."""

    post_self_attn_layernorm: type | None = None
    post_mlp_layernorm: type | None = None


class _NormThenBiasDropoutAdd:
    """Bias-dropout-add factory that first applies a post-sub-layer norm to the sub-layer output.

    Deliberately not an ``nn.Module``: the norm is registered on the layer, not a second time here.
    """

    def __init__(self, norm, bias_dropout_add):
        self._norm = norm
        self._bda = bias_dropout_add

    def __call__(self, training: bool, fused: bool):
        inner = self._bda(training, fused)
        norm = self._norm

        def apply(output_with_bias, residual, dropout_prob):
            output, bias = output_with_bias
            if bias is not None:
                raise ValueError("FlexOlmo sub-layers have no bias; a post-norm cannot follow a bias add")
            return inner((norm(output), None), residual, dropout_prob)

        return apply


class FlexOlmoTransformerLayer(TransformerLayer):
    """Post-norm Megatron transformer layer (OLMo-2 / FlexOlmo)."""

    def __init__(self, config, submodules: FlexOlmoLayerSubmodules, *args, **kwargs):
        for slot in ("input_layernorm", "pre_mlp_layernorm"):
            if getattr(submodules, slot) is not IdentityOp:
                raise ConfigError(f"FlexOlmo has no pre-norms: {slot} must be IdentityOp")
        if submodules.post_self_attn_layernorm is None or submodules.post_mlp_layernorm is None:
            raise ConfigError("FlexOlmoTransformerLayer needs post_self_attn_layernorm and post_mlp_layernorm")
        super().__init__(config, submodules, *args, **kwargs)
        if config.fp32_residual_connection:
            raise ConfigError("fp32_residual_connection is not supported with post-norm layers")
        norm_args = dict(config=self.config, hidden_size=self.config.hidden_size,
                         eps=self.config.layernorm_epsilon)
        self.post_self_attn_layernorm = submodules.post_self_attn_layernorm(**norm_args)
        self.post_mlp_layernorm = submodules.post_mlp_layernorm(**norm_args)
        self.self_attn_bda = _NormThenBiasDropoutAdd(self.post_self_attn_layernorm, self.self_attn_bda)
        self.mlp_bda = _NormThenBiasDropoutAdd(self.post_mlp_layernorm, self.mlp_bda)
