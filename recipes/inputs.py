"""Every input of a training run checked before anything is written (``flexolmo train``).

``pretrain()`` would otherwise fail on these late and deep inside Bridge's loop, after the run
directory exists: a number of the run that the optimizer or scheduler cannot use (a learning rate
that is text, NaN or negative, zero iterations, a batch size that does not divide; see
:func:`check_settings`), a missing or mismatched dataset, token ids beyond the vocabulary, a start or
resume checkpoint that is missing, corrupt or carries a pickle that is not a checkpoint's, a
tokenizer larger than the model.  A refusal is a :class:`~flexolmo_plugin.errors.ConfigError`.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType
from megatron.core.datasets.utils import get_blend_from_list

from flexolmo_plugin.conversion.mcore_io import check_is_checkpoint, load_config, resolve_checkpoint
from flexolmo_plugin.errors import ConfigError, FlexOlmoError
from flexolmo_plugin.lifecycle.data import load_tokenizer, verify_dataset

# The most of each dataset's .bin that the vocabulary check reads (see _max_token_id).
TOKEN_SCAN_BYTES = 4 << 30
TOKEN_SCAN_WINDOW = 8 << 20


def dataset_prefixes(dataset) -> list[str]:
    """The indexed-dataset prefixes a Bridge dataset config reads (none for mock data)."""
    prefixes = []
    blends = [getattr(dataset, "blend", None), *(getattr(dataset, "blend_per_split", None) or ())]
    data_path = getattr(dataset, "data_path", None)
    if data_path is not None and getattr(dataset, "blend", None) is None:
        blends.append(get_blend_from_list(data_path.split() if isinstance(data_path, str) else
                                          [str(p) for p in data_path]))
    for blend in blends:
        for prefix in (blend[0] if blend else ()):
            if prefix not in prefixes:
                prefixes.append(prefix)
    return prefixes


def _max_token_id(path: Path, dtype: type[np.number], vocab_size: int) -> tuple[int, int, bool]:
    """``(min, max, exhaustive)`` token id of a ``.bin``, read through a memory map.

    Bounded: a ``.bin`` of at most :data:`TOKEN_SCAN_BYTES` (4 GiB, about a second at the GB/s numpy
    reduces a memory map) is read whole, so the check is exact for any single owner's corpus of up to
    2 billion tokens; a larger one is read in evenly spaced windows of that total size.  Ids outside
    the vocabulary come from preparing the data with a different, larger tokenizer, which shows
    throughout a corpus, so the windows find it; reading a terabyte corpus whole would delay every
    run by minutes.  Skipped entirely when the dtype itself cannot hold an id outside the vocabulary.
    """
    info = np.iinfo(dtype)
    if info.min >= 0 and info.max < vocab_size:
        return 0, 0, True
    tokens = np.memmap(path, dtype=dtype, mode="r")
    window = TOKEN_SCAN_WINDOW // tokens.itemsize
    starts = range(0, len(tokens), window)
    exhaustive = len(tokens) * tokens.itemsize <= TOKEN_SCAN_BYTES
    if not exhaustive:
        count = TOKEN_SCAN_BYTES // TOKEN_SCAN_WINDOW
        starts = sorted({int(s) // window * window for s in np.linspace(0, len(tokens) - 1, count)})
    low, high, signed = 0, 0, info.min < 0
    for start in starts:
        chunk = tokens[start : start + window]
        if len(chunk):
            high = max(high, int(chunk.max()))
            low = min(low, int(chunk.min())) if signed else 0
    return low, high, exhaustive


def check_dataset(prefix: str, vocab_size: int) -> str:
    """Refuse a dataset prefix that cannot be trained on; returns the SHA-256 of its ``.idx``.

    Checked: ``PREFIX.bin`` and ``PREFIX.idx`` exist, the index is a Megatron index whose documents
    end exactly at the end of the ``.bin`` (a ``.bin`` from another build would be read as garbage),
    and every token id is inside the model's vocabulary (:func:`_max_token_id`).  The digest keys
    Bridge's sample-index cache (:func:`key_dataset_cache`)."""
    bin_path, idx_path = Path(prefix + ".bin"), Path(prefix + ".idx")
    missing = [p.name for p in (bin_path, idx_path) if not p.is_file()]
    if missing:
        raise ConfigError(f"no Megatron indexed dataset at {prefix}: {' and '.join(missing)} missing (a data path is "
                          "the prefix of PREFIX.bin and PREFIX.idx, as written by 'flexolmo prepare-data')")
    digest = hashlib.sha256()
    with open(idx_path, "rb") as stream:
        head = stream.read(34)  # magic (9 bytes), version, dtype code, sequence and document counts
        try:
            if head[:9] != _INDEX_HEADER or struct.unpack("<Q", head[9:17])[0] != 1:
                raise ValueError("not a Megatron index (version 1)")
            dtype = DType.dtype_from_code(head[17])
            sequences, documents = struct.unpack("<QQ", head[18:34])
        except (ValueError, KeyError, IndexError, struct.error) as error:
            raise ConfigError(f"{idx_path}: not a Megatron indexed-dataset index ({error})") from None
        digest.update(head)
        for block in iter(lambda: stream.read(1 << 24), b""):
            digest.update(block)
    itemsize = np.dtype(dtype).itemsize
    if idx_path.stat().st_size < 34 + sequences * 12 + documents * 8:
        raise ConfigError(f"{idx_path}: truncated index ({sequences} sequences, {documents} documents declared)")
    end = 0
    if sequences:
        index = np.memmap(idx_path, mode="r", dtype=np.uint8)
        length = int(index[34 + 4 * (sequences - 1) : 34 + 4 * sequences].view(np.int32)[0])
        pointer = int(index[34 + 4 * sequences + 8 * (sequences - 1) : 34 + 12 * sequences].view(np.int64)[0])
        end = pointer + length * itemsize
    if bin_path.stat().st_size != end:
        raise ConfigError(f"{bin_path} has {bin_path.stat().st_size} bytes but {idx_path.name} describes {end}: "
                          "the two files are from different builds; rebuild the dataset")
    low, high, exhaustive = _max_token_id(bin_path, dtype, vocab_size)
    if high >= vocab_size or low < 0:
        why = ("the data was tokenized with a larger tokenizer than the model's: prepare it with the model's "
               "tokenizer" if high >= vocab_size else "a negative id: the .bin is corrupt")
        raise ConfigError(f"{bin_path}: token id {high if high >= vocab_size else low} is outside the model's "
                          f"vocabulary of {vocab_size} ({'' if exhaustive else 'found in a sample; '}{why})")
    return digest.hexdigest()


def key_dataset_cache(dataset, digests: list[str]) -> None:
    """Point Bridge's sample-index cache at a directory named by the datasets' ``.idx`` digests.

    Megatron's ``GPTDataset`` caches its document, sample and shuffle indices under
    ``PREFIX/cache/GPTDataset_indices`` keyed by a hash of the *configuration* (path, seed, lengths),
    not of the data: a dataset rebuilt at the same prefix reused the old indices (an IndexError, or
    with as many documents, samples cut at the old boundaries).  The indices are a function of the
    ``.idx`` alone (document lengths and order; the ``.bin`` only holds the tokens they point at), so
    keying the directory by the ``.idx`` digests is exact: a rebuilt dataset gets a fresh directory,
    an unchanged one reuses its cache.  A ``dataset.path_to_cache`` override is keyed the same way.
    """
    if not digests:
        return
    key = hashlib.sha256("\n".join(digests).encode()).hexdigest()[:16]
    base = dataset.path_to_cache or os.path.join(dataset_prefixes(dataset)[0], "cache")
    dataset.path_to_cache = os.path.join(base, f"flexolmo-{key}")


# The recipe argument that sets each checked configuration key (same name), named in a refusal.
_RECIPE_ARGUMENTS = {"optimizer.lr": "lr", "optimizer.min_lr": "min_lr", "optimizer.weight_decay": "weight_decay",
                     "scheduler.lr_warmup_iters": "lr_warmup_iters", "train.train_iters": "train_iters",
                     "train.global_batch_size": "global_batch_size", "train.micro_batch_size": "micro_batch_size",
                     "model.seq_length": "seq_length", "checkpoint.save_interval": "save_interval",
                     "logger.log_interval": "log_interval", "rng.seed": "seed"}


def _setting(config, key: str, expected: str, valid, *, optional: bool = False, integer: bool = False):
    """The value of the dotted ``key`` if it is a number (an ``int`` for ``integer``; never a bool, never
    NaN or ±Inf; None only if ``optional``) for which ``valid(value)`` holds, else a refusal naming the key."""
    value = config
    for part in key.split("."):
        value = getattr(value, part, None)
    if value is None and optional:
        return None
    number = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    if not (number and math.isfinite(value) and valid(value)):
        argument = _RECIPE_ARGUMENTS.get(key)
        how = f" (set by recipe.{argument}=... or {key}=...)" if argument else ""
        raise ConfigError(f"{key}={value!r}: must be {'a whole number' if integer else 'a finite number'} "
                          f"{expected}{how}")
    return value


def check_settings(config) -> None:
    """The numbers the optimizer, the learning-rate schedule and the loop use, checked before anything is
    written: type (a number, a whole number where Bridge counts), finite, sign and range.  Bridge copies
    ``recipe.lr=abc`` or ``nan`` into the optimizer unchecked and fails inside ``torch.optim.Adam``, and
    refuses ``train_iters=-1`` only inside ``pretrain()``, both after the save directory exists."""
    positive, non_negative = (lambda v: v > 0), (lambda v: v >= 0)
    iters = _setting(config, "train.train_iters", "> 0", positive, optional=True, integer=True)
    samples = _setting(config, "train.train_samples", "> 0", positive, optional=True, integer=True)
    if iters is None and samples is None and getattr(config.train, "num_epochs", None) is None:
        raise ConfigError("train.train_iters is not set: give the number of iterations (recipe.train_iters=N)")
    global_batch = _setting(config, "train.global_batch_size", "> 0", positive, integer=True)
    _setting(config, "train.micro_batch_size", f"in [1, train.global_batch_size={global_batch}] and divide it",
             lambda v: 0 < v <= global_batch and global_batch % v == 0, integer=True)
    _setting(config, "model.seq_length", "> 0", positive, integer=True)
    _setting(config, "dataset.seq_length", "> 0", positive, optional=True, integer=True)
    if getattr(getattr(config, "validation", None), "skip_train", False):  # forward-only: no step is taken
        lr = _setting(config, "optimizer.lr", ">= 0", non_negative)
    else:
        lr = _setting(config, "optimizer.lr", "> 0", positive)
    _setting(config, "optimizer.min_lr", f"in [0, optimizer.lr={lr}]", lambda v: 0 <= v <= lr, optional=True)
    _setting(config, "optimizer.weight_decay", ">= 0", non_negative)
    _setting(config, "optimizer.clip_grad", ">= 0 (0: no clipping)", non_negative, optional=True)
    _setting(config, "optimizer.adam_beta1", "in [0, 1)", lambda v: 0 <= v < 1, optional=True)
    _setting(config, "optimizer.adam_beta2", "in [0, 1)", lambda v: 0 <= v < 1, optional=True)
    _setting(config, "optimizer.adam_eps", "> 0", positive, optional=True)
    _setting(config, "scheduler.lr_warmup_iters", ">= 0", non_negative, optional=True, integer=True)
    _setting(config, "scheduler.lr_warmup_samples", ">= 0", non_negative, optional=True, integer=True)
    _setting(config, "scheduler.lr_warmup_fraction", "in [0, 1)", lambda v: 0 <= v < 1, optional=True)
    _setting(config, "scheduler.lr_warmup_init", f"in [0, optimizer.lr={lr}]", lambda v: 0 <= v <= lr,
             optional=True)
    _setting(config, "scheduler.lr_decay_iters", "> 0", positive, optional=True, integer=True)
    _setting(config, "scheduler.lr_decay_samples", "> 0", positive, optional=True, integer=True)
    start = _setting(config, "scheduler.start_weight_decay", ">= 0", non_negative, optional=True)
    if start is not None:
        _setting(config, "scheduler.end_weight_decay", f">= scheduler.start_weight_decay={start}",
                 lambda v: v >= start, optional=True)
    else:
        _setting(config, "scheduler.end_weight_decay", ">= 0", non_negative, optional=True)
    _setting(config, "checkpoint.save_interval", "> 0", positive, optional=True, integer=True)
    _setting(config, "logger.log_interval", "> 0", positive, optional=True, integer=True)
    _setting(config, "rng.seed", "in [0, 2**32)", lambda v: 0 <= v < 2**32, optional=True, integer=True)


def check_inputs(config) -> None:
    """Everything ``pretrain()`` would otherwise fail on later, checked before anything is written:
    the run's numbers (:func:`check_settings`), the start checkpoint (``init_from``), the tokenizer and
    every dataset (see :func:`check_dataset`); then keys Bridge's dataset cache to the data
    (:func:`key_dataset_cache`)."""
    check_settings(config)
    model = config.model
    vocab_size = int(model.vocab_size)
    init_from = getattr(model, "init_from", None)
    if init_from:
        try:
            load_config(init_from)
            check_is_checkpoint(Path(init_from))  # checksums, and the pickle allow-list
        except FlexOlmoError as error:
            raise ConfigError(f"init_from: {error}") from None
    resume = getattr(config.checkpoint, "load", None)
    if resume and Path(resume).is_dir():  # Bridge's loader unpickles .metadata without an allow-list
        try:
            if (resolve_checkpoint(resume) / ".metadata").is_file():
                check_is_checkpoint(Path(resume))
        except FlexOlmoError as error:
            raise ConfigError(f"checkpoint.load: {error}") from None
    tokenizer = config.tokenizer
    if tokenizer.tokenizer_type == "HuggingFaceTokenizer" and tokenizer.tokenizer_model:
        entries = len(load_tokenizer(tokenizer.tokenizer_model))
        if entries > vocab_size:
            raise ConfigError(f"tokenizer {tokenizer.tokenizer_model} has {entries} entries, more than the model's "
                              f"vocabulary of {vocab_size}")
    prefixes = dataset_prefixes(config.dataset)
    digests = [check_dataset(prefix, vocab_size) for prefix in prefixes]
    for prefix in prefixes:
        try:
            verify_dataset(prefix)  # checksums written by prepare-data
        except FlexOlmoError as error:
            raise ConfigError(str(error)) from None
    key_dataset_cache(config.dataset, digests)
