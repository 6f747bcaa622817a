"""A Megatron checkpoint directory as our tools find it: which ``iter_*`` a Bridge save directory
means, the ``flexolmo_config.json`` that describes it (or, for a checkpoint of Bridge's own
``pretrain()``, its ``run_config.yaml``: :mod:`.bridge_run_config`), and the checks made before any
tensor is read (checksums, the pickle allow-list, the stored dtype agreeing with the tensors' own metadata).

Kept apart from :mod:`conversion.mcore_io` (which reads and writes the tensors) so that a tool can
validate and describe a checkpoint without building a model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from flexolmo_plugin.conversion.bridge_run_config import (
    RUN_CONFIG_FILE,
    RunConfigError,
    read_run_config,
    run_config_dtype,
    run_config_path,
)
from flexolmo_plugin.conversion.checksums import CHECKSUMS_FILE, verify_checksums
from flexolmo_plugin.conversion.safe_metadata import read_metadata, verify_metadata
from flexolmo_plugin.errors import FlexOlmoError
from flexolmo_plugin.model.config import FlexOlmoConfig

CONFIG_FILE = "flexolmo_config.json"
FORMAT_VERSION = 1


class McoreCheckpointError(FlexOlmoError):
    """A Megatron checkpoint that is missing, malformed, or does not match its configuration."""


# ---------------------------------------------------------------------- configuration beside the checkpoint
def config_payload(config: FlexOlmoConfig, *, dtype: torch.dtype, extra: dict | None = None) -> dict:
    """The content of ``flexolmo_config.json`` for ``config``."""
    fields = dataclasses.asdict(config)
    fields["expert_names"] = list(config.expert_names) if config.expert_names else None
    return {"format_version": FORMAT_VERSION, "dtype": str(dtype).removeprefix("torch."),
            "config": fields, **(extra or {})}


def save_config(directory: Path, config: FlexOlmoConfig, *, dtype: torch.dtype, extra: dict | None = None) -> None:
    payload = config_payload(config, dtype=dtype, extra=extra)
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")


OPTIMIZER_PREFIX = "optimizer."  # Megatron's optimizer-state keys in a checkpoint with the model's weights
TRACKER_FILE = "latest_checkpointed_iteration.txt"  # Megatron / Bridge save directories
# The files of a torch_dist checkpoint that readers use (besides the *.distcp data files).
# (provenance.json: lifecycle.provenance's record, which `flexolmo verify` reads)
CHECKPOINT_FILES = (".metadata", "metadata.json", "common.pt", CONFIG_FILE, RUN_CONFIG_FILE, "provenance.json")


def resolve_checkpoint(directory: str | os.PathLike) -> Path:
    """The torch_dist checkpoint a path names.  A Bridge save directory holds one ``iter_NNNNNNN``
    per save and a tracker naming the last *complete* one, so the save directory itself means "the
    latest trained weights"; any other directory is returned unchanged."""
    directory = Path(directory)
    tracker = directory / TRACKER_FILE
    if not tracker.is_file():
        return directory
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise McoreCheckpointError(f"{tracker}: expected an iteration number, found {text[:40]!r}")
    resolved = directory / f"iter_{int(text):07d}"
    if not resolved.is_dir():
        raise McoreCheckpointError(f"{tracker} names iteration {int(text)} but {resolved} does not exist")
    return resolved


TOKENIZER_DIR = "tokenizer"  # a checkpoint's tokenizer files, as convert/upcycle/merge/training store them
# What a tokenizer (and its generation defaults) is saved as by transformers: carried by every conversion and
# every new checkpoint made from another, so that an export loads with its tokenizer and chat template.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")
TOKENIZER_FOLDERS = ("additional_chat_templates",)  # transformers 5: one .jinja file per named template
# one of these makes a tokenizer (what a checkpoint's tokenizer/ must hold to tokenize with)
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                    "sentencepiece.bpe.model")


def tokenizer_dir(directory: str | os.PathLike, *, vocabulary: bool = False) -> Path | None:
    """The ``tokenizer/`` folder a checkpoint carries, or None: beside its tensors, or (a Bridge save
    directory) in its latest complete ``iter_*``, where training writes it.  An empty folder does not
    count (Bridge creates one when a run has no HF tokenizer); with ``vocabulary``, neither does one
    without a vocabulary (an HF model's generation_config.json or chat template travels without one:
    carried, but nothing to tokenize with)."""
    directory = Path(directory)
    wanted = VOCABULARY_FILES if vocabulary else TOKENIZER_FILES
    for candidate in (directory / TOKENIZER_DIR, resolve_checkpoint(directory) / TOKENIZER_DIR):
        if any((candidate / name).is_file() for name in wanted):
            return candidate
    return None


def _config_path(directory: Path) -> Path | None:
    """``flexolmo_config.json`` of a checkpoint: beside it, or in the Bridge save directory above it
    (training writes it once per run there, not into every ``iter_*``)."""
    candidates = [directory / CONFIG_FILE, resolve_checkpoint(directory) / CONFIG_FILE]
    if directory.name.startswith("iter_"):
        candidates.append(directory.parent / CONFIG_FILE)
    return next((c for c in candidates if c.is_file()), None)


def has_config(directory: str | os.PathLike) -> bool:
    """Whether :func:`load_config` finds a description of ``directory`` (its ``flexolmo_config.json``, or
    the ``run_config.yaml`` of a checkpoint of Bridge's ``pretrain()``), as opposed to, e.g., an HF model."""
    directory = Path(directory)
    return directory.is_dir() and (_config_path(directory) is not None
                                   or run_config_path(resolve_checkpoint(directory)) is not None)


def load_config(directory: str | os.PathLike) -> tuple[FlexOlmoConfig, torch.dtype, dict]:
    """The FlexOlmo configuration and parameter dtype stored beside a checkpoint: its
    ``flexolmo_config.json``, else the ``run_config.yaml`` Bridge's ``pretrain()`` wrote into it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise McoreCheckpointError(f"{directory} is not a directory")
    path = _config_path(directory)
    if path is None:
        run_config = run_config_path(resolve_checkpoint(directory))
        if run_config is None:
            raise McoreCheckpointError(
                f"{directory}: no {CONFIG_FILE} and no Megatron-Bridge {RUN_CONFIG_FILE} (not a checkpoint written "
                "by flexolmo convert, save_mcore, upcycle, merge, a flexolmo training run or Bridge's pretrain())")
        return _load_run_config(directory, run_config)
    try:
        payload = json.loads(path.read_text())
        if payload.get("format_version") != FORMAT_VERSION:
            raise McoreCheckpointError(f"{path}: unsupported format_version {payload.get('format_version')!r}")
        fields = dict(payload["config"])
        if fields.get("expert_names") is not None:
            fields["expert_names"] = tuple(fields["expert_names"])
        config = FlexOlmoConfig(**fields)
        dtype = getattr(torch, str(payload["dtype"]), None)
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as error:
        raise McoreCheckpointError(f"{path}: malformed ({error})") from error
    if dtype not in PARAMETER_DTYPES:
        raise McoreCheckpointError(f"{path}: dtype {payload['dtype']!r} is not a parameter dtype "
                                   f"({', '.join(str(d).removeprefix('torch.') for d in PARAMETER_DTYPES)})")
    stored = _stored_dtype(directory)
    if stored is not None and stored != dtype:
        raise McoreCheckpointError(f"{path} says dtype {payload['dtype']} but the checkpoint's tensors are "
                                   f"{str(stored).removeprefix('torch.')}; refusing to reinterpret them")
    return config, dtype, payload


PARAMETER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _load_run_config(directory: Path, path: Path) -> tuple[FlexOlmoConfig, torch.dtype, dict]:
    """:func:`load_config` for a checkpoint of Bridge's own ``pretrain()``: the configuration from its
    ``run_config.yaml``, the dtype from the tensors' own metadata (the file's statement if none)."""
    try:
        config, model = read_run_config(path)
    except RunConfigError as error:
        raise McoreCheckpointError(str(error)) from None
    dtype = _stored_dtype(directory) or getattr(torch, run_config_dtype(model) or "", None)
    if dtype not in PARAMETER_DTYPES:
        raise McoreCheckpointError(f"{path}: parameter dtype {dtype!r} is not one of "
                                   f"{', '.join(str(d).removeprefix('torch.') for d in PARAMETER_DTYPES)}")
    source = {"format": "megatron-bridge", "run_config": str(path), "trainable": model.get("trainable"),
              "init_from": model.get("init_from")}
    return config, dtype, config_payload(config, dtype=dtype, extra={"source": source})


def _stored_dtype(directory: Path) -> torch.dtype | None:
    """The dtype most of the checkpoint's model tensors have, from its own metadata (None if there is
    no checkpoint yet).  The configuration file is only a description: a dtype there that disagrees
    with the tensors would make readers cast or reinterpret every weight silently.  Optimizer state
    (fp32 moments and main parameters beside bf16 weights) is not the model's dtype."""
    checkpoint = resolve_checkpoint(directory)
    if not (checkpoint / ".metadata").is_file():
        return None
    counts: dict[torch.dtype, int] = {}
    for key, (_, dtype) in checkpoint_tensor_metadata(checkpoint).items():
        if not key.startswith(OPTIMIZER_PREFIX):
            counts[dtype] = counts.get(dtype, 0) + 1
    return max(counts, key=counts.get) if counts else None


def check_is_checkpoint(directory: Path) -> None:
    directory = resolve_checkpoint(directory)
    if not (directory / ".metadata").exists() or not (directory / "metadata.json").exists():
        raise McoreCheckpointError(
            f"{directory}: not a Megatron torch_dist checkpoint (.metadata / metadata.json missing)"
        )
    used = [p.name for p in directory.iterdir() if p.name in CHECKPOINT_FILES or p.suffix == ".distcp"]
    verify_checksums(directory / CHECKSUMS_FILE, what=f"checkpoint {directory}", required=used)
    verify_metadata(directory)  # before anything else (Megatron's loader) unpickles it


def checkpoint_tensor_metadata(directory: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:

    metadata = read_metadata(resolve_checkpoint(directory))
    return {
        k: (tuple(v.size), v.properties.dtype)
        for k, v in metadata.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }
