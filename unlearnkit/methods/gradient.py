"""Gradient ascent and its cousins: four unlearning methods that only take optimizer steps.

All four run the same inner loop (:func:`_unlearn_loop`) and differ only in which data they step
on and what loss they step down:

=================================  =============================  =============================================
method (registry name)             data per step                  loss minimised
=================================  =============================  =============================================
``gradient_ascent`` (ga)           a batch of the forget set D_f  ``-CE(D_f)`` (ascent on the forget loss)
``neggrad_plus`` (neggrad+)        a batch of D_r and one of D_f  ``β·CE(D_r) - (1-β)·CE(D_f)``
``finetune`` (finetune)            a batch of the retain set D_r  ``CE(D_r)``
``random_labels`` (random_labels)  a batch of D_r ∪ D_f           ``CE`` with D_f's labels made wrong at random
=================================  =============================  =============================================

The ascent methods can stop early, as soon as forget accuracy falls to ``target_forget_acc`` (for
example the retrain oracle's), which is how the course compares methods at the same forgetting
depth. A run whose loss becomes NaN or infinite raises :class:`FloatingPointError` naming the step
size, rather than returning a broken model.

Defaults depend on the architecture (an MLP on Fashion-MNIST takes larger steps than a ResNet-18);
:func:`default_hyper` lists them and every method's docstring explains what each knob does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import ImageDataset, Split
from ..device import to_device_async
from ..evaluate import accuracy
from ..models import clone
from ..train import Recipe, autocast, batches, grad_scaler, make_optimizer, make_schedule
from .base import Stopwatch, UnlearningResult, check_call, register

#: Defaults per method and architecture (``config["arch"]`` of the model). The MLP values were
#: chosen on the quick-mode setting (embedded Fashion-MNIST, 10% random forget set) so that each
#: method lands near the retrain oracle; see lesson 03. The CNN's NegGrad+ step was measured in full
#: mode (all of Fashion-MNIST, seed 0, gap to the oracle in points): lr 0.01 -> 2.48 (retain accuracy 2.6
#: points low), 0.005 -> 1.12, 0.002 -> 0.63 but stopping short (forget accuracy 1.3 points above the
#: oracle's); 0.005 reaches the oracle's depth. The other CNN and the ResNet-18 values scale the step down
#: for deeper nets and have not been measured as carefully (no GPU has run full mode on CIFAR-10 yet).
DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "ga": {
        "mlp": {"lr": 0.01, "epochs": 1, "batch_size": 128, "momentum": 0.0, "weight_decay": 0.0},
        "cnn": {"lr": 0.005, "epochs": 2, "batch_size": 128, "momentum": 0.0, "weight_decay": 0.0},
        "resnet18": {"lr": 0.002, "epochs": 2, "batch_size": 256, "momentum": 0.0, "weight_decay": 0.0},
    },
    "neggrad+": {
        "mlp": {"lr": 0.01, "epochs": 2, "batch_size": 128, "beta": 0.8, "momentum": 0.9, "weight_decay": 5e-4},
        "cnn": {"lr": 0.005, "epochs": 2, "batch_size": 128, "beta": 0.8, "momentum": 0.9, "weight_decay": 5e-4},
        "resnet18": {"lr": 0.005, "epochs": 2, "batch_size": 256, "beta": 0.8, "momentum": 0.9,
                     "weight_decay": 5e-4},
    },
    "finetune": {
        "mlp": {"lr": 0.03, "epochs": 2, "batch_size": 128, "momentum": 0.9, "weight_decay": 5e-4},
        "cnn": {"lr": 0.01, "epochs": 3, "batch_size": 128, "momentum": 0.9, "weight_decay": 5e-4},
        "resnet18": {"lr": 0.01, "epochs": 3, "batch_size": 256, "momentum": 0.9, "weight_decay": 5e-4},
    },
    "random_labels": {
        "mlp": {"lr": 0.01, "epochs": 2, "batch_size": 128, "momentum": 0.9, "weight_decay": 5e-4},
        "cnn": {"lr": 0.01, "epochs": 2, "batch_size": 128, "momentum": 0.9, "weight_decay": 5e-4},
        "resnet18": {"lr": 0.005, "epochs": 2, "batch_size": 256, "momentum": 0.9, "weight_decay": 5e-4},
    },
}


#: The learning-rate schedules of the loop: ``"constant"`` (the default) returns the last iterate of
#: constant-step SGD, which is as noisy as the step is large; ``"cosine"`` anneals the step to zero over
#: the planned steps, so the run ends where SGD settles (lesson 03 measures the difference).
SCHEDULES = ("constant", "cosine")


def default_hyper(method: str, model: nn.Module) -> dict[str, Any]:
    """The default hyper-parameters of ``method`` (``"ga"``, ``"neggrad+"``, ``"finetune"``,
    ``"random_labels"``) for ``model``'s architecture; models without a known ``config["arch"]``
    get the MLP's values."""
    if method not in DEFAULTS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(DEFAULTS)}")
    arch = getattr(model, "config", {}).get("arch", "mlp")
    return {"schedule": "constant", **DEFAULTS[method].get(arch, DEFAULTS[method]["mlp"])}


# A step's loss: (model, data, driver batch indices, companion batch indices or None) -> scalar.
StepLoss = Callable[[nn.Module, ImageDataset, Tensor, "Tensor | None"], Tensor]


def _check_inputs(model: nn.Module, data: ImageDataset, hyper: dict[str, Any], target_forget_acc: float | None,
                  check_every: int | None) -> None:
    lr, epochs, batch_size = hyper["lr"], hyper["epochs"], hyper["batch_size"]
    if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number (the step size), got {lr!r}")
    if isinstance(epochs, bool) or not (isinstance(epochs, int) and epochs >= 1):
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if isinstance(batch_size, bool) or not (isinstance(batch_size, int) and batch_size >= 2):
        raise ValueError(f"batch_size must be an integer of at least 2, got {batch_size!r}")
    if not 0 <= hyper["momentum"] < 1:
        raise ValueError(f"momentum must be in [0, 1), got {hyper['momentum']!r}")
    if hyper["weight_decay"] < 0:
        raise ValueError(f"weight_decay must be >= 0, got {hyper['weight_decay']!r}")
    if "beta" in hyper and not 0 <= hyper["beta"] <= 1:
        raise ValueError(f"beta must be in [0, 1] (the weight of the retain loss), got {hyper['beta']!r}")
    if hyper["schedule"] not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {hyper['schedule']!r}")
    if target_forget_acc is not None and not 0 <= target_forget_acc <= 1:
        hint = f"; did you mean {target_forget_acc / 100:g}?" if 1 < target_forget_acc <= 100 else ""
        raise ValueError(f"target_forget_acc is a fraction in [0, 1], got {target_forget_acc!r}{hint}")
    if check_every is not None and not (isinstance(check_every, int) and check_every >= 1):
        raise ValueError(f"check_every must be a positive number of steps or None (once per epoch), got "
                         f"{check_every!r}")


def _endless(indices: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Batches of ``indices`` forever, reshuffled on every pass (the companion set of a paired step)."""
    while True:
        yield from batches(indices, batch_size, generator)


def _unlearn_loop(name: str, model: nn.Module, data: ImageDataset, split: Split, *, driver: Tensor,
                  companion: Tensor | None, step_loss: StepLoss, hyper: dict[str, Any], seed: int,
                  target_forget_acc: float | None, check_every: int | None) -> UnlearningResult:
    """The loop all four methods share.

    One epoch is one pass over ``driver`` in shuffled batches; when ``companion`` is given, each
    step also draws a batch of it (cycling through it as often as needed). Forget accuracy is
    measured before the first step and then every ``check_every`` steps (default: at the end of
    each epoch); the run stops as soon as it is ``<= target_forget_acc``. With a target these checks
    are part of the method, so they count in ``seconds``; without one they only record the trace, and
    their time is left out (``details["trace_seconds"]``).
    """
    _check_inputs(model, data, hyper, target_forget_acc, check_every)
    device = data.device
    model = clone(model)
    generator = torch.Generator().manual_seed(seed)
    driver = torch.as_tensor(driver).to(device)
    pairs = _endless(torch.as_tensor(companion).to(device), hyper["batch_size"], generator) \
        if companion is not None else None
    recipe = Recipe(lr=hyper["lr"], momentum=hyper["momentum"], weight_decay=hyper["weight_decay"],
                    optimizer="sgd", schedule=hyper["schedule"])
    optimizer = make_optimizer(model.parameters(), recipe, device)
    scaler = grad_scaler(device)
    planned_steps = hyper["epochs"] * sum(1 for _ in batches(driver, hyper["batch_size"], shuffle=False))
    schedule = make_schedule(optimizer, recipe, planned_steps)
    trace, trace_steps, epoch_losses = [], [], []
    steps, epochs_run, stopped, trace_seconds = 0, 0, False, 0.0

    def record() -> None:
        nonlocal trace_seconds
        with Stopwatch(device) as check:
            trace.append(accuracy(model, data, split.forget))
        trace_steps.append(steps)
        if target_forget_acc is None:
            trace_seconds += check.seconds

    def reached() -> bool:
        return target_forget_acc is not None and trace[-1] <= target_forget_acc

    def check_finite(total: Tensor) -> None:
        if not torch.isfinite(total):
            brake = (", or pass target_forget_acc so that the ascent stops before it runs away"
                     if name in ("ga", "neggrad+") else "")
            raise FloatingPointError(
                f"{name} diverged (loss {total.item()}) in epoch {epochs_run + 1} with lr={hyper['lr']:g}: the step "
                f"size is too large for this model. Lower lr (try lr={hyper['lr'] / 10:g}){brake}.")

    with Stopwatch(device) as watch:
        record()
        stopped = reached()
        while not stopped and epochs_run < hyper["epochs"]:
            model.train()
            total, seen = torch.zeros((), device=device), 0
            for batch in batches(driver, hyper["batch_size"], generator):
                with autocast(device):
                    loss = step_loss(model, data, batch, next(pairs) if pairs is not None else None)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                if schedule is not None:
                    schedule.step()
                steps += 1
                total += loss.detach().float() * len(batch)
                seen += len(batch)
                if check_every is not None and steps % check_every == 0:
                    check_finite(total)  # a diverged model cannot be measured meaningfully
                    record()
                    if reached():
                        stopped = True
                        break
            check_finite(total)
            epoch_losses.append(total.item() / max(seen, 1))
            epochs_run += 1
            if check_every is None:
                record()
                stopped = reached()
    model.eval()
    details = {**hyper, "seed": seed, "target_forget_acc": target_forget_acc,
               "stopped_early": stopped and steps < planned_steps,
               "epochs_run": epochs_run, "steps": steps, "trace": trace, "trace_steps": trace_steps,
               "epoch_losses": epoch_losses, "trace_seconds": trace_seconds,
               "final_lr": optimizer.param_groups[0]["lr"]}
    return UnlearningResult(model, watch.seconds - trace_seconds, name, details)


def _resolve(method: str, model: nn.Module, data: ImageDataset, split: Split, given: dict[str, Any],
             ) -> dict[str, Any]:
    """Defaults for ``model``'s architecture, overridden by the arguments the caller gave."""
    check_call(model, data, split)
    hyper = default_hyper(method, model)
    hyper.update({k: v for k, v in given.items() if v is not None})
    return hyper


@register("ga")
def gradient_ascent(model: nn.Module, data: ImageDataset, split: Split, *, lr: float | None = None,
                    epochs: int | None = None, batch_size: int | None = None, momentum: float | None = None,
                    weight_decay: float | None = None, schedule: str | None = None, seed: int = 0,
                    target_forget_acc: float | None = None, check_every: int | None = None) -> UnlearningResult:
    """Gradient ascent (GA): climb the cross-entropy of the forget set, ``θ ← θ + lr·∇L(θ; D_f)``.

    The simplest approximate unlearning: undo training by running it backwards on D_f only. It is
    fast (it touches only the forget set) but has no brake: the loss it maximises is unbounded, so
    a step size a little too large destroys the whole model, and even a good one leaves the forget
    samples with confident *wrong* predictions, unlike the retrain oracle.

    Args:
        model: the trained model; it is not modified (the method works on a copy).
        data, split: the dataset and its forget / retain / test split.
        lr: step size (default per architecture, see :data:`DEFAULTS`; 0.01 for the MLP). The
            result is very sensitive to it: lesson 03 sweeps it.
        epochs: passes over the forget set (the most it runs; see ``target_forget_acc``).
        batch_size: forget samples per step.
        momentum, weight_decay: of the SGD optimizer (default 0 and 0: the plain update rule).
        schedule: ``"constant"`` (default) keeps the step size fixed, as the published baselines
            do; ``"cosine"`` anneals it to zero over ``epochs`` (see :data:`SCHEDULES`).
        seed: makes the batch order reproducible.
        target_forget_acc: stop as soon as forget accuracy (a fraction) is at or below this, e.g.
            the oracle's; ``None`` runs all epochs.
        check_every: measure forget accuracy every this many steps; ``None``: once per epoch.

    Returns:
        An :class:`UnlearningResult` whose ``details`` hold the hyper-parameters, ``epochs_run``
        (epochs begun; the last one may be partial when the run stopped early), ``steps``,
        ``stopped_early``, ``trace`` (forget accuracy before the first step and at each check),
        ``trace_steps`` (the step of each trace point), ``epoch_losses`` and ``final_lr`` (the step
        size the schedule had reached when the run ended: zero after a whole cosine run).

    Raises:
        FloatingPointError: if the loss becomes NaN or infinite (the message names the step size).
        ValueError, TypeError: for bad input.
    """
    hyper = _resolve("ga", model, data, split, dict(lr=lr, epochs=epochs, batch_size=batch_size,
                                                    momentum=momentum, weight_decay=weight_decay,
                                                    schedule=schedule))

    def step_loss(net: nn.Module, d: ImageDataset, forget: Tensor, _: Tensor | None) -> Tensor:
        return -F.cross_entropy(net(d.images[forget]), d.labels[forget])

    return _unlearn_loop("ga", model, data, split, driver=split.forget, companion=None, step_loss=step_loss,
                         hyper=hyper, seed=seed, target_forget_acc=target_forget_acc, check_every=check_every)


@register("neggrad+")
def neggrad_plus(model: nn.Module, data: ImageDataset, split: Split, *, beta: float | None = None,
                 lr: float | None = None, epochs: int | None = None, batch_size: int | None = None,
                 momentum: float | None = None, weight_decay: float | None = None, schedule: str | None = None,
                 seed: int = 0, target_forget_acc: float | None = None,
                 check_every: int | None = None) -> UnlearningResult:
    """NegGrad+ (Kurmanji et al. 2023): descend on the retain loss while ascending on the forget loss,
    minimising ``β·CE(D_r) - (1-β)·CE(D_f)``.

    The retain term is the brake plain gradient ascent lacks: it keeps the model accurate on what
    it should remember while the forget term pushes the forget samples away.

    Args:
        beta: weight of the retain loss in [0, 1] (default 0.8); ``1 - beta`` weighs the forget
            loss. ``beta=0`` is gradient ascent, ``beta=1`` is fine-tuning.
        lr: step size (default per architecture, see :data:`DEFAULTS`).
        epochs: passes over the retain set; every step pairs a retain batch with a forget batch
            (the smaller forget set is cycled).
        batch_size: samples per step from each of the two sets.
        momentum, weight_decay: of the SGD optimizer (default 0.9 and 5e-4).
        schedule, seed, target_forget_acc, check_every: as in :func:`gradient_ascent`.

    Returns and raises as :func:`gradient_ascent`.
    """
    hyper = _resolve("neggrad+", model, data, split, dict(beta=beta, lr=lr, epochs=epochs, batch_size=batch_size,
                                                          momentum=momentum, weight_decay=weight_decay,
                                                          schedule=schedule))
    b = hyper["beta"]

    def step_loss(net: nn.Module, d: ImageDataset, retain: Tensor, forget: Tensor | None) -> Tensor:
        return (b * F.cross_entropy(net(d.images[retain]), d.labels[retain])
                - (1 - b) * F.cross_entropy(net(d.images[forget]), d.labels[forget]))

    return _unlearn_loop("neggrad+", model, data, split, driver=split.retain, companion=split.forget,
                         step_loss=step_loss, hyper=hyper, seed=seed, target_forget_acc=target_forget_acc,
                         check_every=check_every)


@register("finetune")
def finetune(model: nn.Module, data: ImageDataset, split: Split, *, lr: float | None = None,
             epochs: int | None = None, batch_size: int | None = None, momentum: float | None = None,
             weight_decay: float | None = None, schedule: str | None = None, seed: int = 0,
             target_forget_acc: float | None = None, check_every: int | None = None) -> UnlearningResult:
    """Fine-tuning (FT): keep training on the retain set only, for a few epochs.

    It relies on *catastrophic forgetting*: with the forget set gone from the data, the model
    slowly drifts away from it. It never hurts utility much, but it forgets slowly: after a few
    epochs the forget samples are often still fitted better than the oracle fits them.

    Args:
        lr: step size (default per architecture, see :data:`DEFAULTS`); larger forgets more.
        epochs: passes over the retain set (default per architecture: 2 for the MLP, 3 for the CNNs).
        batch_size: retain samples per step.
        momentum, weight_decay: of the SGD optimizer (default 0.9 and 5e-4).
        schedule, seed, target_forget_acc, check_every: as in :func:`gradient_ascent` (the target
            is rarely reached by fine-tuning, which does not push forget accuracy below test
            accuracy). With the constant default the result is the last iterate of SGD at a fixed
            step, which can land several points from where the run was heading (lesson 03, full
            mode, seed 2); ``schedule="cosine"`` lets it settle.

    Returns and raises as :func:`gradient_ascent`.
    """
    hyper = _resolve("finetune", model, data, split, dict(lr=lr, epochs=epochs, batch_size=batch_size,
                                                          momentum=momentum, weight_decay=weight_decay,
                                                          schedule=schedule))

    def step_loss(net: nn.Module, d: ImageDataset, retain: Tensor, _: Tensor | None) -> Tensor:
        return F.cross_entropy(net(d.images[retain]), d.labels[retain])

    return _unlearn_loop("finetune", model, data, split, driver=split.retain, companion=None, step_loss=step_loss,
                         hyper=hyper, seed=seed, target_forget_acc=target_forget_acc, check_every=check_every)


def wrong_labels(labels: Tensor, num_classes: int, generator: torch.Generator) -> Tensor:
    """A uniformly random label different from each of ``labels`` (``(y + k) mod C``, k in 1..C-1)."""
    if num_classes < 2:
        raise ValueError("random wrong labels need at least two classes")
    shift = to_device_async(torch.randint(1, num_classes, labels.shape, generator=generator), labels.device)
    return (labels + shift) % num_classes


@register("random_labels")
def random_labels(model: nn.Module, data: ImageDataset, split: Split, *, lr: float | None = None,
                  epochs: int | None = None, batch_size: int | None = None, momentum: float | None = None,
                  weight_decay: float | None = None, schedule: str | None = None, seed: int = 0,
                  target_forget_acc: float | None = None, check_every: int | None = None) -> UnlearningResult:
    """Random labels (RL): keep training on the whole training set, with every forget sample's label
    replaced by a random *wrong* one: the mean of ``CE(x, y)`` over D_r and ``CE(x, ỹ)`` over D_f.

    Instead of pushing the forget loss up without bound (GA), it pulls the forget samples towards
    a definite wrong answer, while the retain samples in the same batches keep the rest of the model
    in place. The wrong labels are drawn once per call (from ``seed``), so D_f becomes a fixed
    relabelled set, as in the SalUn paper's baseline. Its results vary a lot with the seed (lesson 03).

    Args:
        lr: step size (default per architecture, see :data:`DEFAULTS`).
        epochs: passes over the training set D_r ∪ D_f, in shuffled batches.
        batch_size: samples per step.
        momentum, weight_decay: of the SGD optimizer (default 0.9 and 5e-4).
        schedule, seed, target_forget_acc, check_every: as in :func:`gradient_ascent`.

    Returns and raises as :func:`gradient_ascent`.
    """
    hyper = _resolve("random_labels", model, data, split, dict(lr=lr, epochs=epochs, batch_size=batch_size,
                                                               momentum=momentum, weight_decay=weight_decay,
                                                               schedule=schedule))
    # A lookup table over global indices, so a batch of forget indices finds its wrong labels.
    fake = data.labels.clone()
    forget = split.forget.to(data.device)
    # its own generator (seed + 1), so the relabelling does not share a random stream with the batch order
    fake[forget] = wrong_labels(data.labels[forget], data.num_classes, torch.Generator().manual_seed(seed + 1))

    def step_loss(net: nn.Module, d: ImageDataset, batch: Tensor, _: Tensor | None) -> Tensor:
        return F.cross_entropy(net(d.images[batch]), fake[batch])

    return _unlearn_loop("random_labels", model, data, split, driver=split.train, companion=None,
                         step_loss=step_loss, hyper=hyper, seed=seed, target_forget_acc=target_forget_acc,
                         check_every=check_every)
