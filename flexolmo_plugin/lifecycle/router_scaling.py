"""Per-expert logit scales, chosen by the coordinator on public + proxy text (``flexolmo scale-router``).

Why: each owner calibrates its row alone, as a log-odds of "my text rather than public text" at one
fixed scale.  Put side by side in the merged model, those log-odds are comparable in direction but
not in how much routing each expert deserves: measured at demo scale (docs/composition.md), one
seed's C++ expert was harmful outside C++ yet kept 4-14% of the gate weight on every domain, while
the Python and licence experts were routed too timidly to pay off.  The owners cannot see that (each
sees only its own expert); the coordinator can, on the router-tuning mix of public text and the
owners' proxy selections -- never owner text.

So the coordinator chooses one scale ``alpha_e`` per owner expert and sets every layer's row to
``r_pub + alpha_e * (r_e - r_pub)``: expert e's logit relative to the public expert is multiplied by
``alpha_e``, sharper routing where ``alpha_e > 1``, milder where it is below.  Three numbers for the
whole model, not a row per layer, so a few hundred windows cannot overfit them the way LM router
tuning did at demo scale.  They are chosen by coordinate search over a grid on the language-model loss
of one half of the windows (alternate windows), and **kept only if the other half's loss improves**;
otherwise the model is left bit-identical.  r_pub, the experts and every other weight are untouched,
and no bias is added, so a model whose Hugging Face export was exact stays exact.

Measured (docs/composition.md, 2026-12-02): a mixed result, so the demo leaves it off by default.  On
one seed it turned a final model worse than the public model into a better one (6.284 -> 6.204, public
6.232), but on another it lowered the held-out mix loss while raising the loss on the owner domains:
the cpp owner's proxies (numpy's C sources, a quarter of the mix) do not stand in for its C++ text.
Scales of 6-9 on top of the owners' calibration make routing nearly hard, and the router's fp32
rounding then moves the logits visibly (one run: 7.4e-3 vs transformers' own 2.7e-3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from flexolmo_plugin.errors import ConfigError
from flexolmo_plugin.lifecycle.evaluation import non_finite_cause
from flexolmo_plugin.lifecycle.router_calibration import MAX_SCALE
from flexolmo_plugin.model.build import logits, next_token_loss, unwrap

DEFAULT_GRID = (1.0, 2.0, 3.0, 4.0, 6.0, 9.0)


@dataclass(frozen=True)
class ScalingReport:
    experts: tuple[str, ...]  # the owner experts (the public expert is the reference, never scaled)
    scales: tuple[float, ...]  # the chosen alpha per owner expert (all 1.0 when not applied)
    searched: tuple[float, ...]  # the best alphas the search found, applied or not
    search_loss: tuple[float, float]  # LM loss on the search half: all alphas 1, best found
    held_out_loss: tuple[float, float]  # LM loss on the held-out half: all alphas 1, best found
    tokens: int
    applied: bool

    def summary(self) -> str:
        found = ", ".join(f"{name} {alpha:g}" for name, alpha in zip(self.experts, self.searched, strict=True))
        verdict = ("applied" if self.applied else "not applied (held-out loss did not improve; model unchanged)")
        return (f"logit scales {found} on {self.tokens} tokens: search loss {self.search_loss[0]:.4f} -> "
                f"{self.search_loss[1]:.4f}, held-out {self.held_out_loss[0]:.4f} -> {self.held_out_loss[1]:.4f}; "
                f"{verdict}")


def _check(model: nn.Module, windows: torch.Tensor, grid: Sequence[float], sweeps: int) -> tuple[str, ...]:
    config = unwrap(model).flexolmo_config
    if config.num_experts < 2:
        raise ConfigError(f"nothing to scale: the model has {config.num_experts} expert(s)")
    if windows.dim() != 2 or windows.shape[0] < 2 or windows.dtype not in (torch.int64, torch.int32):
        raise ConfigError(f"windows must be an [n >= 2, seq] integer tensor (half to search, half to check), got "
                          f"{tuple(windows.shape)} {windows.dtype}")
    if windows.shape[1] < 2:
        raise ConfigError(f"windows of {windows.shape[1]} token predict nothing: the loss needs seq >= 2")
    if not grid or any(isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a < 0
                       for a in grid):
        raise ConfigError(f"the scale grid must be non-empty finite numbers >= 0, got {list(grid)}")
    if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 1:
        raise ConfigError(f"sweeps must be an integer >= 1, got {sweeps!r}")
    names = config.expert_names or tuple(f"expert{e}" for e in range(config.num_experts))
    return tuple(names[1:])


def _mean_loss(model: nn.Module, windows: torch.Tensor, batch_size: int, alphas: Sequence[float] = ()) -> float:
    total = 0.0
    for batch in windows.split(batch_size):
        total += next_token_loss(logits(model, batch), batch).item() * len(batch)
    loss = total / len(windows)
    if not math.isfinite(loss):
        if any(a != 1.0 for a in alphas):  # the model itself passed at scale 1: the scales made it overflow
            raise ConfigError(f"the model's loss on the scaling windows is not finite ({loss}) at scales "
                              f"{', '.join(f'{a:g}' for a in alphas)}: the scaled router rows or logits overflow; "
                              f"use a grid of smaller scales (at most {MAX_SCALE:g})")
        raise ConfigError(f"the model's loss on the scaling windows is not finite ({loss}); {non_finite_cause(model)}")
    return loss


def scale_router(model: nn.Module, windows: torch.Tensor, *, grid: Sequence[float] = DEFAULT_GRID, sweeps: int = 2,
                 batch_size: int = 16) -> ScalingReport:
    """Choose and (if the held-out half improves) apply one logit scale per owner expert, in place.

    ``windows`` (``[n, seq]`` public + proxy text) are split alternately into a search half (even
    indices) and a held-out half (odd).  Coordinate search: ``sweeps`` passes over the owner experts,
    each trying every ``alpha`` in ``grid`` for one expert with the others fixed (start: all 1).

    Raises:
        ConfigError: fewer than two experts, fewer than two windows, a bad grid or sweep count, or a
            non-finite loss (the model is then left as it was).
    """
    experts = _check(model, windows, grid, sweeps)
    layers = unwrap(model).decoder.layers
    # every layer's rows, as found: r_pub and the offsets d_e = r_e - r_pub (fp32)
    originals = [[row.detach().clone() for row in layer.mlp.router.domain_embeddings] for layer in layers]

    def set_scales(alphas: Sequence[float]) -> None:
        with torch.no_grad():
            for rows, saved in zip((layer.mlp.router.domain_embeddings for layer in layers), originals, strict=True):
                for e, alpha in enumerate(alphas, start=1):
                    rows[e].copy_((saved[0].float() + alpha * (saved[e].float() - saved[0].float())).to(rows[e].dtype))

    def restore() -> None:
        with torch.no_grad():
            for layer, saved in zip(layers, originals, strict=True):
                for row, value in zip(layer.mlp.router.domain_embeddings, saved, strict=True):
                    row.copy_(value)

    search, held_out = windows[0::2], windows[1::2]
    was_training = model.training
    model.eval()
    try:
        restore()  # bit-identical start (r_pub + 1 * d_e may differ from r_e in the last bit)
        base_search, base_held_out = _mean_loss(model, search, batch_size), _mean_loss(model, held_out, batch_size)
        alphas, best = [1.0] * len(experts), base_search
        for _ in range(sweeps):
            for e in range(len(experts)):
                for alpha in grid:
                    if alpha == alphas[e]:
                        continue
                    trial = [*alphas[:e], float(alpha), *alphas[e + 1:]]
                    set_scales(trial)
                    loss = _mean_loss(model, search, batch_size, trial)
                    if loss < best:
                        alphas, best = trial, loss
        if alphas == [1.0] * len(experts):
            restore()
            found_held_out = base_held_out
        else:
            set_scales(alphas)
            found_held_out = _mean_loss(model, held_out, batch_size, alphas)
        applied = found_held_out < base_held_out
        if not applied:
            restore()
    except BaseException:
        restore()
        raise
    finally:
        model.train(was_training)
    return ScalingReport(experts=experts, scales=tuple(alphas) if applied else (1.0,) * len(experts),
                         searched=tuple(alphas), search_loss=(base_search, best),
                         held_out_loss=(base_held_out, found_held_out), tokens=int(windows.numel()), applied=applied)
