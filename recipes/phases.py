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

Each returns a Bridge ``ConfigContainer`` for ``megatron.bridge.training.pretrain.pretrain``; any
field can be overridden afterwards (``flexolmo train-expert`` applies Hydra-style overrides).
``cpu=True`` (the default where CUDA is absent) selects the settings measured to run Bridge on CPU:
fp32, the non-distributed optimizer, fusions off, gloo.  ``save_dir=None`` trains without checkpoints.
TensorBoard logs go to ``<save_dir>/tb_logs`` (Bridge's recipes' layout; ``logger.tensorboard_dir=...``
overrides it), W&B is Bridge's own ``logger.wandb_*`` settings.
"""

from __future__ import annotations

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


def _container(provider: FlexOlmoModelProvider, *, data_paths, tokenizer_dir, save_dir, seq_length, train_iters,
               global_batch_size, micro_batch_size, lr, min_lr, lr_warmup_iters, weight_decay, save_interval,
               log_interval, seed, cpu, load_dir):
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

    data_args = dict(random_seed=seed, seq_length=seq_length, reset_attention_mask=False, reset_position_ids=False,
                     eod_mask_loss=False, num_dataset_builder_threads=1, dataloader_type="single",
                     num_workers=0 if cpu else 2, pin_memory=not cpu, persistent_workers=False, data_sharding=True)
    if data_paths:
        dataset = GPTDatasetConfig(data_path=[str(p) for p in data_paths], split="100,0,0", **data_args)
    else:
        dataset = MockGPTDatasetConfig(**data_args)
    if tokenizer_dir:
        tokenizer = TokenizerConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tokenizer_dir))
    else:  # data is pre-tokenized; only the vocabulary size matters
        tokenizer = TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=provider.vocab_size)
    if cpu:
        for name, value in CPU_MODEL_SETTINGS.items():
            setattr(provider, name, value)
        provider.bf16, provider.params_dtype, provider.pipeline_dtype = False, torch.float32, torch.float32
    provider.seq_length = seq_length
    return ConfigContainer(
        model=provider,
        train=TrainingConfig(train_iters=train_iters, global_batch_size=global_batch_size,
                             micro_batch_size=micro_batch_size),
        validation=ValidationConfig(eval_interval=max(train_iters, 1) * 10, eval_iters=0),
        optimizer=OptimizerConfig(optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=weight_decay, adam_beta1=0.9,
                                  adam_beta2=0.95, clip_grad=1.0, bf16=not cpu, fp16=False,
                                  use_distributed_optimizer=not cpu),
        scheduler=SchedulerConfig(lr_decay_style="cosine", lr_warmup_iters=lr_warmup_iters,
                                  lr_decay_iters=train_iters, start_weight_decay=weight_decay,
                                  end_weight_decay=weight_decay, weight_decay_incr_style="constant"),
        ddp=DistributedDataParallelConfig(overlap_grad_reduce=False, overlap_param_gather=False,
                                          use_distributed_optimizer=not cpu, check_for_nan_in_grad=True,
                                          grad_reduce_in_fp32=True),
        dataset=dataset,
        # as Bridge's own recipes: TensorBoard under the run directory (our routing, TFLOPS/MFU and
        # Bridge's loss, z-loss and timers); W&B stays off until logger.wandb_project is set
        logger=LoggerConfig(log_interval=log_interval, log_timers_to_tensorboard=True,
                            tensorboard_dir=str(Path(save_dir) / "tb_logs") if save_dir else None),
        tokenizer=tokenizer,
        checkpoint=CheckpointConfig(save_interval=save_interval if save_dir else None,
                                    save=str(save_dir) if save_dir else None,
                                    load=str(load_dir) if load_dir else None, ckpt_format="torch_dist",
                                    fully_parallel_save=not cpu, async_save=False),
        rng=RNGConfig(seed=seed),
        dist=DistributedInitConfig(distributed_backend="gloo" if cpu else "nccl"),
        mixed_precision=None if cpu else "bf16_mixed",
    )


_RUN_FIELDS = ("data_paths", "tokenizer_dir", "save_dir", "seq_length", "train_iters", "global_batch_size",
               "micro_batch_size", "lr", "min_lr", "lr_warmup_iters", "weight_decay", "save_interval", "log_interval",
               "seed", "load_dir")


def _run_arguments(arguments: dict) -> dict:
    """The recipe arguments that describe the run (as opposed to the model), plus the CPU choice."""
    run = {name: arguments[name] for name in _RUN_FIELDS}
    run["cpu"] = (not cuda_available()) if arguments["cpu"] is None else arguments["cpu"]
    return run


def _provider(init_from, *, trainable: str, owner_expert: int, overrides: dict,
              layout: ParallelLayout) -> FlexOlmoModelProvider:
    config, _, _ = load_config(init_from)
    config = config.replace(**overrides)
    return FlexOlmoModelProvider.from_flexolmo_config(config, layout, init_from=str(Path(init_from).resolve()),
                                                      trainable=trainable, owner_expert=owner_expert)


def training_layout(tensor_parallel: int = 1, expert_parallel: int = 1, **cluster) -> ParallelLayout:
    """The layout the recipes train with: sequence parallelism whenever TP > 1 (Megatron needs it for
    MoE with TP), expert-TP 1 when TP and EP are combined (``ParallelLayout``'s default)."""
    return ParallelLayout(tensor_parallel=tensor_parallel, expert_parallel=expert_parallel,
                          sequence_parallel=tensor_parallel > 1, **cluster)


def flexolmo_expert_config(*, init_from: str, save_dir: str | None, data_paths: list[str] | None = None,
                           tokenizer_dir: str | None = None, owner_expert: int = 1, seq_length: int = 4096,
                           train_iters: int = 12000, global_batch_size: int = 1024, micro_batch_size: int = 1,
                           lr: float = 9e-4, min_lr: float = 9e-5, lr_warmup_iters: int = 2000,
                           weight_decay: float = 0.0, save_interval: int = 1000, log_interval: int = 1,
                           seed: int = 1234, tensor_parallel: int = 1, expert_parallel: int = 1,
                           load_dir: str | None = None, cpu: bool | None = None):
    """Anchored expert training of ``owner_expert`` from an upcycled checkpoint."""
    arguments = dict(locals())
    provider = _provider(init_from, trainable="anchored", owner_expert=owner_expert, overrides=EXPERT_DEFAULTS,
                         layout=training_layout(tensor_parallel, expert_parallel))
    return _container(provider, **_run_arguments(arguments))


def flexolmo_router_tuning_config(*, init_from: str, save_dir: str | None, data_paths: list[str] | None = None,
                                  tokenizer_dir: str | None = None, seq_length: int = 4096, train_iters: int = 1200,
                                  global_batch_size: int = 1024, micro_batch_size: int = 1, lr: float = 2e-3,
                                  min_lr: float = 2e-4, lr_warmup_iters: int = 100, weight_decay: float = 0.0,
                                  save_interval: int = 200, log_interval: int = 1, seed: int = 1234,
                                  tensor_parallel: int = 1, expert_parallel: int = 1, load_dir: str | None = None,
                                  keep_router_bias: bool = False, cpu: bool | None = None):
    """Router tuning of a merged model (paper §3.3.3): only router rows (r_pub included) train, every
    expert active.  The owners' learned biases are dropped (``keep_router_bias=False``, the default):
    the rows are re-tuned without them, so the result exports to HF ``flex_olmo`` exactly.  With
    ``keep_router_bias=True`` the biases are kept and tuned too."""
    arguments = dict(locals())
    stored, _, _ = load_config(init_from)
    provider = _provider(init_from, trainable="router", owner_expert=1,
                         overrides=dict(top_k=stored.num_experts, router_z_loss_coeff=1e-3, load_balancing_coeff=0.0,
                                        router_bias=stored.router_bias and keep_router_bias),
                         layout=training_layout(tensor_parallel, expert_parallel))
    return _container(provider, **_run_arguments(arguments))


def _vocab_size(vocab_size: int | None, tokenizer_dir: str | None) -> int:
    if vocab_size is not None:
        return vocab_size
    if tokenizer_dir is None:
        raise ConfigError("flexolmo_public_config needs vocab_size or tokenizer_dir")

    return len(load_tokenizer(tokenizer_dir))


def flexolmo_public_config(*, save_dir: str | None, data_paths: list[str] | None = None,
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
    ``vocab_size`` taken from ``tokenizer_dir`` when not given.
    """
    arguments = dict(locals())
    layout = training_layout(tensor_parallel)
    if init_from:
        config, _, _ = load_config(init_from)
        if config.num_experts != 1:
            raise ConfigError(f"{init_from}: the public model has one expert, this checkpoint has {config.num_experts}")
        provider = FlexOlmoModelProvider.from_flexolmo_config(config, layout, init_from=str(Path(init_from).resolve()),
                                                              trainable="all")
    else:
        config = FlexOlmoConfig(vocab_size=_vocab_size(vocab_size, tokenizer_dir), hidden_size=hidden_size,
                                intermediate_size=ffn_hidden_size, num_layers=num_layers,
                                num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                                num_experts=1, top_k=1, max_position_embeddings=seq_length, expert_names=("public",),
                                eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        provider = FlexOlmoModelProvider.from_flexolmo_config(config, layout, trainable="all")
    return _container(provider, **_run_arguments(arguments))
