"""Megatron-Bridge ``AutoBridge`` support: FlexOlmo and its dense public model (OLMo-2).

Bridge users convert every model the same way -- ``AutoBridge.from_hf_pretrained(path)``, then
``to_megatron_provider()`` / ``to_megatron_model()``, ``import_ckpt``, ``export_ckpt``,
``export_hf_weights`` (streamed export; also how RL frameworks refit weights into vLLM) and
``save_hf_pretrained``.  Bridge dispatches on the HF architecture, so FlexOlmo needs a registered
``MegatronModelBridge``; the OLMoE bridge Bridge ships does not fit (pre-norm names, a per-head q/k
norm that is wrong for GQA and for TP>1) and Bridge has no OLMo-2 bridge for the public model.

Nothing here restates the architecture: the provider is :class:`FlexOlmoModelProvider` built from
:meth:`FlexOlmoConfig.from_hf` / :meth:`FlexOlmoConfig.from_hf_olmo2` (one expert, as the public
recipe and ``flexolmo convert`` read OLMo-2), and every parameter mapping is generated from the one
tensor table (:func:`flexolmo_plugin.conversion.mapping.param_sources`, its ``to_megatron`` /
``to_hf`` transforms and TP splits).  ``flexolmo convert`` stays the streaming, audited fast path;
the two are tested to produce identical tensors.

Registration: importing this module registers both bridges (and allow-lists the provider module
for Bridge's checkpoint reader).  ``import flexolmo_plugin`` does not
import Bridge; it installs an import hook that imports this module right after ``megatron.bridge``
itself has been imported (see ``flexolmo_plugin/__init__.py``), so ``AutoBridge`` knows FlexOlmo
whenever the plugin is installed and imported.  The provider module is imported on first use
because it imports ``megatron.bridge`` itself (the hook may run while it is being imported).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from megatron.bridge.models.conversion.mapping_registry import MegatronMappingRegistry
from megatron.bridge.models.conversion.model_bridge import MegatronModelBridge, WeightConversionTask
from megatron.bridge.models.conversion.param_mapping import MegatronParamMapping
from megatron.bridge.utils.instantiate_utils import register_allowed_target_prefix
from megatron.core.models.gpt.gpt_model import GPTModel
from transformers import FlexOlmoForCausalLM, Olmo2ForCausalLM

from flexolmo_plugin.conversion.mapping import Role, Split, to_hf, to_megatron
from flexolmo_plugin.conversion.slots import ParamSource, other_expert, param_sources, shard, unshard
from flexolmo_plugin.errors import ConfigError, FlexOlmoError
from flexolmo_plugin.model.config import FlexOlmoConfig

logger = logging.getLogger("flexolmo_plugin")

# A checkpoint Bridge writes (``import_ckpt``, ``pretrain()``) names our provider and its layer-spec
# function in run_config.yaml; Bridge instantiates only allow-listed modules when it reads one back
# (``export_ckpt``, ``load_megatron_model``).  Exactly the provider module is added, through Bridge's API.
PROVIDER_MODULE = "flexolmo_plugin.recipes.provider"
register_allowed_target_prefix(PROVIDER_MODULE)


class RouterBiasExportError(FlexOlmoError):
    """A learned router bias that an HF export would silently drop."""


class MissingHFTensorError(FlexOlmoError):
    """An HF checkpoint without a tensor the model needs."""


class TableMapping(MegatronParamMapping[dict[str, torch.Tensor]]):
    """One parameter's conversion, driven by its :class:`ParamSource` (a row of the tensor table).

    HF → Megatron: every rank reads the HF tensors, builds the canonical tensor with the table's
    ``to_megatron`` and keeps its own TP part (no collective: each rank reads what it holds).
    Megatron → HF: the TP parts are gathered and re-joined as the table's split says, expert
    parameters are gathered over the EP group, and ``to_hf`` gives the HF tensors.  Router rows come
    back one row at a time (the bridge stacks them into ``mlp.gate.weight``); the learned router bias
    exports nothing and refuses to be dropped while it is non-zero.
    """

    def __init__(self, source: ParamSource, config: FlexOlmoConfig, *, dense: bool):
        super().__init__(source.param, {name: name for name in source.hf})
        self.source, self.config, self.dense = source, config, dense
        # Tasks are built whether or not the HF side names these tensors: the loader reports a missing
        # one (instead of Bridge's warning and a silently uninitialised weight), and exports never depend
        # on what the source checkpoint held.
        self.allow_hf_name_mismatch = True

    @property
    def split(self) -> Split:
        return self.source.entry.rule.split

    @property
    def is_router_row(self) -> bool:
        return self.source.entry.rule.role is Role.ROUTER_ROW

    def resolve(self, captures: tuple[str, ...]) -> TableMapping:
        return self  # names are concrete: nothing to fill in

    def hf_to_megatron(self, hf_weights: dict[str, torch.Tensor], megatron_module) -> torch.Tensor:
        entry = self.source.entry
        if self.source.hf:
            canonical = to_megatron(entry, tuple(hf_weights[name] for name in self.source.hf), self.config)
        else:  # no HF tensor: the dense model's router, the learned bias (zero: no effect, as on import)
            canonical = torch.zeros(entry.shape(self.config.replace(router_bias=True)))
        if self.source.row is not None:
            return canonical[self.source.row].clone()
        return shard(canonical, self.split, self.tp_rank, self.tp_size).contiguous()

    def megatron_to_hf(self, megatron_weights, megatron_module) -> dict[str, torch.Tensor]:
        weight = self.broadcast_from_pp_rank(megatron_weights, cache_key=self.megatron_param)
        if weight is None:
            return {}
        weight = weight.detach()
        if self.split is not Split.NONE and self.tp_size > 1:
            weight = unshard(self.gather_from_tp_ranks(weight.contiguous()), self.split)
        if self.source.entry.rule.role is Role.ROUTER_BIAS:
            magnitude = weight.float().clamp(max=0).abs().max().item()
            if magnitude > 0:
                raise RouterBiasExportError(
                    f"{self.megatron_param}: the model has a learned router bias (|min(b,0)| = {magnitude:.4g}), "
                    "which HF flex_olmo cannot represent; zero it (router tuning drops it by default) or export "
                    "with `flexolmo convert mcore-to-hf --drop-router-bias` (routing changes)")
            return {}
        if self.source.row is not None:
            return {self.source.hf[0]: weight} if self.source.hf else {}
        sources = [self.source]
        if self.source.entry.rule.per_expert and self.ep_size > 1:
            gathered = [torch.empty_like(weight) for _ in range(self.ep_size)]
            torch.distributed.all_gather(gathered, weight.contiguous(), group=self.ep_group)
            per_rank = self.config.num_experts // self.ep_size
            local = self.source.entry.expert % per_rank
            sources = [other_expert(self.source, local + k * per_rank, dense=self.dense) for k in range(self.ep_size)]
            weights = gathered
        else:
            weights = [weight]
        out: dict[str, torch.Tensor] = {}
        for source, canonical in zip(sources, weights):
            if self.dense and source.entry.expert:
                raise ConfigError("an OLMo-2 export holds one expert; this model has more (export it as FlexOlmo)")
            out.update(zip(source.hf, to_hf(source.entry, canonical, self.config)))
        return out


class _TableBridge(MegatronModelBridge):
    """What the FlexOlmo and OLMo-2 bridges share: the table-generated registry and router-row stacking."""

    DENSE = False

    def flexolmo_config(self, hf_config) -> FlexOlmoConfig:
        raise NotImplementedError

    def provider_bridge(self, hf_pretrained):
        from flexolmo_plugin.recipes.provider import FlexOlmoModelProvider

        config = self.flexolmo_config(hf_pretrained.config)
        dtype = self.dtype_from_hf(hf_pretrained.config, default=torch.float32)
        return FlexOlmoModelProvider.from_flexolmo_config(
            config, params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16)

    def mapping_registry(self) -> MegatronMappingRegistry:
        config = self.flexolmo_config(self.hf_config)
        return MegatronMappingRegistry(*(TableMapping(source, config, dense=self.DENSE)
                                         for source in param_sources(config, dense=self.DENSE)))

    def maybe_modify_loaded_hf_weight(self, hf_param, hf_state_dict):
        missing = [name for name in hf_param.values() if name not in hf_state_dict]
        if missing:
            raise MissingHFTensorError(f"the HF checkpoint has no tensor {missing[0]} (per-expert names expected; "
                                       "`flexolmo convert hf-to-mcore` also reads transformers' fused layout)")
        return super().maybe_modify_loaded_hf_weight(hf_param, hf_state_dict)

    def maybe_modify_converted_hf_weight(self, task: WeightConversionTask, converted_weights_dict,
                                         hf_state_dict) -> dict[str, torch.Tensor]:
        """Stack the per-row router parameters into HF's ``[E, H]`` gate weight (rows arrive in order,
        each layer's together: Bridge sorts tasks by name)."""
        mapping = task.mapping
        if not (isinstance(mapping, TableMapping) and mapping.is_router_row and converted_weights_dict):
            return converted_weights_dict
        rows = self.__dict__.setdefault("_router_rows", {})
        (name, row), = converted_weights_dict.items()
        rows.setdefault(name, {})[mapping.source.row] = row
        if len(rows[name]) < mapping.config.num_experts:
            return {}
        collected = rows.pop(name)
        return {name: torch.stack([collected[e] for e in range(mapping.config.num_experts)])}

    def stream_weights_megatron_to_hf(self, megatron_model, hf_pretrained, *args, **kwargs) -> Iterable:
        self.__dict__["_router_rows"] = {}
        yield from super().stream_weights_megatron_to_hf(megatron_model, hf_pretrained, *args, **kwargs)
        if self.__dict__.pop("_router_rows", None):
            raise FlexOlmoError("router rows of some layer were not all exported")


@MegatronModelBridge.register_bridge(source=FlexOlmoForCausalLM, target=GPTModel, model_type="flex_olmo")
class FlexOlmoBridge(_TableBridge):
    """HF ``FlexOlmoForCausalLM`` ⇄ Megatron ``GPTModel`` built by :class:`FlexOlmoModelProvider`.

    Example::

        bridge = AutoBridge.from_hf_pretrained("path/to/FlexOlmo-hf")
        model = bridge.to_megatron_model(wrap_with_ddp=False)
        bridge.save_hf_pretrained(model, "export/")
    """

    def flexolmo_config(self, hf_config) -> FlexOlmoConfig:
        return FlexOlmoConfig.from_hf(hf_config)

    @classmethod
    def megatron_to_hf_config(cls, provider) -> dict:
        return provider.to_flexolmo_config().to_hf_dict()


@MegatronModelBridge.register_bridge(source=Olmo2ForCausalLM, target=GPTModel, model_type="olmo2")
class Olmo2Bridge(_TableBridge):
    """HF ``Olmo2ForCausalLM`` (FlexOlmo's dense public model) ⇄ a one-expert FlexOlmo ``GPTModel``.

    Softmax over one expert is exactly 1, so the one-expert model computes the dense model's function;
    its router row has no HF tensor (imported as zero, not exported)."""

    DENSE = True

    def flexolmo_config(self, hf_config) -> FlexOlmoConfig:
        return FlexOlmoConfig.from_hf_olmo2(hf_config, num_experts=1)

    @classmethod
    def megatron_to_hf_config(cls, provider) -> dict:
        config = provider.to_flexolmo_config()
        if config.num_experts != 1:
            raise ConfigError(f"an OLMo-2 export holds one expert; this model has {config.num_experts}")
        out = config.to_hf_dict()
        for key in ("num_experts", "num_experts_per_tok", "norm_topk_prob"):
            out.pop(key)
        out.update(architectures=[cls.SOURCE_NAME], model_type="olmo2")
        return out


BRIDGES = (FlexOlmoBridge, Olmo2Bridge)
