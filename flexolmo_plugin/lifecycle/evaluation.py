"""Per-domain evaluation of a FlexOlmo model: loss, perplexity and where the router sends tokens.

The routing statistics come from forward hooks on the real routers (the ``routing_map`` Megatron's
dispatcher uses), so they show exactly which experts computed each token -- e.g. that a merged
model sends code to the code expert, and that an opted-out expert receives nothing.  Statistics are
those of this process's tokens (run single-process, or read them per rank).

A non-finite loss is refused (:class:`NonFiniteLossError`), not printed as ``nan``: a table row of
``nan`` looks like a number, exits 0, and poisons every mean and oracle computed from it.  The check
is on the loss, not on the weights up front, because it is the loss that must be meaningful: finite
weights can still overflow in bf16/fp16, while NaN in an expert that no token reaches (one excluded
with ``--exclude``) does not affect the result.  When it fires, the weights are scanned to say why.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flexolmo_plugin.conversion.atomic import check_new_output, write_file_atomically
from flexolmo_plugin.conversion.checks import all_finite
from flexolmo_plugin.conversion.checksums import sidecar
from flexolmo_plugin.errors import ConfigError, FlexOlmoError
from flexolmo_plugin.lifecycle.data import DataError, check_indexed_dataset, verify_dataset
from flexolmo_plugin.lifecycle.routing import expert_names, gate_mass_per_sequence, router_outputs, shares
from flexolmo_plugin.model.build import logits, next_token_loss, unwrap


class NonFiniteLossError(FlexOlmoError):
    """A model whose loss on a domain is NaN or infinite: no number it produces can be reported."""


def first_non_finite_parameter(model: nn.Module) -> str | None:
    """``name (k of n values)`` of the model's first parameter with NaN/Inf values, or None."""
    for name, param in unwrap(model).named_parameters():
        if not all_finite(param.detach()):
            return f"{name} ({int((~torch.isfinite(param.detach())).sum())} of {param.numel()} values)"
    return None


def non_finite_cause(model: nn.Module) -> str:
    """Why a model's outputs are NaN/Inf, for a refusal: its first non-finite tensor, else an overflow."""
    bad = first_non_finite_parameter(model)
    return (f"its weights are not finite: first bad tensor {bad}" if bad else
            "its weights are finite, so its activations overflowed (as bf16/fp16 can)")


def _refuse_non_finite(model: nn.Module, model_name: str | None, domain: str, loss: float) -> None:
    subject = f"model {model_name}" if model_name else "the model"
    raise NonFiniteLossError(f"{subject} produces a non-finite loss ({loss}) on domain {domain!r}; "
                             f"{non_finite_cause(model)}")


@dataclass
class DomainResult:
    name: str
    tokens: int  # predicted tokens
    loss: float
    routing: torch.Tensor  # [layers, experts]: share of this domain's tokens each expert computed
    # [layers, experts]: mean gate weight p_i each expert received (0 where not selected).  With all
    # experts active (top-k = E, as after a merge of up to 4) every token reaches every expert and
    # ``routing`` is all ones; the weights show where the router actually sends the domain.
    weights: torch.Tensor | None = None

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))


def read_windows(prefix: str | os.PathLike, *, seq_len: int, max_tokens: int,
                 vocab_size: int | None = None) -> torch.Tensor:
    """Non-overlapping ``[n, seq_len]`` windows over the concatenated documents of an indexed dataset
    (its first ``max_tokens`` tokens).  A damaged dataset (:func:`~.data.check_indexed_dataset`), one
    that fails its checksums, or -- given ``vocab_size`` -- a token id outside the model's vocabulary
    is refused with a :class:`~.data.DataError` that names the file."""
    prefix = str(prefix)
    if not (os.path.exists(prefix + ".idx") and os.path.exists(prefix + ".bin")):
        raise FileNotFoundError(f"no Megatron indexed dataset at {prefix} (.bin/.idx)")
    sealed = sidecar(Path(prefix)).is_file()
    if sealed:  # prepare-data's checksums name a damaged file most exactly: check them first
        verify_dataset(prefix)
    dtype = check_indexed_dataset(prefix)
    # the index was checked to lay the documents back to back over the whole .bin: their concatenation
    # is the .bin itself
    available = os.path.getsize(prefix + ".bin") // dtype.itemsize
    tokens = np.fromfile(prefix + ".bin", dtype=dtype, count=min(available, max_tokens))
    if vocab_size is not None and tokens.size and (int(tokens.max()) >= vocab_size or int(tokens.min()) < 0):
        bad = int(tokens.max()) if int(tokens.max()) >= vocab_size else int(tokens.min())
        raise DataError(f"{prefix}.bin: token id {bad} is outside the model's vocabulary of {vocab_size} (the data "
                        "was prepared with another tokenizer than the model's, or the .bin is damaged)")
    if not sealed:  # after the refusals above: they need no "unverified" warning before them
        verify_dataset(prefix)
    stream = torch.from_numpy(tokens.astype(np.int64))
    n = stream.numel() // seq_len
    if n == 0:
        if stream.numel() >= max_tokens:  # the dataset has enough; the budget is what is short
            raise DataError(f"--max-tokens {max_tokens} is less than one window of --seq-len {seq_len}; "
                            "raise --max-tokens or lower --seq-len")
        raise DataError(f"{prefix}: {stream.numel()} tokens, fewer than one window of {seq_len}; lower --seq-len")
    return stream[: n * seq_len].reshape(n, seq_len)


@contextlib.contextmanager
def routing_counts(model: nn.Module, weights: torch.Tensor | None = None):
    """Yields a ``[layers, experts]`` tensor that accumulates routed-token counts while active;
    ``weights`` (same shape), when given, accumulates the gate weights the router assigned."""
    inner = unwrap(model)
    counts = torch.zeros(len(inner.decoder.layers), inner.flexolmo_config.num_experts, dtype=torch.float64)

    def accumulate(index: int, probs: torch.Tensor, routing_map: torch.Tensor) -> None:
        counts[index] += routing_map.sum(0).to(torch.float64).cpu()
        if weights is not None:
            weights[index] += probs.sum(0).to(torch.float64).cpu()

    with router_outputs(model, accumulate):
        yield counts


@torch.no_grad()
def evaluate(model: nn.Module, datasets: dict[str, str | os.PathLike], *, seq_len: int = 256,
             max_tokens: int = 16384, batch_size: int = 8, model_name: str | None = None,
             attribution: list[dict] | None = None) -> list[DomainResult]:
    """Loss and routing per domain; ``model_name`` (e.g. its checkpoint) names the model in a
    :class:`NonFiniteLossError`.  ``attribution``, when given, receives one record per evaluated
    window: ``{"domain", "window", "tokens", "attribution": {expert: share}}`` (:mod:`.routing`)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ConfigError(f"seq_len must be an integer >= 2 (the loss predicts each token from the ones before it), "
                          f"got {seq_len!r}")
    results = []
    names = expert_names(model)
    vocab_size = unwrap(model).flexolmo_config.vocab_size
    for name, prefix in datasets.items():
        windows = read_windows(prefix, seq_len=seq_len, max_tokens=max_tokens, vocab_size=vocab_size)
        loss_sum, predicted = 0.0, 0
        weights = torch.zeros(len(unwrap(model).decoder.layers), unwrap(model).flexolmo_config.num_experts,
                              dtype=torch.float64)
        with routing_counts(model, weights) as counts:
            for start in range(0, windows.shape[0], batch_size):
                batch = windows[start:start + batch_size]
                recorder = (gate_mass_per_sequence(model, batch.shape[0]) if attribution is not None
                            else contextlib.nullcontext([]))
                with recorder as forwards:
                    loss = next_token_loss(logits(model, batch), batch).item()
                if not math.isfinite(loss):
                    _refuse_non_finite(model, model_name, name, loss)
                if attribution is not None:
                    for row, mass in enumerate(forwards[0].sum(0)):
                        attribution.append({"domain": name, "window": start + row, "tokens": seq_len,
                                            "attribution": shares(mass, names)})
                n = batch.shape[0] * (seq_len - 1)
                loss_sum += loss * n
                predicted += n
        seen = windows.numel()
        results.append(DomainResult(name, predicted, loss_sum / predicted, (counts / seen).float(),
                                    (weights / seen).float()))
    return results


def format_table(results: list[DomainResult], title: str = "") -> str:
    width = max(len(r.name) for r in results)
    lines = [title] if title else []
    lines.append(f"{'domain':<{width}}  {'tokens':>8}  {'loss':>8}  {'ppl':>10}")
    for r in results:
        lines.append(f"{r.name:<{width}}  {r.tokens:>8}  {r.loss:>8.4f}  {r.perplexity:>10.2f}")
    return "\n".join(lines)


def format_routing(results: list[DomainResult], expert_names: tuple[str, ...]) -> str:
    """Share of each domain's tokens per expert, averaged over layers."""
    width = max(len(r.name) for r in results)
    head = "  ".join(f"{n:>8}" for n in expert_names)
    lines = [f"{'domain':<{width}}  {head}"]
    for r in results:
        shares = r.routing.mean(0)
        lines.append(f"{r.name:<{width}}  " + "  ".join(f"{100 * s:>7.1f}%" for s in shares.tolist()))
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ConfigError("plotting needs matplotlib (pip install matplotlib)") from error
    return plt


def plot_format(path: str | os.PathLike) -> str:
    """The image format a new plot file's suffix names (``png``, ``svg``, ``pdf``...), checked before any
    work: :class:`ConfigError` for a suffix matplotlib cannot write, ``OutputExistsError`` if it exists."""
    path = Path(path)
    _pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    supported = FigureCanvasBase.get_supported_filetypes()
    suffix = path.suffix[1:].lower()
    if suffix not in supported:
        named = f"suffix .{suffix}" if suffix else "no suffix"
        raise ConfigError(f"plot {path}: {named}; the suffix names the image format, one of "
                          f"{', '.join('.' + s for s in sorted(supported))}")
    check_new_output(path)
    return suffix


def plot_routing(results: list[DomainResult], expert_names: tuple[str, ...], path: str | os.PathLike, *,
                 show: str = "tokens") -> Path:
    """Heatmap per domain: layers x experts; ``show="tokens"``: share of the domain's tokens routed to
    each expert, ``show="weights"``: the mean gate weight each expert received.  Written to the new file
    ``path`` all-or-nothing (never over an existing file), in the format its suffix names."""
    if show not in ("tokens", "weights"):
        raise ValueError(f"show={show!r}; expected 'tokens' or 'weights'")
    image_format = plot_format(path)
    plt = _pyplot()
    layers = results[0].routing.shape[0]
    width = 1.0 + len(results) * (0.9 + 0.35 * len(expert_names))
    fig, axes = plt.subplots(1, len(results), figsize=(width, 1.2 + 0.3 * layers + 0.6), squeeze=False,
                             sharey=True, constrained_layout=True)
    try:
        for column, (ax, result) in enumerate(zip(axes[0], results)):
            values = result.routing if show == "tokens" else result.weights
            image = ax.imshow(values.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_title(result.name, fontsize=9)
            ax.set_xticks(range(len(expert_names)), expert_names, rotation=60, fontsize=7)
            ax.set_yticks(range(layers), [str(i) for i in range(layers)], fontsize=7)
            if column == 0:
                ax.set_ylabel("layer")
        label = "share of the domain's tokens" if show == "tokens" else "mean gate weight"
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.9, label=label)
        buffer = io.BytesIO()
        fig.savefig(buffer, format=image_format, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return write_file_atomically(path, buffer.getvalue())


@torch.no_grad()
def router_bias_logit_change(model: nn.Module, *, tokens: int = 64, seed: int = 0) -> float:
    """Max |Δlogit| on random tokens between ``model`` with its learned router bias and without it:
    what exporting to HF ``flex_olmo`` (which has no bias) changes.  The bias is restored afterwards."""
    config = unwrap(model).flexolmo_config
    ids = torch.randint(0, config.vocab_size, (2, min(tokens, config.max_position_embeddings)),
                        generator=torch.Generator().manual_seed(seed))
    with_bias = logits(model, ids)
    saved = []
    for layer in unwrap(model).decoder.layers:
        for bias in layer.mlp.router.domain_biases or []:
            saved.append((bias, bias.detach().clone()))
            bias.zero_()
    try:
        return (logits(model, ids) - with_bias).abs().max().item()
    finally:
        for bias, value in saved:
            bias.copy_(value)


def mean_loss(losses: dict[str, float]) -> float:
    return sum(losses.values()) / len(losses)


def oracle(losses: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per domain, the lowest loss any of the given models reaches (model -> domain -> loss): what a
    router that always picked the best single model for the domain would get."""
    domains = next(iter(losses.values())).keys()
    return {d: min(row[d] for row in losses.values()) for d in domains}


def composition_efficiency(public: dict[str, float], composed: dict[str, float], best: dict[str, float]) -> float:
    """How much of the oracle's gain over the public model the composed model captures, on the mean
    over domains: ``(public - composed) / (public - oracle)`` (1 = as good as the oracle, 0 = no
    better than the public model, negative = worse)."""
    gain = mean_loss(public) - mean_loss(best)
    return (mean_loss(public) - mean_loss(composed)) / gain if gain > 0 else float("nan")


def format_gate_weights(results: list[DomainResult], expert_names: tuple[str, ...]) -> str:
    """Mean gate weight p_i each expert received on each domain (mean over layers and tokens): where
    the router sends a domain even when every expert is active (top-k = number of experts)."""
    width = max(len(r.name) for r in results)
    lines = [f"{'domain':<{width}}  " + "  ".join(f"{n:>8}" for n in expert_names)]
    for r in results:
        lines.append(f"{r.name:<{width}}  " + "  ".join(f"{100 * w:>7.1f}%" for w in r.weights.mean(0).tolist()))
    return "\n".join(lines)
