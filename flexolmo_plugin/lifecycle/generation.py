"""Text generation on the Megatron FlexOlmo model, with per-sequence attribution to the experts.

Why it exists: an owner must be able to see what the model (and its own expert) produces -- the
paper's extraction audit (§5.3) is built on greedy and sampled continuations -- and every output
can name the experts that produced it (:mod:`.routing`).

How: Megatron-Core's own KV cache, ``StaticInferenceContext`` passed to ``GPTModel.forward``, runs
our model unchanged on CPU (no shim: its cache buffers are allocated on ``current_device``, which the
CPU compatibility layer already maps to the CPU).  A static context keeps one sequence offset for the
whole batch, so prompts of different lengths are run in lock-step, as Megatron's static text
generation does: the prefill covers the shortest prompt; at each later position a row that still
has prompt tokens is fed its own token and the model's choice is discarded.  No row ever contains
padding, so there is no attention mask to get wrong and each row computes exactly what it would
alone (dropless MoE routes every token independently).

Choices: ``temperature == 0`` is greedy (``argmax``, as ``transformers`` ``do_sample=False``);
otherwise softmax of ``logits / temperature``, restricted to the smallest set of tokens whose
probability reaches ``top_p`` (the most likely token always stays), drawn with a
``torch.Generator`` seeded by ``seed`` -- the same prompts, batch and seed give the same tokens.
A row stops after ``max_new_tokens`` tokens or at ``eos_token_id`` (kept in its output).

Parallel layouts: tested single-process; a one-off run at EP=2 and at TP=2 (without sequence
parallelism, which one-token steps cannot use) gave the single-process tokens.

Attribution of a generated sequence: the gate weights at the positions whose outputs chose the new
tokens (the last prompt token and every generated token but the last), summed over layers, normalised
over experts.
"""

from __future__ import annotations

import contextlib
import json
import math
import operator
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state as ps
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from torch import nn

from flexolmo_plugin.conversion.atomic import check_new_output, write_file_atomically
from flexolmo_plugin.conversion.checkpoint_dir import tokenizer_dir as stored_tokenizer_dir
from flexolmo_plugin.errors import ConfigError
from flexolmo_plugin.lifecycle.data import DataError, iter_documents, load_tokenizer
from flexolmo_plugin.lifecycle.evaluation import non_finite_cause
from flexolmo_plugin.lifecycle.opt_out import exclude_experts
from flexolmo_plugin.lifecycle.routing import expert_names, gate_mass_per_sequence, shares
from flexolmo_plugin.model.build import causal_attention_mask, logits, unwrap


class GenerationError(ConfigError):
    """Prompts or generation settings the model cannot run (empty prompt, id out of range, too long...)."""


class NonFiniteOutputError(GenerationError):
    """A model whose logits or gate weights are NaN/Inf (NaN weights, or an overflow): no token can be chosen."""


@dataclass(frozen=True, kw_only=True)
class GenerationResult:
    """What :func:`generate` produced, one entry per prompt, in the prompts' order."""

    tokens: list[list[int]]  # the new tokens (up to and including EOS), not the prompt
    # {expert name: share of the routing mass} per sequence (sums to 1; :mod:`.routing`)
    attribution: list[dict[str, float]]
    expert_names: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()  # experts masked at run time while generating


def check_generation(model: nn.Module, prompts, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                     eos_token_id: int | None = None) -> list[list[int]]:
    """The prompts as lists of ints, or :class:`GenerationError` naming the first problem (before any work)."""
    config = unwrap(model).flexolmo_config
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise GenerationError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise GenerationError(f"top_p must be in (0, 1], got {top_p!r}")
    if eos_token_id is not None and not 0 <= eos_token_id < config.vocab_size:
        raise GenerationError(f"eos_token_id {eos_token_id} is outside the vocabulary [0, {config.vocab_size})")
    if unwrap(model).config.sequence_parallel:
        raise GenerationError("generation runs one token at a time; build the model without sequence parallelism")
    if not prompts:
        raise GenerationError("no prompts given")
    checked = []
    for index, prompt in enumerate(prompts):
        try:
            ids = [operator.index(t) for t in prompt]
        except TypeError:
            raise GenerationError(f"prompt {index} holds values that are not integer token ids") from None
        if not ids:
            raise GenerationError(f"prompt {index} is empty (generation needs at least one token)")
        if min(ids) < 0 or max(ids) >= config.vocab_size:
            raise GenerationError(f"prompt {index}: token ids must lie in [0, {config.vocab_size}), got range "
                                  f"[{min(ids)}, {max(ids)}] (is the tokenizer the model's?)")
        if len(ids) + max_new_tokens > config.max_position_embeddings:
            raise GenerationError(f"prompt {index} has {len(ids)} tokens; with {max_new_tokens} new tokens that "
                                  f"exceeds the model's context of {config.max_position_embeddings}")
        checked.append(ids)
    return checked


def _choose(scores: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None):
    """The next token of every row from its ``[batch, vocab]`` logits."""
    if temperature == 0:
        return scores.argmax(-1)
    probs = torch.softmax(scores.double() / temperature, dim=-1)
    if top_p < 1:
        ordered, order = probs.sort(dim=-1, descending=True)
        before = ordered.cumsum(-1) - ordered  # probability of the more likely tokens
        ordered = ordered.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, ordered)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1)


class _CachedSteps:
    """Forward over positions ``[a, b)`` with Megatron's static KV cache (prefill, then one at a time)."""

    def __init__(self, model: nn.Module, batch: int, length: int):
        self.model = model
        self.context = StaticInferenceContext(batch, length)
        self.vocab = unwrap(model).flexolmo_config.vocab_size

    def __call__(self, tokens: torch.Tensor, a: int, b: int) -> torch.Tensor:
        if a != self.context.sequence_len_offset:
            raise AssertionError(f"KV cache at {self.context.sequence_len_offset}, asked for {a}")
        device = next(self.model.parameters()).device
        ids = tokens[:, a:b].to(device)
        positions = torch.arange(a, b, device=device).expand(ids.shape[0], b - a)
        if a > 0:
            self.context.enable_decode_mode()
        mask = causal_attention_mask(b - a, device) if a == 0 else None
        out = self.model(ids, positions, mask, inference_context=self.context)
        self.context.sequence_len_offset += b - a
        if ps.get_tensor_model_parallel_world_size() > 1:
            out = gather_from_tensor_model_parallel_region(out)
        return out[:, -1, : self.vocab].float()


class _FullSteps:
    """Forward over ``[0, b)`` every time: no cache (the reference the cached path must equal)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, tokens: torch.Tensor, a: int, b: int) -> torch.Tensor:
        return logits(self.model, tokens[:, :b])[:, -1].float()


@contextlib.contextmanager
def _excluding(model: nn.Module, names: list[str] | None):
    """Mask ``names`` for the duration; the routers' previous masks come back afterwards."""
    routers = [layer.mlp.router for layer in unwrap(model).decoder.layers]
    before = [router.excluded_experts for router in routers]
    try:
        if names:
            exclude_experts(model, list(names))
        yield tuple(expert_names(model)[i] for i in routers[0].excluded_experts)
    finally:
        for router, indices in zip(routers, before):
            router.set_excluded_experts(indices)


@torch.no_grad()
def generate(model: nn.Module, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, eos_token_id: int | None = None,
             exclude: list[str] | None = None, kv_cache: bool = True) -> GenerationResult:
    """Continue each prompt (token ids) by up to ``max_new_tokens`` tokens.

    Args:
        model: a FlexOlmo model (``from_mcore`` / ``from_hf``); run in eval mode, its mode is restored.
        prompts: token ids per prompt (any lengths, batched together).
        max_new_tokens: tokens to add per prompt at most.
        temperature: 0 = greedy; > 0 samples from ``softmax(logits / temperature)``.
        top_p: nucleus sampling: only the most likely tokens whose probability reaches ``top_p``.
        seed: seed of the sampling generator (``None``: a fresh random one).
        eos_token_id: a row stops after producing it (kept in its tokens).
        exclude: expert names masked in every router while generating (run-time opt-out; the
            all-to-all dispatcher needs at least top-k experts left, see ``exclude_experts``).
        kv_cache: ``False`` recomputes every prefix in full (slow; the cache's reference).

    Raises:
        GenerationError: empty prompts, ids outside the vocabulary, settings out of range, or a
            prompt plus ``max_new_tokens`` longer than the model's context.
    """
    prompts = check_generation(model, prompts, max_new_tokens, temperature, top_p, eos_token_id)
    names = expert_names(model)
    lengths = [len(p) for p in prompts]
    batch, total = len(prompts), max(lengths) + max_new_tokens
    tokens = torch.zeros(batch, total, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(prompt)
    generator = None
    if temperature > 0:
        generator = torch.Generator()
        generator.manual_seed(seed) if seed is not None else generator.seed()
    step = _CachedSteps(model, batch, total) if kv_cache else _FullSteps(model)
    mass = torch.zeros(batch, total, len(names), dtype=torch.float64)  # gate weights per position
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * batch
    training = model.training
    model.eval()
    try:
        with _excluding(model, exclude) as excluded, gate_mass_per_sequence(model, batch) as forwards:
            def run(a: int, b: int) -> torch.Tensor:
                scores = step(tokens, a, b)
                covered = forwards.pop()  # [positions, batch, experts]
                if not (torch.isfinite(scores).all() and torch.isfinite(covered).all()):
                    what = "logits" if not torch.isfinite(scores).all() else "gate weights"
                    raise NonFiniteOutputError(f"the model produces non-finite {what} (position {b - 1}); "
                                               f"{non_finite_cause(model)}")
                mass[:, b - covered.shape[0]: b] = covered.transpose(0, 1)
                return scores

            position = min(lengths)
            scores = run(0, position)
            while True:
                chosen = _choose(scores, temperature, top_p, generator)
                for row in range(batch):
                    if done[row] or position < lengths[row]:
                        continue
                    token = int(chosen[row])
                    tokens[row, position] = token
                    new[row].append(token)
                    done[row] = token == eos_token_id or len(new[row]) == max_new_tokens
                if all(done):
                    break
                scores = run(position, position + 1)
                position += 1
    finally:
        model.train(training)
    attribution = [shares(mass[row, lengths[row] - 1: lengths[row] - 1 + len(new[row])].sum(0), names)
                   for row in range(batch)]
    return GenerationResult(tokens=new, attribution=attribution, expert_names=names, excluded=excluded)


# ---------------------------------------------------------------------- the command line's inputs / outputs
def checkpoint_tokenizer(model_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None):
    """The tokenizer to generate with: ``tokenizer_dir`` when given, else the ``tokenizer/`` folder that
    ``convert hf-to-mcore`` and ``upcycle`` store in a checkpoint (``MODEL_DIR`` or its latest ``iter_*``)."""
    if tokenizer_dir is not None:
        return load_tokenizer(tokenizer_dir)
    found = stored_tokenizer_dir(model_dir, vocabulary=True)
    if found is not None:
        return load_tokenizer(found)
    raise DataError(f"{model_dir} holds no tokenizer/ with a vocabulary (a model made from one that had a tokenizer "
                    "keeps it; an owner's training run saves none); pass --tokenizer DIR")


def read_prompts(path: str | os.PathLike, *, key: str = "prompt") -> list[str]:
    """The prompts of a JSON Lines file (``{"prompt": "..."}`` per line); a bad line names file:line."""
    prompts = []
    for number, text in iter_documents(path, text_key=key):
        if not text:
            raise DataError(f"{path}:{number}: the prompt is empty")
        prompts.append(text)
    if not prompts:
        raise DataError(f"{path}: no prompts (expected one JSON object with a {key!r} field per line)")
    return prompts


def encode_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each prompt (the tokenizer's own special tokens included, as ``transformers`` does)."""
    encoded = []
    for index, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:  # a lone surrogate: from "\\ud800" in JSON, or bytes of argv that
            # are not UTF-8 (Python decodes those to surrogates); the tokenizer would raise a TypeError
            raise DataError(f"prompt {index} is not valid text: {_describe_surrogate(text[error.start])} (character "
                            f"{error.start + 1})") from None
        ids = tokenizer(text)["input_ids"]
        if not ids:
            raise DataError(f"prompt {index} ({text[:40]!r}) encodes to no tokens")
        encoded.append(list(ids))
    return encoded


def _describe_surrogate(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # how Python's surrogateescape carries a byte that is not UTF-8
        return f"the byte 0x{code - 0xDC00:02x}, which is not UTF-8"
    return f"the lone UTF-16 surrogate \\u{code:04x}, which no UTF-8 encodes"


def check_outputs(*paths: str | os.PathLike | None) -> None:
    """Refuse existing or duplicate output paths before any work is done."""
    given = [Path(p) for p in paths if p is not None]
    if len(set(given)) != len(given):
        raise ConfigError("--out and --attribution must be different files")
    for path in given:
        check_new_output(path)


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> Path:
    """One JSON object per line, written all-or-nothing (never over an existing file)."""
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return write_file_atomically(path, text.encode("utf-8"))


def write_outputs(outputs: dict[str | os.PathLike, list[dict]]) -> None:
    """Write several JSON Lines files as one outcome: if a later one fails (it appeared meanwhile, the
    disk is full), the ones already written by this call are removed again before the error propagates."""
    written: list[Path] = []
    try:
        for path, records in outputs.items():
            written.append(write_jsonl(path, records))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
