"""Domain embeddings: the router row r_i a data owner starts from (paper §3.3.2).

r_i is the mean embedding of a sample of the owner's documents (the paper: 1000 documents embedded
with GritLM-7B, whose width equals the model's).  Two embedders are supported, both from local
paths only:

* ``encoder``: a text-embedding model (sentence-transformers layout or any HF encoder) -- documents
  are mean-pooled over their tokens, as GritLM and most sentence-transformers models do;
* ``public-model``: the public model itself (HF OLMo-2 / FlexOlmo) -- the mean of its final hidden
  states over each document's tokens (the paper's alternative, which needs no extra model).

The embedding width must equal the FlexOlmo model's hidden size; that is checked when the vector is
used (``flexolmo upcycle``) and, with ``expected_width`` (see :func:`model_width`), already here.

Each document's embedding is scaled to unit length before the mean (``normalize=True``, the
default), as the paper's embedder outputs are: its shipped domain embeddings have L2 norms 0.41-0.55.
Why it matters: the router reads the un-normalised residual stream, so a row as long as a raw mean
of final hidden states (norm 5.4-6.5 in the demo's full-size public model) starts the router logits in
the tens and makes the router z-loss (coefficient 1e-3) a large part of the owner's loss; its
gradient flows through the residual stream into the owner's experts in earlier layers, which can
lower it by shrinking the later routers' inputs, on *all* text.  Measured (docs/composition.md,
2026-12-03): full demo seed 3, Megatron's logged z-loss 2,035 -> 46 at the first log, the python
owner's final training loss 6.18 -> 5.98, and the owners' models 1.6-3.8% instead of 4-8% worse than
the public model on public text.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModel, AutoModelForCausalLM
from transformers.utils import logging as transformers_logging

from flexolmo_plugin.lifecycle.data import DataError, iter_documents, load_tokenizer


def sample_documents(path: str | os.PathLike, *, num_docs: int = 1000, seed: int = 0,
                     text_key: str = "text") -> list[str]:
    """A uniform sample of ``num_docs`` non-empty documents, in one streaming pass (reservoir)."""
    if num_docs < 1:
        raise DataError("num_docs must be >= 1")
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    for _, text in iter_documents(path, text_key=text_key):
        if not text.strip():
            continue
        seen += 1
        if len(sample) < num_docs:
            sample.append(text)
        else:
            j = rng.randrange(seen)
            if j < num_docs:
                sample[j] = text
    if not sample:
        raise DataError(f"{path}: no non-empty documents to embed")
    return sample


def model_width(model_dir: str | os.PathLike) -> int:
    """The hidden size of the FlexOlmo model an embedding is for: ``hidden_size`` of its HF
    ``config.json``, or of the ``flexolmo_config.json`` of a Megatron checkpoint.

    Checked here, before any document is embedded, because a width that is missing or not a positive
    whole number would otherwise surface as a ``KeyError`` -- or pass silently and be found only
    when ``upcycle`` reads the vector."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DataError(f"{model_dir}: no such model directory")
    for name, section in (("config.json", None), ("flexolmo_config.json", "config")):
        path = model_dir / name
        if not path.is_file():
            continue
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            width = (payload[section] if section else payload).get("hidden_size")
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise DataError(f"{path}: not a model configuration ({error})") from None
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise DataError(f"{path} has no integer 'hidden_size' (found {width!r}): cannot tell the width the "
                            "embedding must have")
        return width
    raise DataError(f"{model_dir}: no config.json or flexolmo_config.json: not a model directory")


def _detect_method(model_dir: Path) -> str:
    config = model_dir / "config.json"
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type") if config.exists() else None
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        raise DataError(f"{config}: not a model configuration ({error})") from None
    return "public-model" if model_type in ("olmo2", "flex_olmo") else "encoder"


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


@torch.no_grad()
def document_embeddings(model_dir: str | os.PathLike, documents: list[str], *, method: str = "auto",
                        max_tokens: int = 512, batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """One embedding per document, ``[len(documents), width]`` float32 (rows may be NaN for a
    document the embedder fails on; callers drop them)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DataError(f"embedding model directory {model_dir} does not exist")
    if not documents:
        raise DataError("no documents to embed")
    for name, value in (("max_tokens (--max-tokens)", max_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"{name} must be a whole number >= 1, got {value!r}")
    method = _detect_method(model_dir) if method == "auto" else method
    if method not in ("public-model", "encoder"):
        raise DataError(f"unknown method {method!r}; use 'auto', 'encoder' or 'public-model'")
    if method == "encoder" and (model_dir / "modules.json").exists():
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            SentenceTransformer = None
        if SentenceTransformer is not None:
            encoder = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
            return encoder.encode(documents, batch_size=batch_size, convert_to_tensor=True).float().cpu()
    tokenizer = load_tokenizer(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    auto = AutoModelForCausalLM if method == "public-model" else AutoModel
    if not progress:  # transformers' "Loading weights" bar would precede a one-line refusal on stderr
        transformers_logging.disable_progress_bar()
    try:
        model = auto.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    except OSError as error:
        if error.errno is not None:  # the disk, not the directory's content
            raise
        raise DataError(f"{model_dir}: cannot load the model ({error})") from None  # no weights, no config...
    except ValueError as error:  # an unknown or inconsistent configuration
        raise DataError(f"{model_dir}: cannot load the model ({error})") from None
    model.eval()
    vocabulary = model.get_input_embeddings().num_embeddings
    steps = range(0, len(documents), batch_size)
    if progress:
        steps = tqdm(steps, desc="embedding", unit="batch")
    vectors = []
    for start in steps:
        batch = tokenizer(documents[start:start + batch_size], padding=True, truncation=True,
                          max_length=max_tokens, return_tensors="pt")
        _check_ids(batch["input_ids"], vocabulary, len(tokenizer), model_dir)
        out = model(**batch, output_hidden_states=True)
        hidden = out.hidden_states[-1] if method == "public-model" else out.last_hidden_state
        vectors.append(_mean_pool(hidden.float(), batch["attention_mask"]))
    return torch.cat(vectors)


def _check_ids(ids: torch.Tensor, vocabulary: int, tokenizer_size: int, model_dir: Path) -> None:
    """Every token id (padding included) must have a row in the model's embedding table: an id past
    the end is a tokenizer that belongs to another (larger) vocabulary, which would otherwise end in
    an ``IndexError`` inside ``torch.embedding``."""
    largest = int(ids.max()) if ids.numel() else -1
    if largest >= vocabulary:
        raise DataError(f"{model_dir}: the tokenizer produced token id {largest} (it has {tokenizer_size} tokens) "
                        f"but the model's embedding table has {vocabulary} rows: the tokenizer does not belong "
                        "to this model")


def embed_documents(model_dir: str | os.PathLike, documents: list[str], *, method: str = "auto",
                    max_tokens: int = 512, batch_size: int = 8, expected_width: int | None = None,
                    normalize: bool = True, progress: bool = False) -> torch.Tensor:
    """Mean embedding ``[width]`` (float32) of ``documents``: the domain embedding r_i; with
    ``normalize`` (the default) the mean of the documents' unit-length embeddings (module docstring)."""
    vectors = document_embeddings(model_dir, documents, method=method, max_tokens=max_tokens,
                                  batch_size=batch_size, progress=progress)
    return _finish(vectors, expected_width, Path(model_dir), normalize=normalize)


def _finish(vectors: torch.Tensor, expected_width: int | None, model_dir: Path, *, normalize: bool) -> torch.Tensor:
    vectors = vectors[torch.isfinite(vectors).all(dim=-1)]  # a failed document must not poison the mean
    if vectors.shape[0] == 0:
        raise DataError(f"{model_dir}: every document embedding was NaN/Inf")
    if normalize:
        norms = vectors.norm(dim=-1, keepdim=True)
        keep = norms.squeeze(-1) > 0  # a zero vector has no direction
        if not keep.any():
            raise DataError(f"{model_dir}: every document embedding was zero; nothing to normalise")
        vectors = vectors[keep] / norms[keep]
    mean = vectors.mean(0)
    if expected_width is not None and mean.numel() != expected_width:
        raise DataError(f"{model_dir} produces {mean.numel()}-dimensional embeddings, but the FlexOlmo model's "
                        f"hidden size is {expected_width}: router rows need an embedder of the model's width")
    return mean
