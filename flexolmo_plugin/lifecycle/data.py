"""A data owner's text -> Megatron indexed dataset (``.bin`` / ``.idx``), streamed line by line.

Megatron-Core and Megatron-Bridge train from ``megatron.core.datasets`` indexed datasets: token ids
in ``PREFIX.bin`` and document boundaries in ``PREFIX.idx``.  Input is JSON Lines (one document per
line, text under ``text_key``), read one line at a time so private corpora of any size fit; each
document ends with the tokenizer's end-of-document token, as Megatron's GPT datasets expect.  A bad
line stops the run with its line number, and nothing is left at the output prefix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tqdm import tqdm
from transformers import AutoTokenizer

from flexolmo_plugin.errors import FlexOlmoError


class DataError(FlexOlmoError):
    """Unusable input data (bad JSON, missing text, empty corpus) or tokenizer."""


@dataclass(frozen=True)
class DatasetReport:
    documents: int
    tokens: int
    prefix: Path


def load_tokenizer(tokenizer_dir: str | os.PathLike):
    """A local ``transformers`` fast tokenizer (never downloaded)."""

    path = Path(tokenizer_dir)
    if not path.is_dir():
        raise DataError(f"tokenizer directory {path} does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as error:  # transformers raises several types for unusable directories
        raise DataError(f"{path}: cannot load a tokenizer ({error})") from error


def iter_records(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a JSON Lines file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object")
            yield number, record


def iter_documents(path: str | os.PathLike, *, text_key: str = "text") -> Iterator[tuple[int, str]]:
    """``(line number, text)`` for each non-blank line of a JSON Lines file."""
    for number, record in iter_records(path):
        if not isinstance(record.get(text_key), str):
            raise DataError(f"{path}:{number}: expected an object with a string field {text_key!r}")
        yield number, record[text_key]


def prepare_dataset(input_path: str | os.PathLike, output_prefix: str | os.PathLike, *, tokenizer_dir,
                    text_key: str = "text", append_eod: bool = True, batch_size: int = 256,
                    progress: bool = False) -> DatasetReport:
    """Tokenize ``input_path`` into ``output_prefix.bin`` / ``.idx``."""

    tokenizer = load_tokenizer(tokenizer_dir)
    eod = tokenizer.eos_token_id
    if append_eod and eod is None:
        raise DataError(f"{tokenizer_dir}: tokenizer has no end-of-document (eos) token; pass append_eod=False")
    prefix = Path(output_prefix)
    final = [prefix.with_name(prefix.name + suffix) for suffix in (".bin", ".idx")]
    existing = [str(p) for p in final if p.exists()]
    if existing:
        raise FileExistsError(f"output already exists: {existing}; choose another prefix (nothing was written)")
    if not prefix.parent.is_dir():
        raise FileNotFoundError(f"output directory {prefix.parent} does not exist")
    partial = [p.with_name(f".{p.name}.partial") for p in final]
    dtype = DType.optimal_dtype(len(tokenizer))
    builder = IndexedDatasetBuilder(str(partial[0]), dtype=dtype)
    size = Path(input_path).stat().st_size if Path(input_path).is_file() else 0
    bar = None
    if progress:

        bar = tqdm(total=size, unit="B", unit_scale=True, desc="tokenizing")
    documents = tokens = 0

    def flush(batch: list[str]) -> None:
        nonlocal documents, tokens
        if not batch:
            return
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            if append_eod:
                ids = ids + [eod]
            if not ids:
                continue
            builder.add_item(torch.from_numpy(np.asarray(ids, dtype=np.int64)))
            builder.end_document()
            documents += 1
            tokens += len(ids)

    try:
        batch: list[str] = []
        for _, text in iter_documents(input_path, text_key=text_key):
            batch.append(text)
            if bar is not None:
                bar.update(len(text.encode("utf-8")) + 1)
            if len(batch) >= batch_size:
                flush(batch)
                batch = []
        flush(batch)
        if documents == 0:
            raise DataError(f"{input_path}: no documents")
        builder.finalize(str(partial[1]))
        for src, dst in zip(partial, final):
            os.replace(src, dst)  # .bin first, .idx last: a dataset is usable only once its index exists
    except BaseException:
        for p in partial:
            p.unlink(missing_ok=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return DatasetReport(documents, tokens, prefix)
