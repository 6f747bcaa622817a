"""Router calibration, owner side: the owner's domain embedding as a discriminant of its own text.

Why: the paper seeds an owner's router row r_i with the mean hidden state of its documents and trains
it only against the public row r_pub on the owner's data.  Measured at demo scale
(docs/composition.md), such rows are nearly blind to the domain once merged: a mean hidden state is
dominated by the component every text shares, so ``h·(r_i - r_j)`` is mostly a constant offset and the
expert with the largest offset takes the same share of every domain ("largest norm wins"); rescaling
or centring the rows does not change that.  A linear router *can* tell the domains apart, though: a
logistic regression on the same router inputs, own text against public text, gives each owner's
expert the largest share on its own domain once the owners' rows are put side by side.

So each owner, on its own machine and with only its own text and public text, fits per layer a
scikit-learn logistic regression (no intercept, balanced classes) separating the router inputs of
its documents from those of public documents, and sets its row to ``r_pub + scale * w``.  Then
``logit_own - logit_pub = scale * w·h``: a log-odds of "owner's domain rather than public text"
against the same public reference for every owner, which is what makes rows trained apart
comparable in the merged softmax.  Layers are fitted in order, each on the inputs the calibrated
earlier layers produce.  r_pub and every other parameter stay bit-identical (the anchor), and the
owner's learned bias is set to 0: the regression has no intercept, and a zero bias keeps the Hugging
Face export exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from flexolmo_plugin.errors import ConfigError
from flexolmo_plugin.lifecycle.evaluation import non_finite_cause
from flexolmo_plugin.model.build import logits, unwrap

# The largest router logit scale accepted (calibrate_router's ``scale``, scale_router's grid): far past
# hard routing already; beyond it the router logits overflow fp32 and every later activation is NaN.
MAX_SCALE = 1e3


@dataclass(frozen=True)
class LayerCalibration:
    layer: int
    accuracy: float  # on the fitted tokens, classes weighted equally
    row_change: float  # ||r_own(new) - r_own(old)||
    offset_norm: float  # ||scale * w||


@dataclass(frozen=True)
class CalibrationReport:
    expert: str
    own_tokens: int
    public_tokens: int
    scale: float
    layers: list[LayerCalibration]

    def summary(self) -> str:
        accuracy = ", ".join(f"{100 * layer.accuracy:.0f}%" for layer in self.layers)
        return (f"expert {self.expert!r}: rows fitted on {self.own_tokens} own / {self.public_tokens} public tokens, "
                f"scale {self.scale:g}; per-layer accuracy (own vs public, balanced) {accuracy}")


def _check(model: nn.Module, own: torch.Tensor, public: torch.Tensor, scale: float, regularization: float,
           public_weight: float) -> str:
    config = unwrap(model).flexolmo_config
    names = config.expert_names or ()
    if config.num_experts != 2 or len(names) != 2:
        raise ConfigError(f"router calibration is for an owner's [public, own] model with named experts; this "
                          f"model has {config.num_experts} experts named {list(names)}")
    for what, windows in (("own", own), ("public", public)):
        if windows.dim() != 2 or windows.numel() == 0 or windows.dtype not in (torch.int64, torch.int32):
            raise ConfigError(f"{what} windows must be a non-empty [n, seq] integer tensor, got "
                              f"{tuple(windows.shape)} {windows.dtype}")
    for what, value in (("scale", scale), ("regularization", regularization), ("public_weight", public_weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{what} must be a finite number > 0, got {value!r}")
    if scale > MAX_SCALE:
        raise ConfigError(f"scale must be at most {MAX_SCALE:g} (larger router logits overflow), got {scale!r}")
    return names[1]


def _refuse_non_finite_inputs(model: nn.Module, layer: int) -> None:
    raise ConfigError(f"layer {layer}: non-finite router inputs; {non_finite_cause(model)}")


def _router_state(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every router's parameters and a copy of their values (to undo a calibration that fails midway)."""
    return [(p, p.detach().clone()) for layer in unwrap(model).decoder.layers for p in layer.mlp.router.parameters()]


def _restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for param, value in saved:
            param.copy_(value)


def _router_inputs(model: nn.Module, layer: int, windows: torch.Tensor, batch_size: int) -> np.ndarray:
    router = unwrap(model).decoder.layers[layer].mlp.router
    seen: list[torch.Tensor] = []
    handle = router.register_forward_hook(
        lambda module, args, output: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu()))
    try:
        with torch.no_grad():
            for batch in windows.split(batch_size):
                logits(model, batch)
    finally:
        handle.remove()
    return torch.cat(seen).numpy()


def calibrate_router(model: nn.Module, own: torch.Tensor, public: torch.Tensor, *, scale: float = 2.0,
                     regularization: float = 1.0, public_weight: float = 1.0,
                     batch_size: int = 16) -> CalibrationReport:
    """Set the owner's router row of every layer to ``r_pub + scale * w`` (in place; see the module
    docstring), ``w`` from a logistic regression of the layer's router inputs on ``own`` token windows
    against ``public`` ones (``[n, seq]`` each); ``regularization`` is scikit-learn's ``C``.

    Raises:
        ConfigError: not a two-expert owner model, empty or malformed windows, scale, regularization or
            public weight not a finite positive number, or non-finite router inputs (the model is then
            left as it was).
    """
    expert = _check(model, own, public, scale, regularization, public_weight)
    was_training = model.training
    model.eval()
    layers = []
    saved = _router_state(model)
    try:
        for index, layer in enumerate(unwrap(model).decoder.layers):
            x_own, x_public = (_router_inputs(model, index, w, batch_size) for w in (own, public))
            features = np.concatenate([x_public, x_own])
            if not np.isfinite(features).all():
                _refuse_non_finite_inputs(model, index)
            labels = np.r_[np.zeros(len(x_public)), np.ones(len(x_own))]
            balanced = {0: public_weight * len(labels) / (2 * len(x_public)), 1: len(labels) / (2 * len(x_own))}
            classifier = LogisticRegression(C=regularization, fit_intercept=False, class_weight=balanced,
                                            max_iter=5000).fit(features, labels)
            weights = (classifier.predict(features) == labels) * np.where(labels == 1, 0.5 / len(x_own),
                                                                          0.5 / len(x_public))
            router = layer.mlp.router
            rows = router.domain_embeddings
            offset = scale * torch.as_tensor(classifier.coef_[0], dtype=torch.float32)
            with torch.no_grad():
                new = (rows[0].float() + offset.to(rows[0].device)).to(rows[1].dtype)
                change = (new.float() - rows[1].float()).norm().item()
                rows[1].copy_(new)
                for bias in router.domain_biases or ():
                    bias.zero_()
            layers.append(LayerCalibration(layer=index, accuracy=float(weights.sum()), row_change=change,
                                           offset_norm=offset.norm().item()))
    except BaseException:
        _restore(saved)
        raise
    finally:
        model.train(was_training)
    return CalibrationReport(expert=expert, own_tokens=own.numel(), public_tokens=public.numel(), scale=float(scale),
                             layers=layers)


@dataclass(frozen=True)
class AlignmentReport:
    tokens: int
    layers: list[float]  # per aligned layer: mean KL(layer 0's routing || the layer's), nats, after fitting

    def summary(self) -> str:
        kl = ", ".join(f"{value:.3f}" for value in self.layers)
        return (f"layers 1-{len(self.layers)} aligned to layer 0's routing on {self.tokens} tokens; mean KL per layer "
                f"after fitting (nats): {kl}")


def _routing_probs(model: nn.Module, layer: int, inputs: np.ndarray) -> np.ndarray:
    """The layer's routing probabilities (softmax over every expert) for router inputs already collected:
    a layer's router input depends only on the layers before it, so no further forward is needed."""
    router = unwrap(model).decoder.layers[layer].mlp.router
    with torch.no_grad():
        device = router.domain_embeddings[0].device
        return torch.softmax(router.gating(torch.from_numpy(inputs).to(device)).float(), dim=-1).double().cpu().numpy()


def _fit_soft_softmax(features: np.ndarray, target: np.ndarray, regularization: float) -> torch.Tensor:
    """``beta [experts, width]`` minimising ``sum_t CE(target_t, softmax(beta x_t)) + |beta|^2 / (2 C)``:
    scikit-learn's multinomial objective, but with soft targets, which scikit-learn accepts only as
    one weighted copy of every token per expert (measured: 443 s for three layers of the full demo);
    convex, so full-batch L-BFGS in float64 finds the same minimum in seconds."""
    x = torch.as_tensor(features, dtype=torch.float64)
    p = torch.as_tensor(target, dtype=torch.float64)
    beta = torch.zeros(p.shape[1], x.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([beta], lr=1.0, max_iter=500, tolerance_grad=1e-7, tolerance_change=1e-10,
                                  history_size=20, line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        loss = -(p * torch.log_softmax(x @ beta.T, dim=1)).sum() + (beta ** 2).sum() / (2 * regularization)
        loss.backward()
        return loss

    optimizer.step(objective)
    return beta.detach().float()


def align_router(model: nn.Module, windows: torch.Tensor, *, regularization: float = 1.0,
                 batch_size: int = 16) -> AlignmentReport:
    """Coordinator side, on the merged model: refit the rows of every layer after the first so that
    the layer routes as layer 0 does, on ``windows`` of public and proxy text (never owner text).

    Why: an owner fits its rows on hidden states its own ``[public, own]`` model produces.  Layer 0's
    router input depends on no expert, so its rows carry over to the merged model unchanged; every later
    layer's input holds the outputs of the experts before it, which differ once N owners' experts are
    mixed, and rows fitted on one owner's model misroute there (measured: one owner's expert took
    most of every domain from layer 1 on).  Layer 0's routing is the owners' own calibrated decision,
    so each later layer is fitted, in order, to reproduce it from its own input: a multinomial logistic
    regression (no intercept) with layer 0's probabilities as soft targets.  The public row r_pub of
    every layer is kept: the owners' rows are set to ``r_pub + (beta_e - beta_pub)``, which gives exactly
    the fitted routing.
    """
    if windows.dim() != 2 or windows.numel() == 0 or windows.dtype not in (torch.int64, torch.int32):
        raise ConfigError(f"windows must be a non-empty [n, seq] integer tensor, got {tuple(windows.shape)} "
                          f"{windows.dtype}")
    if isinstance(regularization, bool) or not math.isfinite(regularization) or regularization <= 0:
        raise ConfigError(f"regularization must be a finite number > 0, got {regularization!r}")
    layers = unwrap(model).decoder.layers
    experts = unwrap(model).flexolmo_config.num_experts
    if experts < 2 or len(layers) < 2:
        raise ConfigError(f"nothing to align: {len(layers)} layers, {experts} experts")
    was_training = model.training
    model.eval()
    report = []
    saved = _router_state(model)
    try:
        target = _routing_probs(model, 0, _router_inputs(model, 0, windows, batch_size))
        for index in range(1, len(layers)):
            features = _router_inputs(model, index, windows, batch_size)
            if not (np.isfinite(features).all() and np.isfinite(target).all()):
                _refuse_non_finite_inputs(model, index)
            beta = _fit_soft_softmax(features, target, regularization)
            rows = layers[index].mlp.router.domain_embeddings
            with torch.no_grad():
                for expert in range(1, experts):
                    rows[expert].copy_((rows[0].float() + beta[expert] - beta[0]).to(rows[expert].dtype))
                for bias in layers[index].mlp.router.domain_biases or ():
                    bias.zero_()
            fitted = _routing_probs(model, index, features)
            kl = (target * (np.log(np.clip(target, 1e-12, None)) - np.log(np.clip(fitted, 1e-12, None)))).sum(1)
            report.append(float(kl.mean()))
    except BaseException:
        _restore(saved)
        raise
    finally:
        model.train(was_training)
    return AlignmentReport(tokens=int(windows.numel()), layers=report)
