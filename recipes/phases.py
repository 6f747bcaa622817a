"""Megatron-Bridge recipes for FlexOlmo's training phases.

* :func:`flexolmo_public_config` -- the public model: dense OLMo-2, represented as a FlexOlmo with a
  single expert (softmax over one expert is exactly 1, so the block computes the dense FFN), trained
  from scratch or continued; its checkpoint is what every data owner upcycles.

* :func:`flexolmo_expert_config` -- a data owner's anchored expert training (paper §3.3.1, §4.4):
  start from the upcycled ``[public, owner]`` checkpoint, train only the owner's FFN, router row
  and bias; top-2 of 2, load-balancing loss off, router z-loss 1e-3, LR 9e-4 with warmup and
  cosine decay, weight decay 0, gradient clipping 1.0.
* :func:`flexolmo_router_tuning_config` -- optional router tuning of a merged model (§3.3.3): only
  router rows (r_pub included) and biases train, every expert active (top-k = number of experts).

Each returns a Bridge ``ConfigContainer`` for ``megatron.bridge.training.pretrain.pretrain`` and,
like Bridge's own recipes, can be called with no arguments (``recipe()``, as Bridge's
``run_recipe.py`` calls recipes) and refined with Bridge's ``key=value`` overrides
(``process_config_with_overrides(config, cli_overrides=[...])``).  Without ``init_from`` the model
has OLMo-2 7B's shape (:data:`OLMO2_7B`; 2 experts for the expert recipe, 7 for router tuning) and
starts from Megatron's initialisation: such a container builds (for ``flexolmo plan``, or a recipe of
your own), but ``flexolmo train`` refuses anchored or router training without a start checkpoint.
``cpu=True`` (the default where CUDA is absent) selects the settings measured to run Bridge on CPU:
fp32, the non-distributed optimizer, fusions off, gloo.  ``save_dir=None`` trains without checkpoints.
TensorBoard logs go to ``<save_dir>/tb_logs`` (Bridge's recipes' layout; ``logger.tensorboard_dir=...``
overrides it), W&B is Bridge's own ``logger.wandb_*`` settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from flexolmo_plugin.compat import CPU_MODEL_SETTINGS, cuda_available
from flexolmo_plugin.conversion.mcore_io import load_config
from flexolmo_plugin.errors import ConfigError
from flexolmo_plugin.lifecycle.data import load_tokenizer
from flexolmo_plugin.model.config import FlexOlmoConfig
from flexolmo_plugin.model.layout import ParallelLayout
from flexolmo_plugin.recipes.provider import FlexOlmoModelProvider

EXPERT_DEFAULTS = dict(top_k=2, router_z_loss_coeff=1e-3, load_balancing_coeff=0.0)
# The model every recipe describes when no checkpoint gives its sizes: OLMo-2 7B (the paper's
# public model), in FlexOlmoConfig's field names.
OLMO2_7B = dict(
    vocab_size=100352,
    hidden_size=4096,
    intermediate_size=11008,
    num_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rope_theta=500000.0,
    rms_norm_eps=1e-6,
    eos_token_id=100257,
    pad_token_id=100277,
)


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """The part of a recipe's arguments that describes the run rather than the model (data, optimiser,
    schedule, checkpoints).  Every recipe builds one explicitly from its own keyword parameters, so a
    recipe's signature is the complete, documented list of what ``recipe.ARG=VALUE`` can set."""

    save_dir: str | None
    data_paths: list[str] | None
    tokenizer_dir: str | None
    seq_length: int
    train_iters: int
    global_batch_size: int
    micro_batch_size: int
    lr: float
    min_lr: float
    lr_warmup_iters: int
    weight_decay: float
    save_interval: int
    log_interval: int
    seed: int
    load_dir: str | None
    cpu: bool | None  # None: the CPU settings exactly where CUDA is absent

    @property
    def on_cpu(self) -> bool:
        return (not cuda_available()) if self.cpu is None else self.cpu


def _container(provider: FlexOlmoModelProvider, settings: RunSettings):
    """The Bridge ``ConfigContainer`` of ``provider`` trained as ``settings`` say (imports Bridge here,
    after the caller had the chance to apply :func:`~flexolmo_plugin.compat.enable_bridge_compat`)."""
    from megatron.bridge.training.config import (
        CheckpointConfig,
        ConfigContainer,
        DistributedDataParallelConfig,
        DistributedInitConfig,
        GPTDatasetConfig,
        LoggerConfig,
        MockGPTDatasetConfig,
        OptimizerConfig,
        RNGConfig,
        SchedulerConfig,
        TokenizerConfig,
        TrainingConfig,
        ValidationConfig,
    )

    run, cpu = settings, settings.on_cpu
    seq_length, train_iters, save_dir, seed = run.seq_length, run.train_iters, run.save_dir, run.seed
    data_args = dict(random_seed=seed, seq_length=seq_length, reset_attention_mask=False, reset_position_ids=False,
                     eod_mask_loss=False, num_dataset_builder_threads=1, dataloader_type="single",
                     num_workers=0 if cpu else 2, pin_memory=not cpu, persistent_workers=False, data_sharding=True)
    if run.data_paths:
        dataset = GPTDatasetConfig(data_path=[str(p) for p in run.data_paths], split="100,0,0", **data_args)
    else:
        dataset = MockGPTDatasetConfig(**data_args)
    if run.tokenizer_dir:
        tokenizer = TokenizerConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(run.tokenizer_dir))
    else:  # data is pre-tokenized; only the vocabulary size matters
        tokenizer = TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=provider.vocab_size)
    if cpu:
        for name, value in CPU_MODEL_SETTINGS.items():
            setattr(provider, name, value)
        provider.bf16, provider.params_dtype, provider.pipeline_dtype = False, torch.float32, torch.float32
    provider.seq_length = seq_length
    return ConfigContainer(
        model=provider,
        train=TrainingConfig(train_iters=train_iters, global_batch_size=run.global_batch_size,
                             micro_batch_size=run.micro_batch_size),
        validation=ValidationConfig(eval_interval=max(train_iters, 1) * 10, eval_iters=0),
        optimizer=OptimizerConfig(optimizer="adam", lr=run.lr, min_lr=run.min_lr, weight_decay=run.weight_decay,
                                  adam_beta1=0.9, adam_beta2=0.95, clip_grad=1.0, bf16=not cpu, fp16=False,
                                  use_distributed_optimizer=not cpu),
        scheduler=SchedulerConfig(lr_decay_style="cosine", lr_warmup_iters=run.lr_warmup_iters,
                                  lr_decay_iters=train_iters, start_weight_decay=run.weight_decay,
                                  end_weight_decay=run.weight_decay, weight_decay_incr_style="constant"),
        ddp=DistributedDataParallelConfig(overlap_grad_reduce=False, overlap_param_gather=False,
                                          use_distributed_optimizer=not cpu, check_for_nan_in_grad=True,
                                          grad_reduce_in_fp32=True),
        dataset=dataset,
        # as Bridge's own recipes: TensorBoard under the run directory (our routing, TFLOPS/MFU and
        # Bridge's loss, z-loss and timers); W&B stays off until logger.wandb_project is set
        logger=LoggerConfig(log_interval=run.log_interval, log_timers_to_tensorboard=True,
                            tensorboard_dir=str(Path(save_dir) / "tb_logs") if save_dir else None),
        tokenizer=tokenizer,
        checkpoint=CheckpointConfig(save_interval=run.save_interval if save_dir else None,
                                    save=str(save_dir) if save_dir else None,
                                    load=str(run.load_dir) if run.load_dir else None, ckpt_format="torch_dist",
                                    fully_parallel_save=not cpu, async_save=False),
        rng=RNGConfig(seed=seed),
        dist=DistributedInitConfig(distributed_backend="gloo" if cpu else "nccl"),
        mixed_precision=None if cpu else "bf16_mixed",
    )


def _start_config(init_from: str | None, default: FlexOlmoConfig) -> FlexOlmoConfig:
    """The sizes of the model a recipe trains: ``init_from``'s when given, else ``default``."""
    return load_config(init_from)[0] if init_from else default


def _resolved(init_from: str | None) -> str | None:
    return str(Path(init_from).resolve()) if init_from else None


def training_layout(tensor_parallel: int = 1, expert_parallel: int = 1, **cluster) -> ParallelLayout:
    """The layout the recipes train with: sequence parallelism whenever TP > 1 (Megatron needs it for
    MoE with TP), expert-TP 1 when TP and EP are combined (``ParallelLayout``'s default)."""
    return ParallelLayout(tensor_parallel=tensor_parallel, expert_parallel=expert_parallel,
                          sequence_parallel=tensor_parallel > 1, **cluster)


def flexolmo_expert_config(*, init_from: str | None = None, save_dir: str | None = None,
                           data_paths: list[str] | None = None, tokenizer_dir: str | None = None,
                           owner_expert: int = 1, seq_length: int = 4096, train_iters: int = 12000,
                           global_batch_size: int = 1024, micro_batch_size: int = 1, lr: float = 9e-4,
                           min_lr: float = 9e-5, lr_warmup_iters: int = 2000, weight_decay: float = 0.0,
                           save_interval: int = 1000, log_interval: int = 1, seed: int = 1234,
                           tensor_parallel: int = 1, expert_parallel: int = 1, load_dir: str | None = None,
                           cpu: bool | None = None):
    """Anchored expert training of ``owner_expert`` from an upcycled checkpoint (``init_from``; without
    it a ``[public, owner]`` model of OLMo-2 7B's shape, which ``flexolmo train`` refuses to train)."""
    default = FlexOlmoConfig(**OLMO2_7B, num_experts=2, top_k=2)
    config = _start_config(init_from, default).replace(**EXPERT_DEFAULTS)
    provider = FlexOlmoModelProvider.from_flexolmo_config(
        config, training_layout(tensor_parallel, expert_parallel), init_from=_resolved(init_from),
        trainable="anchored", owner_expert=owner_expert)
    return _container(provider, RunSettings(
        save_dir=save_dir, data_paths=data_paths, tokenizer_dir=tokenizer_dir, seq_length=seq_length,
        train_iters=train_iters, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size, lr=lr,
        min_lr=min_lr, lr_warmup_iters=lr_warmup_iters, weight_decay=weight_decay, save_interval=save_interval,
        log_interval=log_interval, seed=seed, load_dir=load_dir, cpu=cpu))


def flexolmo_router_tuning_config(*, init_from: str | None = None, save_dir: str | None = None,
                                  data_paths: list[str] | None = None, tokenizer_dir: str | None = None,
                                  seq_length: int = 4096, train_iters: int = 1200, global_batch_size: int = 1024,
                                  micro_batch_size: int = 1, lr: float = 2e-3, min_lr: float = 2e-4,
                                  lr_warmup_iters: int = 100, weight_decay: float = 0.0, save_interval: int = 200,
                                  log_interval: int = 1, seed: int = 1234, tensor_parallel: int = 1,
                                  expert_parallel: int = 1, load_dir: str | None = None,
                                  keep_router_bias: bool = False, cpu: bool | None = None):
    """Router tuning of a merged model (paper §3.3.3): only router rows (r_pub included) train, every
    expert active.  The owners' learned biases are dropped (``keep_router_bias=False``, the default):
    the rows are re-tuned without them, so the result exports to HF ``flex_olmo`` exactly.  With
    ``keep_router_bias=True`` the biases are kept and tuned too.  Without ``init_from``: 7 experts of
    OLMo-2 7B's shape (FlexOlmo-7x7B), which ``flexolmo train`` refuses to train."""
    stored = _start_config(init_from, FlexOlmoConfig(**OLMO2_7B, num_experts=7, top_k=7))
    config = stored.replace(top_k=stored.num_experts, router_z_loss_coeff=1e-3, load_balancing_coeff=0.0,
                            router_bias=stored.router_bias and keep_router_bias)
    provider = FlexOlmoModelProvider.from_flexolmo_config(
        config, training_layout(tensor_parallel, expert_parallel), init_from=_resolved(init_from),
        trainable="router", owner_expert=1)
    return _container(provider, RunSettings(
        save_dir=save_dir, data_paths=data_paths, tokenizer_dir=tokenizer_dir, seq_length=seq_length,
        train_iters=train_iters, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size, lr=lr,
        min_lr=min_lr, lr_warmup_iters=lr_warmup_iters, weight_decay=weight_decay, save_interval=save_interval,
        log_interval=log_interval, seed=seed, load_dir=load_dir, cpu=cpu))


def _vocab_size(vocab_size: int | None, tokenizer_dir: str | None) -> int:
    """``vocab_size`` when given, else the tokenizer's, else OLMo-2's (100352)."""
    if vocab_size is not None:
        return vocab_size
    if tokenizer_dir is None:
        return OLMO2_7B["vocab_size"]
    return len(load_tokenizer(tokenizer_dir))


def flexolmo_public_config(*, save_dir: str | None = None, data_paths: list[str] | None = None,
                           tokenizer_dir: str | None = None, init_from: str | None = None,
                           num_layers: int = 32, hidden_size: int = 4096, ffn_hidden_size: int = 11008,
                           num_attention_heads: int = 32, num_key_value_heads: int = 32,
                           vocab_size: int | None = None, eos_token_id: int | None = None,
                           pad_token_id: int | None = None, seq_length: int = 4096, train_iters: int = 100000,
                           global_batch_size: int = 1024, micro_batch_size: int = 1, lr: float = 3e-4,
                           min_lr: float = 3e-5, lr_warmup_iters: int = 2000, weight_decay: float = 0.1,
                           save_interval: int = 1000, log_interval: int = 1, seed: int = 1234,
                           tensor_parallel: int = 1, load_dir: str | None = None, cpu: bool | None = None):
    """The public dense model (defaults: OLMo-2 7B's shape and optimiser), every weight trained.

    ``init_from`` continues from a FlexOlmo checkpoint with one expert (sizes then come from it);
    otherwise the model starts from Megatron's initialisation with the sizes given here and
    ``vocab_size`` taken from ``tokenizer_dir`` when not given (OLMo-2's 100352 without either).
    """
    layout = training_layout(tensor_parallel)
    if init_from:
        config, _, _ = load_config(init_from)
        if config.num_experts != 1:
            raise ConfigError(f"{init_from}: the public model has one expert, this checkpoint has {config.num_experts}")
    else:
        config = FlexOlmoConfig(vocab_size=_vocab_size(vocab_size, tokenizer_dir), hidden_size=hidden_size,
                                intermediate_size=ffn_hidden_size, num_layers=num_layers,
                                num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                                num_experts=1, top_k=1, max_position_embeddings=seq_length, expert_names=("public",),
                                eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    provider = FlexOlmoModelProvider.from_flexolmo_config(config, layout, init_from=_resolved(init_from),
                                                          trainable="all")
    return _container(provider, RunSettings(
        save_dir=save_dir, data_paths=data_paths, tokenizer_dir=tokenizer_dir, seq_length=seq_length,
        train_iters=train_iters, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size, lr=lr,
        min_lr=min_lr, lr_warmup_iters=lr_warmup_iters, weight_decay=weight_decay, save_interval=save_interval,
        log_interval=log_interval, seed=seed, load_dir=load_dir, cpu=cpu))
