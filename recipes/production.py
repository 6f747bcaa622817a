"""Megatron-Bridge recipes for FlexOlmo at the paper's scale on H100 clusters.

Four recipes, each with ``precision`` = ``"bf16"`` | ``"fp8-tensorwise"`` | ``"fp8-blockwise"``
(see :mod:`recipes.precision`) and a parallel layout that keeps model parallelism inside a node
(NVLink 4: 900 GB/s per GPU, against 50 GB/s per GPU of InfiniBand) and data parallelism across
nodes.  Sizes default to OLMo-2 7B (32 layers, 4096 hidden, 11008 FFN, 32 heads, 100352 vocab):

================  ==========  ====================  ============================================
recipe            experts     trains                layout per 8-GPU node
================  ==========  ====================  ============================================
public-7b         1 (dense)   everything            TP1 EP1, DP 8 x nodes, distributed optimizer
expert-2x7b       2, top-2    owner's FFN + row     EP1 (both experts per GPU, dense mixture), DP 8/node
router-tune-7x7b  7, top-7    router rows + biases  TP2 = expert-TP2, EP1, DP 4/node
inference-7x7b    7, top-k    nothing (forward)     TP2 = expert-TP2, EP1, DP 4/node
================  ==========  ====================  ============================================

Why these layouts: the dense 7B fits one H100 with the distributed optimizer (BF16 weights and
FP32 gradients, optimizer state sharded over DP), so TP would only add communication.  Anchored
training keeps both experts on every GPU (EP 1, 71.9 GiB per GPU by ``flexolmo plan``): with top-2 of
2 every token visits both experts, so the dense mixture path (``model/dense_mixture.py``) computes
them without any token dispatch, where an EP pair would all-gather and reduce-scatter every layer's
tokens and leave the public expert's GPU idle during weight gradients (EP 2 also fits, 73.6 GiB:
``recipe.expert_parallel=2``).  Seven experts cannot be split over 8
GPUs (EP must divide both 7 and the node), so the 33B merged model uses tensor parallelism 2 for
both attention and experts (16.6B parameters, 33 GB of BF16 weights per GPU); ``gpus_per_node=7,
expert_parallel=7`` is the alternative on nodes run with 7 ranks.

``model=`` overrides sizes (a dict of :class:`~flexolmo_plugin.config.FlexOlmoConfig` fields),
which is how the tests run scaled-down copies of each recipe on CPU (``cpu=True``: fp32, gloo).
``init_from`` (the upcycled / merged checkpoint) is read when it exists: sizes then come from it, and
any size given in ``model`` (and the recipe's number of experts) must match it; a path that does not
exist yet (built on a login node) is checked when training starts.  Every recipe can be called with no
arguments (as Bridge's recipe runner calls recipes; the container then has the default sizes and no
start checkpoint, which ``flexolmo train`` refuses for the three that need one) and refined with
Bridge's ``key=value`` overrides.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from flexolmo_plugin.conversion.mcore_io import load_config
from flexolmo_plugin.model.config import ConfigError, FlexOlmoConfig
from flexolmo_plugin.model.layout import ParallelLayout
from flexolmo_plugin.model.spec import gradient_accumulation_fusion_available, transformer_engine_available
from flexolmo_plugin.recipes.phases import OLMO2_7B, RunSettings, training_layout
from flexolmo_plugin.recipes.precision import (
    apply_precision,
    check_precision_name,
    current_capability,
    current_cuda_version,
)

logger = logging.getLogger(__name__)
NCCL_TIMEOUT_MINUTES = 60  # process-group creation, checkpoint load; a collective stuck this long is a hang


def _shape(shape: dict, imposed: dict, model: dict | None, init_from: str | None) -> FlexOlmoConfig:
    """The model's sizes: the checkpoint's when ``init_from`` exists, else OLMo-2 7B + ``shape`` + ``model``.

    ``imposed`` are the recipe's routing settings (top-k, router losses), applied either way;
    ``top_k="all"`` means every expert.
    """
    base = dict(OLMO2_7B)
    if "vocab_size" in (model or {}):  # OLMo-2's special-token ids belong to OLMo-2's vocabulary only
        base.update(eos_token_id=None, pad_token_id=None)
    wanted = FlexOlmoConfig(**_resolve({**base, **shape, **imposed, **(model or {})}))
    if not (init_from and Path(init_from).exists()):
        return wanted

    stored, _, _ = load_config(init_from)
    keys = {"num_experts", *(model or {})} & _SIZE_KEYS  # what this recipe or its caller asked for
    differ = [
        f"{k}: checkpoint {getattr(stored, k)}, recipe {getattr(wanted, k)}"
        for k in sorted(keys)
        if getattr(stored, k) != getattr(wanted, k)
    ]
    if differ:
        raise ConfigError(f"{init_from} does not fit this recipe: " + "; ".join(differ))
    return stored.replace(**_resolve({"num_experts": stored.num_experts, **imposed}, drop=("num_experts",)))


_SIZE_KEYS = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "num_experts",
    "head_dim",
}


def _resolve(fields: dict, drop: tuple[str, ...] = ()) -> dict:
    fields = dict(fields)
    if fields.get("top_k") == "all":
        fields["top_k"] = fields["num_experts"]
    return {k: v for k, v in fields.items() if k not in drop}


def _gpu_settings(container, layout: ParallelLayout, *, transformer_engine: bool | None = None,
                  grad_accum_fusion: bool | None = None) -> None:
    """What a GPU cluster run changes relative to the parity-tested CPU settings.

    ``transformer_engine`` / ``grad_accum_fusion``: whether TE and APEX's wgrad-accumulation
    extension are importable (None: detect them here).
    """

    model = container.model
    te = transformer_engine_available() if transformer_engine is None else transformer_engine
    fusion = gradient_accumulation_fusion_available() if grad_accum_fusion is None else grad_accum_fusion
    model.flexolmo_backend = "auto"  # TE linears and attention when transformer-engine is importable
    model.moe_token_dispatcher_type = "alltoall"
    model.bias_activation_fusion = True  # Megatron's fused SwiGLU (no bias needed)
    model.cross_entropy_loss_fusion = True
    model.moe_permute_fusion = te  # a TE kernel
    # TE linears fuse wgrad accumulation themselves, but the output layer is Megatron's own
    # ColumnParallelLinear, which needs APEX's extension for it: only with that extension.
    model.gradient_accumulation_fusion = fusion
    logger.info("gradient_accumulation_fusion=%s (APEX fused_weight_gradient_mlp_cuda %s); moe_permute_fusion=%s "
                "(Transformer Engine %s)", fusion, "importable" if fusion else "not importable", te,
                "importable" if te else "not importable")
    container.ddp.overlap_grad_reduce = True
    container.ddp.overlap_param_gather = True
    container.dist.distributed_timeout_minutes = NCCL_TIMEOUT_MINUTES
    container.dataset.num_workers = 2


def _production(
    *,
    shape: dict,
    imposed: dict,
    model: dict | None,
    init_from: str | None,
    trainable: str,
    owner_expert: int,
    layout: ParallelLayout,
    precision: str,
    bf16_edge_layers: int | None,
    fp8_param_gather: bool,
    run: RunSettings,
    eval_only: bool = False,
):
    from flexolmo_plugin.recipes.phases import _container
    from flexolmo_plugin.recipes.provider import FlexOlmoModelProvider

    check_precision_name(precision)
    cpu = run.on_cpu
    if cpu and precision != "bf16":
        raise ConfigError(f"precision {precision!r} needs GPUs with Transformer Engine; cpu=True runs in fp32")
    config = _shape(shape, imposed, model, init_from)
    layout.check_cluster(config, global_batch_size=run.global_batch_size, micro_batch_size=run.micro_batch_size)
    init = str(Path(init_from).resolve()) if init_from else None
    provider = FlexOlmoModelProvider.from_flexolmo_config(
        config, layout, init_from=init, trainable=trainable, owner_expert=owner_expert
    )
    provider.check_flexolmo()
    container = _container(provider, run)
    if eval_only:  # forward-only evaluation of the whole validation split (Bridge's skip_train path)
        container.validation.skip_train = True
        container.validation.eval_iters = run.train_iters
        container.validation.eval_interval = 1
        container.dataset.split = "0,100,0"
    if not cpu:
        _gpu_settings(container, layout)
        apply_precision(
            container,
            precision,
            bf16_edge_layers=bf16_edge_layers,
            fp8_param_gather=fp8_param_gather,
            capability=current_capability(),
            cuda_version=current_cuda_version(),
        )
    return container


def flexolmo_public_7b_config(*, precision: str = "bf16", nodes: int = 4, gpus_per_node: int = 8,
                              tensor_parallel: int = 1, save_dir: str | None = None,
                              data_paths: list[str] | None = None, tokenizer_dir: str | None = None,
                              init_from: str | None = None, model: dict | None = None, seq_length: int = 4096,
                              train_iters: int = 250000, global_batch_size: int = 1024, micro_batch_size: int = 1,
                              lr: float = 3e-4, min_lr: float = 3e-5, lr_warmup_iters: int = 2000,
                              weight_decay: float = 0.1, save_interval: int = 1000, log_interval: int = 10,
                              seed: int = 1234, load_dir: str | None = None, bf16_edge_layers: int | None = None,
                              fp8_param_gather: bool = False, cpu: bool | None = None):
    """The public dense model (OLMo-2 7B shape and optimiser) from scratch: a 1-expert FlexOlmo."""
    layout = training_layout(tensor_parallel, nodes=nodes, gpus_per_node=gpus_per_node)
    return _production(shape=dict(num_experts=1, expert_names=("public",)), imposed=dict(top_k=1), model=model,
                       init_from=init_from, trainable="all", owner_expert=1, layout=layout, precision=precision,
                       bf16_edge_layers=bf16_edge_layers, fp8_param_gather=fp8_param_gather, run=RunSettings(
        save_dir=save_dir, data_paths=data_paths, tokenizer_dir=tokenizer_dir, seq_length=seq_length,
        train_iters=train_iters, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size, lr=lr,
        min_lr=min_lr, lr_warmup_iters=lr_warmup_iters, weight_decay=weight_decay, save_interval=save_interval,
        log_interval=log_interval, seed=seed, load_dir=load_dir, cpu=cpu))


def flexolmo_expert_2x7b_config(*, init_from: str | None = None, precision: str = "bf16", nodes: int = 1,
                                gpus_per_node: int = 8, expert_parallel: int = 1, owner_expert: int = 1,
                                save_dir: str | None = None, data_paths: list[str] | None = None,
                                tokenizer_dir: str | None = None, model: dict | None = None, seq_length: int = 4096,
                                train_iters: int = 12000, global_batch_size: int = 1024, micro_batch_size: int = 1,
                                lr: float = 9e-4, min_lr: float = 9e-5, lr_warmup_iters: int = 2000,
                                weight_decay: float = 0.0, save_interval: int = 1000, log_interval: int = 10,
                                seed: int = 1234, load_dir: str | None = None, bf16_edge_layers: int | None = None,
                                fp8_param_gather: bool = False, cpu: bool | None = None):
    """Anchored training of one data owner's expert against the frozen public 7B (paper §3.3.1, §4.4).
    ``init_from`` is the upcycled checkpoint (``flexolmo train`` refuses to run without it)."""
    from flexolmo_plugin.recipes.phases import EXPERT_DEFAULTS

    layout = training_layout(1, expert_parallel, nodes=nodes, gpus_per_node=gpus_per_node)
    return _production(shape=dict(num_experts=2), imposed=EXPERT_DEFAULTS, model=model, init_from=init_from,
                       trainable="anchored", owner_expert=owner_expert, layout=layout, precision=precision,
                       bf16_edge_layers=bf16_edge_layers, fp8_param_gather=fp8_param_gather, run=RunSettings(
        save_dir=save_dir, data_paths=data_paths, tokenizer_dir=tokenizer_dir, seq_length=seq_length,
        train_iters=train_iters, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size, lr=lr,
        min_lr=min_lr, lr_warmup_iters=lr_warmup_iters, weight_decay=weight_decay, save_interval=save_interval,
        log_interval=log_interval, seed=seed, load_dir=load_dir, cpu=cpu))


def flexolmo_router_tuning_7x7b_config(*, init_from: str | None = None, precision: str = "bf16", nodes: int = 1,
                                       gpus_per_node: int = 8, tensor_parallel: int = 2, expert_parallel: int = 1,
                                       save_dir: str | None = None, data_paths: list[str] | None = None,
                                       tokenizer_dir: str | None = None, model: dict | None = None,
                                       seq_length: int = 4096, train_iters: int = 1200,
                                       global_batch_size: int = 1024, micro_batch_size: int = 1, lr: float = 2e-3,
                                       min_lr: float = 2e-4, lr_warmup_iters: int = 100, weight_decay: float = 0.0,
                                       save_interval: int = 200, log_interval: int = 10, seed: int = 1234,
                                       load_dir: str | None = None, bf16_edge_layers: int | None = None,
                                       fp8_param_gather: bool = False, cpu: bool | None = None):
    """Router tuning of the merged 7x7B (§3.3.3): router rows and biases train, all experts active.
    ``init_from`` is the merged checkpoint (``flexolmo train`` refuses to run without it)."""
    layout = training_layout(tensor_parallel, expert_parallel, nodes=nodes, gpus_per_node=gpus_per_node)
    return _production(shape=dict(num_experts=7),
                       imposed=dict(top_k="all", router_z_loss_coeff=1e-3, load_balancing_coeff=0.0), model=model,
                       init_from=init_from, trainable="router", owner_expert=1, layout=layout, precision=precision,
                       bf16_edge_layers=bf16_edge_layers, fp8_param_gather=fp8_param_gather, run=RunSettings(
        save_dir=save_dir, data_paths=data_paths, tokenizer_dir=tokenizer_dir, seq_length=seq_length,
        train_iters=train_iters, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size, lr=lr,
        min_lr=min_lr, lr_warmup_iters=lr_warmup_iters, weight_decay=weight_decay, save_interval=save_interval,
        log_interval=log_interval, seed=seed, load_dir=load_dir, cpu=cpu))


def flexolmo_inference_7x7b_config(*, init_from: str | None = None, precision: str = "bf16", nodes: int = 1,
                                   gpus_per_node: int = 8, tensor_parallel: int = 2, expert_parallel: int = 1,
                                   data_paths: list[str] | None = None, tokenizer_dir: str | None = None,
                                   model: dict | None = None, seq_length: int = 4096, eval_iters: int = 100,
                                   global_batch_size: int = 256, micro_batch_size: int = 1, log_interval: int = 10,
                                   seed: int = 1234, bf16_edge_layers: int | None = None, cpu: bool | None = None):
    """Forward-only evaluation of a merged 7x7B checkpoint (``init_from``) on ``data_paths`` (loss /
    perplexity).

    Runs Bridge's ``skip_train`` path over ``eval_iters`` batches.  Bridge builds an optimizer even
    then, so the router-only freezing policy is used: it is the smallest non-empty trainable set
    (a few hundred KB of state) and no step is ever taken.
    """
    run = RunSettings(save_dir=None, data_paths=data_paths, tokenizer_dir=tokenizer_dir, seq_length=seq_length,
                      train_iters=eval_iters, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                      lr=0.0, min_lr=0.0, lr_warmup_iters=0, weight_decay=0.0, save_interval=1,
                      log_interval=log_interval, seed=seed, load_dir=None, cpu=cpu)
    layout = training_layout(tensor_parallel, expert_parallel, nodes=nodes, gpus_per_node=gpus_per_node)
    experts = (model or {}).get("num_experts", 7)  # the released FlexOlmo-7x7B routes to 5 of 7
    return _production(shape=dict(num_experts=7, top_k=min(5, experts)), imposed={}, model=model,
                       init_from=init_from, trainable="router", owner_expert=1, layout=layout, precision=precision,
                       bf16_edge_layers=bf16_edge_layers, fp8_param_gather=False, run=run, eval_only=True)


def describe(container) -> dict[str, Any]:
    """A short summary of a production container (used by launchers and tests)."""
    model = container.model
    mp = container.mixed_precision
    return dict(
        num_experts=model.num_moe_experts,
        top_k=model.moe_router_topk,
        trainable=model.trainable,
        tensor_parallel=model.tensor_model_parallel_size,
        expert_parallel=model.expert_model_parallel_size,
        fp8=getattr(mp, "fp8", None),
        fp8_recipe=getattr(mp, "fp8_recipe", None) if mp else None,
        router_padding=model.moe_router_padding_for_quantization,
        gradient_accumulation_fusion=model.gradient_accumulation_fusion,
        moe_permute_fusion=model.moe_permute_fusion,
        router_dtype=model.moe_router_dtype,
        layout={
            f.name: getattr(model, f.name)
            for f in dataclasses.fields(model)
            if f.name in ("sequence_parallel", "expert_tensor_parallel_size")
        },
    )
