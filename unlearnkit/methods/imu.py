"""IMU, influence-guided machine unlearning (Fan et al., arXiv 2508.01620), at the classifier level.

Uniform gradient ascent pushes every forget sample's loss up equally hard. IMU first asks how
much each forget sample supports the model's fit of the forget set as a whole, and ascends the
loss of the strong supporters harder:

1. per-sample gradients ``g_i`` of the cross-entropy w.r.t. the head only (closed form, used
   through its outer-product structure so that no per-sample gradient is ever stored);
2. a damped diagonal Fisher ``F = diag(mean_i g_i²) + λ`` on the forget set as the Hessian stand-in
   (or, beyond the paper, the exact head Hessian);
3. influence ``I_i = -g_iᵀ F⁻¹ ḡ`` of each sample on the mean forget loss; samples with
   ``I_i < 0`` (their up-weighting lowers the forget loss, i.e. they support its fit) are kept;
4. weights ``w_i = √|I_i|``, clipped at their 93rd percentile, computed once;
5. a few epochs of weighted gradient ascent on the head,
   ``loss = -Σ w_i CE_i / Σ w_i + α ‖θ_head‖₁``, with SGD (momentum 0.9, weight decay 5e-4).

It reads only the forget set: the retain set is never touched for training (it may be read,
during training, to *report* accuracies when ``track=True``).

The same loop, :func:`weighted_ascent`, runs the ablations that test the method's claim:
uniform weights, shuffled weights, and plain gradient ascent on all parameters without L1.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import ImageDataset, Split
from ..evaluate import accuracy
from ..head import head_hessian, head_inputs
from ..models import clone, head_of
from ..train import batches
from .base import Stopwatch, UnlearningResult, check_call, register

WEIGHTINGS = ("influence", "uniform", "shuffled")
PARAMETER_SETS = ("head", "all")
CURVATURES = ("fisher", "exact")


def influence_scores(features: Tensor, logits: Tensor, labels: Tensor, *, damping: float = 0.01,
                     curvature: str = "fisher") -> Tensor:
    """IMU's influence ``I_i = -g_iᵀ H⁻¹ ḡ`` of each forget sample on the mean forget loss.

    Args:
        features: ``[n, d]`` head inputs of the forget samples.
        logits: ``[n, C]`` the head's outputs on them.
        labels: ``[n]`` their labels.
        damping: ``λ`` added to the curvature's diagonal (keeps it invertible).
        curvature: ``"fisher"`` (the paper: damped diagonal empirical Fisher,
            ``diag(mean_i g_i²) + λ``) or ``"exact"`` (the exact Hessian of the mean
            cross-entropy w.r.t. the head, plus ``λI``; one ``P×P`` solve, ``P = C(d+1)``).

    Returns:
        ``[n]`` float64 scores. Negative: up-weighting the sample would *lower* the forget loss, so
        it supports the model's fit of the forget set (these are the ones IMU ascends).
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature={curvature!r}: use one of {CURVATURES}")
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    if not (len(features) == len(logits) == len(labels)) or len(labels) == 0:
        raise ValueError(f"need the same non-zero number of features, logits and labels; got {len(features)}, "
                         f"{len(logits)}, {len(labels)}")
    # float64: the scores are small differences of large inner products.
    # Each g_i = r_i ⊗ h̃_i (r_i = p_i - e_{y_i}, h̃_i = [h_i; 1]), so the mean gradient, the Fisher
    # diagonal and every g_iᵀ v are small matrix products of r and h̃; the [n, C(d+1)] matrix of
    # per-sample gradients (unlearnkit.head.per_sample_head_grads) is never materialised.
    n, d = features.shape
    residual = logits.double().softmax(1)
    residual[torch.arange(n, device=labels.device), labels] -= 1
    inputs = torch.cat([features.double(), torch.ones(n, 1, dtype=torch.float64, device=features.device)], 1)
    mean_grad = residual.T @ inputs / n                                        # [C, d+1]
    if curvature == "fisher":
        solved = mean_grad / (residual.square().T @ inputs.square() / n + damping)
    else:
        c = logits.shape[1]
        flat = torch.cat([mean_grad[:, :d].flatten(), mean_grad[:, d]])         # [W.flatten(), b] order
        x = torch.linalg.solve(head_hessian(features.double(), logits.double(), damping=damping), flat)
        solved = torch.cat([x[: c * d].view(c, d), x[c * d:].view(c, 1)], 1)
    return -((inputs @ solved.T) * residual).sum(1)


def imu_weights(scores: Tensor, *, top_fraction: float = 1.0, clip_percentile: float = 93.0,
                ) -> tuple[Tensor, Tensor]:
    """IMU's selection and weights from influence scores.

    Keeps the samples with negative influence, then (when ``top_fraction < 1``) only the top
    ``top_fraction`` of those by ``|I|``; weights ``√|I|`` clipped from above at their
    ``clip_percentile``-th percentile (over the kept samples). Unkept samples get weight 0.

    Returns:
        ``(kept, weights)``: a bool mask and float weights, both ``[n]``.
    """
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    if not 0 < clip_percentile <= 100:
        raise ValueError(f"clip_percentile must be in (0, 100], got {clip_percentile}")
    kept = scores < 0
    if top_fraction < 1 and kept.any():
        k = max(1, math.ceil(top_fraction * int(kept.sum())))
        magnitude = torch.where(kept, scores.abs(), torch.full_like(scores, -1.0))
        top = magnitude.topk(k).indices
        kept = torch.zeros_like(kept)
        kept[top] = True
    weights = torch.zeros_like(scores, dtype=torch.float32)
    if kept.any():
        raw = scores[kept].abs().sqrt()
        ceiling = torch.quantile(raw, clip_percentile / 100)
        weights[kept] = raw.clamp(max=ceiling).float()
    return kept, weights


class _Monitor:
    """Forget / retain / test accuracy of the model being unlearned, for the record only.

    With the head alone trained, the backbone's features never change, so they are computed once
    and each evaluation is a single matrix product; otherwise the whole model runs.
    """

    def __init__(self, model: nn.Module, data: ImageDataset, split: Split, head_only: bool):
        self.model, self.data, self.head_only = model, data, head_only
        self.sets = {name: torch.as_tensor(getattr(split, name)).to(data.device)
                     for name in ("forget", "retain", "test")}
        if head_only:
            self.features = {name: head_inputs(model, data, idx) for name, idx in self.sets.items()}

    @torch.no_grad()
    def __call__(self, step: int, steps_per_epoch: int) -> dict[str, float]:
        record = {"step": step, "epoch": step / steps_per_epoch}
        for name, idx in self.sets.items():
            if self.head_only:
                predicted = self.model.head(self.features[name]).argmax(1)
                record[f"{name} acc"] = 100 * (predicted == self.data.labels[idx]).float().mean().item()
            else:
                record[f"{name} acc"] = 100 * accuracy(self.model, self.data, idx)
        return record


def weighted_ascent(model: nn.Module, data: ImageDataset, indices: Tensor, weights: Tensor, *,
                    params: str = "head", alpha: float = 0.2, lr: float = 0.01, epochs: int = 10,
                    batch_size: int = 256, momentum: float = 0.9, weight_decay: float = 5e-4, seed: int = 0,
                    monitor: Split | None = None, eval_every: int | None = None,
                    stop_at: float | None = None, features: Tensor | None = None,
                    ) -> tuple[list[dict[str, float]], float]:
    """Weighted gradient ascent on ``data[indices]``, in place on ``model``.

    Each batch minimises ``-Σ w_i CE_i / Σ w_i + alpha * Σ|θ|`` over the chosen parameters with
    SGD (plain momentum, as the IMU authors use, not Nesterov). Samples with weight 0 are never
    visited. Only ``data[indices]`` is read for training.

    Args:
        indices: the forget indices (global).
        weights: ``[len(indices)]`` non-negative per-sample weights.
        params: ``"head"`` (backbone frozen; its features are computed once in eval mode) or
            ``"all"`` (every parameter, the model in train mode; plain GA when ``alpha=0`` and
            the weights are uniform).
        alpha: L1 coefficient on the trained parameters.
        monitor: a split whose forget / retain / test accuracies (in %) are recorded before
            training and then every ``eval_every`` steps (default: once per epoch). Evaluation
            only, and not timed.
        stop_at: stop as soon as a recorded forget accuracy is at or below this (in %; a value between
            0 and 1 is refused, as it is likely a fraction); needs ``monitor``. The stopping rule for
            comparing methods at the same forgetting depth.
        features: the head's inputs for ``data[indices]`` when the caller has them already
            (``params="head"`` only); computed here otherwise.

    Returns:
        ``(history, seconds)``: one dict per evaluation (``step``, ``epoch``, ``forget acc``,
        ``retain acc``, ``test acc``; empty without ``monitor``) and the training seconds.
    """
    if params not in PARAMETER_SETS:
        raise ValueError(f"params={params!r}: use 'head' (classifier only, the paper) or 'all'")
    rules = (("epochs", epochs, ">= 1", epochs >= 1), ("batch_size", batch_size, ">= 2", batch_size >= 2),
             ("lr", lr, "> 0", lr > 0), ("alpha", alpha, ">= 0", alpha >= 0))
    broken = [f"{name}={value} (it must be {rule})" for name, value, rule, ok in rules if not ok]
    if broken:
        raise ValueError("; ".join(broken))
    if stop_at is not None and monitor is None:
        raise ValueError("stop_at needs a monitor split: the forget accuracy is what it watches")
    if stop_at is not None and not 0 <= stop_at <= 100:
        raise ValueError(f"stop_at is a forget accuracy in % (0 to 100), got {stop_at!r}")
    if stop_at is not None and 0 < stop_at < 1:
        raise ValueError(f"stop_at is a forget accuracy in %, not a fraction: {stop_at} would stop at {stop_at}%; "
                         f"for {100 * stop_at:g}% give stop_at={100 * stop_at:g} (values between 0 and 1 are refused "
                         "as ambiguous; 0 runs to a forget accuracy of zero)")
    if eval_every is not None and monitor is None:
        raise ValueError("eval_every sets how often the monitor split is evaluated: give a monitor with it")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be a positive number of steps, got {eval_every}")
    if features is not None and params != "head":
        raise ValueError("features are the head's inputs, used with params='head' only; with params='all' the "
                         "whole model runs forward, so leave features=None")
    indices = torch.as_tensor(indices).to(data.device)
    weights = torch.as_tensor(weights, dtype=torch.float32).to(data.device)
    if weights.shape != indices.shape:
        raise ValueError(f"weights has shape {tuple(weights.shape)}; it needs one weight per index "
                         f"({tuple(indices.shape)})")
    if (weights < 0).any() or not torch.isfinite(weights).all():
        raise ValueError("weights must be finite and >= 0 (0 skips a sample)")
    used = weights > 0
    if not used.any():
        raise ValueError("every weight is 0: there is nothing to ascend on")
    weights, indices = weights[used], indices[used]
    labels = data.labels[indices]

    head = head_of(model)
    trained = list(head.parameters()) if params == "head" else list(model.parameters())
    was_trainable = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(params == "all")
    for p in trained:
        p.requires_grad_(True)
    seconds = 0.0
    if params == "head":
        if features is None:
            with Stopwatch(data.device) as timer:
                features = head_inputs(model, data, indices)
            seconds += timer.seconds
        elif len(features) != len(used):
            raise ValueError(f"features has {len(features)} rows for {len(used)} indices; give one row per index")
        else:
            features = features[used]
    optimizer = torch.optim.SGD(trained, lr=lr, momentum=momentum, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    positions = torch.arange(len(indices), device=data.device)
    steps_per_epoch = sum(1 for _ in batches(positions, batch_size, shuffle=False))
    eval_every = eval_every or steps_per_epoch
    watch = _Monitor(model, data, monitor, params == "head") if monitor is not None else None
    history = [watch(0, steps_per_epoch)] if watch is not None else []
    step = 0
    done = stop_at is not None and history[0]["forget acc"] <= stop_at
    monitor_seconds = 0.0  # evaluation only: taken out of the time, which syncs the device only here
    with Stopwatch(data.device) as loop:
        for _ in range(epochs):
            if done:
                break
            for batch in batches(positions, batch_size, generator):
                model.train(params == "all")
                logits = head(features[batch]) if params == "head" else model(data.images[indices[batch]])
                w = weights[batch]
                loss = -(w * F.cross_entropy(logits, labels[batch], reduction="none")).sum() / w.sum()
                if alpha > 0:
                    loss = loss + alpha * sum(p.abs().sum() for p in trained)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                model.eval()
                step += 1
                if watch is not None and step % eval_every == 0:
                    with Stopwatch(data.device) as evaluation:
                        history.append(watch(step, steps_per_epoch))
                    monitor_seconds += evaluation.seconds
                    if stop_at is not None and history[-1]["forget acc"] <= stop_at:
                        done = True
                        break
    for p, trainable in zip(model.parameters(), was_trainable):
        p.requires_grad_(trainable)
    return history, seconds + loop.seconds - monitor_seconds


@register("imu")
def imu(model: nn.Module, data: ImageDataset, split: Split, *, weighting: str | Tensor = "influence",
        curvature: str = "fisher", damping: float = 0.01, top_fraction: float = 1.0,
        clip_percentile: float = 93.0, params: str = "head", alpha: float = 0.2, lr: float = 0.01,
        epochs: int = 10, batch_size: int = 256, momentum: float = 0.9, weight_decay: float = 5e-4,
        seed: int = 0, track: bool = True, eval_every: int | None = None,
        stop_at: float | None = None) -> UnlearningResult:
    """IMU: influence-weighted gradient ascent on the forget set, classifier head only.

    The defaults are the authors' recipe: damped (λ = 0.01) diagonal-Fisher influence, keep
    ``I < 0``, weights ``√|I|`` clipped at the 93rd percentile, ``α = 0.2`` L1 on the head, SGD
    lr 0.01 with momentum 0.9 and weight decay 5e-4, batch 256, 10 epochs, no early stop.

    Args:
        weighting: ``"influence"`` (IMU), ``"uniform"`` (every forget sample weight 1: uniform
            GA), ``"shuffled"`` (IMU's weights, zeros included, randomly permuted among the
            forget samples: same distribution, no ranking), or a ``[len(split.forget)]`` tensor of
            your own weights (in the order of ``split.forget``).
        curvature: ``"fisher"`` (the paper) or ``"exact"`` (the exact head Hessian; beyond the paper).
        damping: λ of the curvature.
        top_fraction: keep only this fraction of the negative-influence samples, largest ``|I|``
            first (the public code's default is 0.1; 1.0 keeps all of them).
        clip_percentile: weights are clipped from above at this percentile.
        params: ``"head"`` (the paper) or ``"all"`` (every parameter; with ``weighting="uniform"``
            and ``alpha=0`` this is plain gradient ascent).
        alpha: L1 coefficient on the trained parameters.
        lr, epochs, batch_size, momentum, weight_decay: the SGD loop.
        seed: batch order (and the permutation of ``"shuffled"``).
        track: record forget / retain / test accuracy (in %) before training and then every
            ``eval_every`` steps (default: each epoch) in ``details["history"]``. Evaluation only:
            training never reads the retain set.
        stop_at: stop as soon as the recorded forget accuracy is at or below this (in %, so 0 or 1 to
            100; a value between 0 and 1 is refused, as it is likely a fraction), e.g. the oracle's; needs
            ``track``. Not the paper's recipe (it runs all epochs), but the rule
            that compares methods at the same forgetting depth.

    Returns:
        An :class:`UnlearningResult` whose ``details`` hold ``scores`` (influence, ``[n_forget]``,
        in the order of ``split.forget``), ``kept`` (bool mask: the influence selection, computed
        whatever the weighting), ``weights`` (the weights used, which with ``"uniform"`` or a tensor
        need not follow ``kept``),
        ``history`` and the hyper-parameters. ``seconds`` covers the scores (when the weighting uses
        them), the forward pass to the head's inputs (when the scores or a head-only ascent use it) and
        the training, not the tracking.
    """
    check_call(model, data, split)
    if stop_at is not None and not track:
        raise ValueError("stop_at watches the recorded forget accuracy: use it with track=True")
    if eval_every is not None and not track:
        raise ValueError("eval_every sets how often the accuracies are recorded: use it with track=True")
    if isinstance(weighting, str) and weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}: use one of {WEIGHTINGS} or a tensor of per-sample weights")
    forget = split.forget.to(data.device)
    unlearned = clone(model)
    head = head_of(unlearned)
    with Stopwatch(data.device) as forward:
        features = head_inputs(unlearned, data, forget)
    with Stopwatch(data.device) as watch:
        with torch.no_grad():
            logits = head(features)
        scores = influence_scores(features, logits, data.labels[forget], damping=damping, curvature=curvature)
        kept, weights = imu_weights(scores, top_fraction=top_fraction, clip_percentile=clip_percentile)
    # each variant pays for what it uses: the scores when its weights come from them, the forget set's head
    # inputs when it needs the scores or ascends on the head alone (plain ascent on every parameter needs neither)
    uses_scores = isinstance(weighting, str) and weighting in ("influence", "shuffled")
    scoring_seconds = watch.seconds if uses_scores else 0.0
    if uses_scores or params == "head":
        scoring_seconds += forward.seconds
    if isinstance(weighting, Tensor):
        if weighting.shape != (len(forget),):
            raise ValueError(f"a weighting tensor needs shape ({len(forget)},) (one weight per forget sample, "
                             f"in the order of split.forget); got {tuple(weighting.shape)}")
        weights = weighting.detach().float().to(data.device)
    elif weighting == "uniform":
        weights = torch.ones(len(forget), device=data.device)
    elif weighting == "shuffled":
        order = torch.randperm(len(forget), generator=torch.Generator().manual_seed(seed))
        weights = weights[order.to(weights.device)]
    history, train_seconds = weighted_ascent(
        unlearned, data, forget, weights, params=params, alpha=alpha, lr=lr, epochs=epochs,
        batch_size=batch_size, momentum=momentum, weight_decay=weight_decay, seed=seed,
        monitor=split if track else None, eval_every=eval_every, stop_at=stop_at,
        features=features if params == "head" else None)
    details: dict[str, Any] = {
        "scores": scores.cpu(), "kept": kept.cpu(), "weights": weights.cpu(), "history": history,
        "weighting": weighting if isinstance(weighting, str) else "custom", "curvature": curvature,
        "damping": damping, "top_fraction": top_fraction, "clip_percentile": clip_percentile, "params": params,
        "alpha": alpha, "lr": lr, "epochs": epochs, "batch_size": batch_size, "momentum": momentum,
        "weight_decay": weight_decay, "seed": seed, "stop_at": stop_at,
        "steps": history[-1]["step"] if history else None, "samples_ascended": int((weights > 0).sum()),
    }
    return UnlearningResult(unlearned, scoring_seconds + train_seconds, "imu", details)


def at_forget_accuracy(history: list[dict[str, float]], target: float) -> dict[str, float]:
    """Retain and test accuracy at the moment forget accuracy first falls to ``target`` (in %).

    Interpolates linearly between the two evaluations around the first crossing (the stopping
    rule "stop as soon as the forget set is as forgotten as the oracle's"), so that methods are
    compared at the same forgetting depth rather than after the same number of epochs.

    Returns:
        ``{"epoch", "forget acc", "retain acc", "test acc"}`` at the crossing (fractional epoch);
        NaNs when the run never got there.
    """
    if not history:
        raise ValueError("empty history: run the method with track=True")
    previous = None
    for point in history:
        if point["forget acc"] <= target:
            if previous is None:
                return dict(point)
            span = previous["forget acc"] - point["forget acc"]
            t = (previous["forget acc"] - target) / span
            return {k: previous[k] + t * (point[k] - previous[k]) for k in point}
        previous = point
    return {k: math.nan for k in history[0]}

