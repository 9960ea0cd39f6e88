"""SISA: Sharded, Isolated, Sliced, Aggregated training (Bourtoule et al., IEEE S&P 2021).

The training set is cut into ``S`` disjoint shards and each shard into ``R`` slices. One
constituent model per shard learns its shard incrementally (slice 1, then slices 1..2, ...),
and its weights are saved *before* each slice step. Predictions aggregate the constituents
(mean probability, or majority vote).

Forgetting is exact: a constituent never saw data outside its shard, so deleting a sample only
touches the one constituent that saw it, and only from the slice the sample sat in. Restore the
checkpoint saved before that slice, drop the sample, and replay the remaining slice steps. The
result is bit-for-bit the constituent that training from scratch on the remaining data would
have produced (on the CPU, where training is deterministic).

Two ways to run the slice steps:

* sequential (the reference): one :func:`unlearnkit.train.train_model` call per constituent;
* vmapped (the GPU fast path): all constituents of a step at once with ``torch.func``
  (``stack_module_state`` + ``functional_call`` + ``vmap``) and a functional copy of the kit's
  SGD + learning-rate schedule, on exactly the same batches. It gives the same predictions as
  the sequential path up to floating-point summation order.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data import ImageDataset, Split
from ..models import Classifier, build_model, clone
from ..train import (
    Recipe,
    autocast,
    autocast_dtype,
    batches,
    load_checkpoint,
    make_optimizer,
    make_schedule,  # the kit's schedule, so the vmapped path follows it exactly
    save_checkpoint,
    train_model,
)
from .base import Stopwatch, UnlearningResult, check_call, register

Aggregation = Literal["mean", "vote"]


def slice_step_epochs(recipe: Recipe, slices: int) -> int:
    """Epochs per slice step, so that the incremental schedule costs about as much as ``recipe``.

    Step ``r`` (1-based) trains on ``r/R`` of the shard; with ``e`` epochs per step the average
    sample is visited ``e (R + 1) / 2`` times, so ``e = 2 E / (R + 1)`` (rounded, at least 1)
    matches the ``E`` epochs of ordinary training (the budget rule of the SISA paper).
    """
    return max(1, round(2 * recipe.epochs / (slices + 1)))


def constituent_seed(seed: int, shard: int, step: int | None = None) -> int:
    """The seed of constituent ``shard``'s initial weights (``step=None``) or of its batches in slice step ``step``.

    Mixed with NumPy's ``SeedSequence`` so that nearby (seed, shard, step) triples give unrelated streams.
    """
    parts = [seed, shard] if step is None else [seed, shard, step]
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] >> 1)


def layout_seed(seed: int) -> int:
    """The seed of the shard permutation, mixed so that it is unrelated to other draws seeded with ``seed``.

    (A plain ``seed`` would reproduce the permutation that :func:`unlearnkit.data.random_split` uses
    to pick the forget set, and put the whole forget set into the first shards.)
    """
    return int(np.random.SeedSequence([int(seed), 0x5157A]).generate_state(1)[0] >> 1)


def shard_layout(indices: Tensor, shards: int, slices: int, seed: int = 0) -> list[list[Tensor]]:
    """``layout[s][r]``: the indices in slice ``r`` of shard ``s``: a permutation seeded by
    ``layout_seed(seed)``, cut into ``shards`` near-equal shards, each cut into ``slices`` near-equal slices."""
    order = indices[torch.randperm(len(indices), generator=torch.Generator().manual_seed(layout_seed(seed)))]
    return [list(torch.tensor_split(shard, slices)) for shard in torch.tensor_split(order, shards)]


def _check_vmappable(model: nn.Module, recipe: Recipe) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase | nn.Dropout):
            raise TypeError(f"the vmapped SISA path cannot train {type(module).__name__} layers ({name!r}): their "
                            "running statistics / random masks are per-model state that vmap does not carry. "
                            "Use vmap=False (the sequential path), or an architecture without them (arch='mlp').")
    if recipe.optimizer != "sgd":
        raise ValueError(f"the vmapped SISA path implements the kit's SGD only, got optimizer={recipe.optimizer!r}; "
                         "use vmap=False or recipe.with_(optimizer='sgd')")
    if recipe.augment is not None:
        raise ValueError(f"the vmapped SISA path does not augment (got augment={recipe.augment!r}); "
                         "use vmap=False or recipe.with_(augment=None)")


@dataclass
class ForgetReport:
    """What one forget request did.

    Attributes:
        forgotten: the global indices removed by this request.
        shards_touched: the shards whose constituent was retrained (each once).
        restart_slice: shard -> the (0-based) slice step it was replayed from.
        samples_retrained: samples the replayed constituents trained on again (their whole
            remaining shard: steps from ``r`` on revisit slices ``1..r`` too).
        sample_passes: sample-gradient evaluations replayed (epochs x samples per replayed step):
            the compute the request cost, independent of the machine.
        full_passes: the same count for retraining a single model on all remaining data with the
            recipe (``epochs x samples``): the denominator of ``cost_fraction``.
        seconds: wall time of the request (GPU synchronised).
        reference_seconds: what the request is compared with (the ensemble's own training time
            unless a ``reference_seconds`` was given, e.g. a single model's retraining time).
    """

    forgotten: Tensor
    shards_touched: list[int]
    restart_slice: dict[int, int]
    samples_retrained: int
    sample_passes: int
    full_passes: int
    seconds: float
    reference_seconds: float

    @property
    def speedup(self) -> float:
        """``reference_seconds / seconds``."""
        return self.reference_seconds / self.seconds if self.seconds > 0 else math.inf

    @property
    def cost_fraction(self) -> float:
        """``sample_passes / full_passes``: the share of a full retrain's compute this request needed."""
        return self.sample_passes / self.full_passes

    def __repr__(self) -> str:
        return (f"ForgetReport({len(self.forgotten)} samples, shards touched {self.shards_touched}, "
                f"{self.samples_retrained} samples retrained, {self.seconds:.3f} s, "
                f"speed-up {self.speedup:.1f}x, cost fraction {self.cost_fraction:.3f})")


class SISAModel(nn.Module):
    """The ensemble as one ``nn.Module``: ``forward`` returns aggregated log-probabilities.

    ``aggregation="mean"``: log of the mean of the constituents' softmax outputs.
    ``aggregation="vote"``: log of each class's vote share, with ties broken by the mean
    probability (a term too small to overturn a whole vote). Either way, every evaluation
    function of the kit (accuracy, confidences, MIA, the comparison table) works on it.
    """

    def __init__(self, constituents: Iterable[nn.Module], aggregation: Aggregation = "mean",
                 active: Iterable[bool] | None = None):
        super().__init__()
        if aggregation not in ("mean", "vote"):
            raise ValueError(f"aggregation must be 'mean' or 'vote', got {aggregation!r}")
        self.constituents = nn.ModuleList(constituents)
        self.aggregation = aggregation
        active = [True] * len(self.constituents) if active is None else list(active)
        if not any(active):
            raise ValueError("every shard is empty: there is no constituent left to predict with")
        self.register_buffer("active", torch.tensor(active), persistent=False)
        # In the constituents' mode, not nn.Module's default (training): code that puts a model back in the mode
        # it found it in would otherwise switch their batch norm to batch statistics (see MaskedModel).
        self.training = all(m.training for m in self.constituents)

    def probabilities(self, x: Tensor) -> Tensor:
        """``[S_active, n, C]`` softmax outputs of the constituents whose shard still holds data."""
        pairs = zip(self.constituents, self.active.tolist(), strict=True)
        return torch.stack([m(x).float().softmax(1) for m, on in pairs if on])

    def forward(self, x: Tensor) -> Tensor:
        probs = self.probabilities(x)
        mean = probs.mean(0)
        if self.aggregation == "mean":
            return mean.clamp_min(1e-12).log()
        votes = F.one_hot(probs.argmax(2), probs.shape[2]).float().mean(0)
        return (votes + 1e-3 * mean / len(probs)).log()


class SISAEnsemble:
    """S constituents over S shards of R slices each, with slice checkpoints and exact deletion.

    Build one with :meth:`train`; then :meth:`forget` indices, :meth:`predict_proba`,
    :meth:`predict`, or use :attr:`model` (an ``nn.Module``) anywhere the kit expects a model.

    Attributes:
        slices: ``slices[s][r]``: the global indices currently in slice ``r`` of shard ``s``.
        constituents: the S trained models.
        forgotten: every index forgotten so far (sorted).
        train_seconds: wall time of the initial training.
        epochs_per_step: epochs of each incremental slice step (:func:`slice_step_epochs`).
    """

    def __init__(self, template: Classifier, data: ImageDataset, slices: list[list[Tensor]], recipe: Recipe, *,
                 seed: int = 0, checkpoints: str | Path = "memory", vmap: bool = False, progress: bool = True):
        self.config = dict(template.config)
        self.data = data
        self.slices = slices
        self.recipe = recipe
        self.seed = seed
        self.vmap = vmap
        self.progress = progress
        self.epochs_per_step = slice_step_epochs(recipe, self.n_slices)
        self.checkpoint_dir = None if str(checkpoints) == "memory" else Path(checkpoints)
        self._memory: dict[tuple[int, int], dict[str, Tensor]] = {}
        self.constituents = [self._fresh(s) for s in range(self.n_shards)]
        if vmap:
            _check_vmappable(self.constituents[0], recipe)
        self.forgotten = torch.empty(0, dtype=torch.long)
        self.train_seconds = 0.0

    # ---------------------------------------------------------------- construction

    @classmethod
    def train(cls, template: Classifier, data: ImageDataset, indices: Tensor, recipe: Recipe, *, shards: int = 5,
              slices: int = 4, seed: int = 0, checkpoints: str | Path = "memory", vmap: bool | str = "auto",
              progress: bool = True) -> SISAEnsemble:
        """Split ``indices`` into ``shards`` x ``slices`` (seeded) and train one constituent per shard.

        Args:
            template: a model of the kit (``unlearnkit.models``); only its architecture is used.
            indices: the global training indices (e.g. ``split.train``).
            recipe: the training recipe; each slice step uses it with
                ``epochs = slice_step_epochs(recipe, slices)``.
            shards: S, the number of disjoint shards (= constituents).
            slices: R, the number of slices per shard (= checkpoints per constituent).
            seed: fixes the shard/slice assignment, each constituent's initial weights and batches.
            checkpoints: ``"memory"`` (default), or a folder to write them to (atomic writes,
                loaded with ``weights_only=True``).
            vmap: train the constituents of a step together with ``torch.func`` (``True``), one
                after another (``False``), or ``"auto"``: together on CUDA when the architecture
                allows it, else one after another.
        """
        if not isinstance(template, Classifier):
            raise TypeError("SISA rebuilds constituents from the model's architecture, so it needs a "
                            f"unlearnkit.models.Classifier; got {type(template).__name__}")
        indices = torch.as_tensor(indices).detach().cpu()
        if indices.dtype in (torch.bool,) or indices.is_floating_point():
            raise ValueError(f"indices must be integer training indices, got dtype {indices.dtype}")
        indices = indices.long().flatten()
        if indices.unique().numel() != indices.numel():
            raise ValueError("training indices contain duplicates; give each sample once")
        for name, value in (("shards", shards), ("slices", slices)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if shards * slices > len(indices):
            raise ValueError(f"{shards} shards x {slices} slices = {shards * slices} slices for only {len(indices)} "
                             "samples: every slice needs at least one; use fewer shards or slices")
        if vmap == "auto":
            vmap = data.device.type == "cuda" and _vmappable(template, recipe)
        elif not isinstance(vmap, bool):
            raise ValueError(f"vmap must be True, False or 'auto', got {vmap!r}")
        layout = shard_layout(indices, shards, slices, seed)
        ensemble = cls(template, data, layout, recipe, seed=seed, checkpoints=checkpoints, vmap=vmap,
                       progress=progress)
        with Stopwatch(data.device) as clock:
            ensemble._replay({s: 0 for s in range(shards)})
        ensemble.train_seconds = clock.seconds
        return ensemble

    # ---------------------------------------------------------------- properties

    @property
    def n_shards(self) -> int:
        return len(self.slices)

    @property
    def n_slices(self) -> int:
        return len(self.slices[0])

    def shard_indices(self, shard: int) -> Tensor:
        """Every global index constituent ``shard`` is trained on now."""
        return torch.cat(self.slices[shard])

    @property
    def training_indices(self) -> Tensor:
        """Every index the ensemble is trained on now (sorted)."""
        return torch.cat([self.shard_indices(s) for s in range(self.n_shards)]).sort().values

    @property
    def model(self) -> SISAModel:
        """The ensemble as an ``nn.Module`` aggregating by mean probability."""
        return self.as_module("mean")

    def as_module(self, aggregation: Aggregation = "mean") -> SISAModel:
        """The ensemble as an ``nn.Module`` (sharing the constituents' weights) with the given aggregation.

        A view, not a copy: after a :meth:`forget` ask for a new one, since a retrained shard may
        have been trained in place (sequential training) or replaced (vmapped training).
        """
        active = [len(self.shard_indices(s)) > 0 for s in range(self.n_shards)]
        return SISAModel(self.constituents, aggregation, active)

    @torch.no_grad()
    def predict_proba(self, x: Tensor) -> Tensor:
        """Mean of the constituents' class probabilities, ``[n, C]``."""
        return self.as_module("mean").eval()(x).exp()

    @torch.no_grad()
    def predict(self, x: Tensor, aggregation: Aggregation = "vote") -> Tensor:
        """Predicted labels: majority vote (default; ties go to the higher mean probability) or mean probability."""
        return self.as_module(aggregation).eval()(x).argmax(1)

    def shard_of(self, index: int) -> tuple[int, int]:
        """``(shard, slice)`` holding a global training index; ``ValueError`` if none does."""
        for s, shard in enumerate(self.slices):
            for r, part in enumerate(shard):
                if (part == index).any():
                    return s, r
        raise ValueError(f"index {index} is not in the ensemble's training set")

    # ---------------------------------------------------------------- forgetting

    def forget(self, indices: int | Iterable[int] | Tensor, *, reference_seconds: float | None = None) -> ForgetReport:
        """Remove ``indices`` (one index or a batch) and retrain exactly what saw them.

        Each affected shard is restored to its checkpoint from before the earliest slice holding
        one of the indices and replayed from there, once per request however many of its samples
        are forgotten; the other constituents are not touched.

        Args:
            reference_seconds: the cost to compare with in ``report.speedup``; default the
                ensemble's own training time (retraining every constituent from scratch).

        Raises:
            ValueError: for an empty request, repeated indices, an index forgotten before, or one
                that was never in the training set.
        """
        request = self._validated(indices)
        restart = self._restart_points(request)
        with Stopwatch(self.data.device) as clock:
            for s, r in restart.items():
                self.slices[s] = [part if q < r else part[~torch.isin(part, request)]
                                  for q, part in enumerate(self.slices[s])]
            passes = self._replay(restart)
        self.forgotten = torch.cat([self.forgotten, request]).sort().values
        remaining = len(self.training_indices)
        return ForgetReport(
            forgotten=request.sort().values,
            shards_touched=sorted(restart),
            restart_slice=dict(sorted(restart.items())),
            samples_retrained=sum(len(self.shard_indices(s)) for s in restart),
            sample_passes=passes,
            full_passes=self.recipe.epochs * remaining,
            seconds=clock.seconds,
            reference_seconds=self.train_seconds if reference_seconds is None else float(reference_seconds),
        )

    def _validated(self, indices: int | Iterable[int] | Tensor) -> Tensor:
        request = torch.as_tensor(indices).detach().cpu()
        if request.numel() == 0:
            raise ValueError("the forget request is empty: give at least one training index")
        if request.dtype == torch.bool or request.is_floating_point():
            raise ValueError(f"forget needs integer indices, got dtype {request.dtype}; "
                             "for a boolean mask use mask.nonzero().flatten()")
        request = request.long().flatten()
        values, counts = request.unique(return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"indices {values[counts > 1][:5].tolist()} appear more than once in the request; "
                             "give each index once")
        again = request[torch.isin(request, self.forgotten)]
        if again.numel():
            raise ValueError(f"indices {again[:5].tolist()} were already forgotten by an earlier request; "
                             "they are no longer in any shard")
        unknown = request[~torch.isin(request, self.training_indices)]
        if unknown.numel():
            raise ValueError(f"indices {unknown[:5].tolist()} were never in the ensemble's training set, so there "
                             "is nothing to forget; pick indices from ensemble.training_indices")
        return request

    def _restart_points(self, request: Tensor) -> dict[int, int]:
        """shard -> the earliest slice holding one of ``request`` (shards holding none are absent)."""
        restart = {}
        for s, shard in enumerate(self.slices):
            hit = [r for r, part in enumerate(shard) if torch.isin(part, request).any()]
            if hit:
                restart[s] = min(hit)
        return restart

    def request_cost(self, indices: int | Iterable[int] | Tensor) -> float:
        """Dry run: the ``cost_fraction`` that ``forget(indices)`` would report, without training anything.

        Useful to plan (e.g. how much batching requests saves) before paying for it.
        """
        request = self._validated(indices)
        passes = 0
        for s, r in self._restart_points(request).items():
            parts = [p if q < r else p[~torch.isin(p, request)] for q, p in enumerate(self.slices[s])]
            for step in range(r, self.n_slices):
                n = sum(len(p) for p in parts[: step + 1])
                passes += self._step_recipe.epochs * n if n else 0
        return passes / (self.recipe.epochs * (len(self.training_indices) - len(request)))

    def replay_from_scratch(self, shard: int) -> Classifier:
        """A new constituent for ``shard`` trained from its initial weights on its *current* slices.

        After a :meth:`forget`, it equals the retrained constituent bit for bit on the CPU (the
        sequential path is deterministic): the proof, by construction, that SISA's deletion is
        exact. Leaves the ensemble untouched.
        """
        model = self._fresh(shard)
        for r in range(self.n_slices):
            cumulative = torch.cat(self.slices[shard][: r + 1])
            if len(cumulative):
                self._train_sequential(model, shard, r, cumulative)
        return model

    # ---------------------------------------------------------------- training engine

    def _fresh(self, shard: int) -> Classifier:
        return build_model(**self.config, seed=constituent_seed(self.seed, shard)).to(self.data.device)

    def _step_seed(self, shard: int, step: int) -> int:
        return constituent_seed(self.seed, shard, step)

    def _save(self, shard: int, step: int) -> None:
        state = {k: v.detach().clone() for k, v in self.constituents[shard].state_dict().items()}
        if self.checkpoint_dir is None:
            self._memory[(shard, step)] = state
        else:
            save_checkpoint(self.checkpoint_dir / f"shard{shard:03d}_before_slice{step:03d}.pt", {"state_dict": state})

    def _load(self, shard: int, step: int) -> None:
        if self.checkpoint_dir is None:
            state = self._memory[(shard, step)]
        else:
            path = self.checkpoint_dir / f"shard{shard:03d}_before_slice{step:03d}.pt"
            state = load_checkpoint(path, self.data.device)["state_dict"]
        self.constituents[shard].load_state_dict(state)

    @property
    def _step_recipe(self) -> Recipe:
        return self.recipe.with_(epochs=self.epochs_per_step)

    def _train_sequential(self, model: nn.Module, shard: int, step: int, cumulative: Tensor) -> None:
        train_model(model, self.data, cumulative, self._step_recipe, seed=self._step_seed(shard, step),
                    progress=False)

    def _replay(self, restart: dict[int, int]) -> int:
        """Restore each shard in ``restart`` to before its slice and train the remaining steps; return the
        number of sample-gradient evaluations done."""
        if not restart:
            return 0
        for s, r in restart.items():
            if r == 0:
                self.constituents[s] = self._fresh(s)
            else:
                self._load(s, r)
        passes = 0
        first = min(restart.values())
        steps = range(first, self.n_slices)
        for step in tqdm(steps, desc="SISA slice steps", leave=False, disable=not self.progress or len(steps) < 2):
            group = [s for s, r in restart.items() if r <= step]
            work = {}
            for s in group:
                if step > restart[s] or step == 0:  # the checkpoint before the restart slice is already there
                    self._save(s, step)
                cumulative = torch.cat(self.slices[s][: step + 1])
                if len(cumulative):  # a shard emptied by deletions keeps its initial weights and stops voting
                    work[s] = cumulative
                    passes += self._step_recipe.epochs * len(cumulative)
            if self.vmap and len(work) > 1:
                trained = train_stacked([self.constituents[s] for s in work], self.data, list(work.values()),
                                        self._step_recipe,
                                        [self._step_seed(s, step) for s in work])
                for s, model in zip(work, trained, strict=True):
                    self.constituents[s] = model
            else:
                for s, cumulative in work.items():
                    self._train_sequential(self.constituents[s], s, step, cumulative)
        return passes


def _vmappable(model: nn.Module, recipe: Recipe) -> bool:
    try:
        _check_vmappable(model, recipe)
    except (TypeError, ValueError):
        return False
    return True


def _schedule_values(recipe: Recipe, total_steps: int) -> tuple[list[float], list[float]]:
    """The learning rate and momentum of each step, read off the kit's own optimizer and schedule."""
    dummy = nn.Parameter(torch.zeros(1))
    optimizer = make_optimizer([dummy], recipe, torch.device("cpu"))
    schedule = make_schedule(optimizer, recipe, total_steps)
    lrs, momenta = [], []
    for _ in range(total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        momenta.append(optimizer.param_groups[0]["momentum"])
        optimizer.step()  # no gradient, so nothing changes; keeps the schedule's order-of-calls check quiet
        if schedule is not None:
            schedule.step()
    return lrs, momenta


def train_stacked(models: list[nn.Module], data: ImageDataset, indices: list[Tensor], recipe: Recipe | list[Recipe],
                  seeds: list[int]) -> list[nn.Module]:
    """Train several same-architecture models at once, each on its own indices, with ``torch.func``.

    Model ``k`` sees exactly the batches ``train_model(models[k], data, indices[k], recipe, seed=seeds[k])``
    would draw, and takes the same SGD (Nesterov momentum, weight decay) steps with the same
    learning-rate and momentum schedule; all models advance together, one vmapped step at a
    time. Shorter runs are padded with zero-weight samples and their updates masked off, so
    models with different amounts of data can share the stack.

    Returns new trained models (the inputs are not modified). Raises ``TypeError`` / ``ValueError``
    for what the vmapped path cannot do (batch norm, dropout, Adam, augmentation). ``recipe`` may be
    one per model, differing only in ``epochs``.
    """
    recipes = list(recipe) if isinstance(recipe, list | tuple) else [recipe] * len(models)
    if not models or not len(models) == len(indices) == len(seeds) == len(recipes):
        raise ValueError(f"need as many models, index sets, seeds (and recipes), got {len(models)}, {len(indices)}, "
                         f"{len(seeds)} (and {len(recipes)})")
    if len({r.with_(epochs=1) for r in recipes}) > 1:
        raise ValueError("stacked models must share one recipe apart from its number of epochs")
    recipe = recipes[0]
    _check_vmappable(models[0], recipe)
    device = data.device
    k = len(models)
    plans = []  # per model: its batches in order, as train_model would draw them
    for idx, seed, own in zip(indices, seeds, recipes, strict=True):
        if len(idx) == 0:
            raise ValueError("cannot train on an empty index set")
        generator = torch.Generator().manual_seed(seed)
        idx = torch.as_tensor(idx).cpu()
        plans.append([b for _ in range(own.epochs) for b in batches(idx, recipe.batch_size, generator)])
    total = max(len(p) for p in plans)
    width = max(len(b) for p in plans for b in p)
    batch_index = torch.zeros(total, k, width, dtype=torch.long)
    batch_weight = torch.zeros(total, k, width)
    lrs = torch.zeros(total, k)
    momenta = torch.zeros(total, k)
    active = torch.zeros(total, k, dtype=torch.bool)
    schedules: dict[int, tuple[list[float], list[float]]] = {}
    for j, plan in enumerate(plans):
        if len(plan) not in schedules:
            schedules[len(plan)] = _schedule_values(recipe, len(plan))
        lr, mom = schedules[len(plan)]
        for t, b in enumerate(plan):
            batch_index[t, j, : len(b)] = b
            batch_weight[t, j, : len(b)] = 1.0
        lrs[: len(plan), j] = torch.tensor(lr)
        momenta[: len(plan), j] = torch.tensor(mom)
        active[: len(plan), j] = True
    batch_index, batch_weight = batch_index.to(device), batch_weight.to(device)
    lrs, momenta, active = lrs.to(device), momenta.to(device), active.to(device)

    base = copy.deepcopy(models[0]).to("meta").train()  # the functional calls run in the template's mode
    params, buffers = torch.func.stack_module_state(list(models))
    params = {n: p.detach().clone() for n, p in params.items()}
    velocity = {n: torch.zeros_like(p) for n, p in params.items()}
    smoothing, decay, nesterov = recipe.label_smoothing, recipe.weight_decay, recipe.momentum > 0

    # fp16 needs a loss scaler, which this functional step does not carry; the stacked models are small
    # (no batch norm), so on a GPU without bf16 they train in full precision instead
    fp16 = autocast_dtype(device) == torch.float16

    def loss_fn(p, b, x, y, w):
        with contextlib.nullcontext() if fp16 else autocast(device):
            logits = torch.func.functional_call(base, (p, b), (x,))
        losses = F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=smoothing)
        return (losses * w).sum() / w.sum()

    def update(p, v, b, x, y, w, lr, mom, on):
        grads = torch.func.grad(loss_fn)(p, b, x, y, w)
        new_p, new_v = {}, {}
        for n in p:
            d = torch.add(grads[n], p[n], alpha=decay) if decay else grads[n]
            v_n = v[n] * mom + d  # at the first step v = 0, so this is d, as in torch's SGD
            step = d + mom * v_n if nesterov else v_n
            new_p[n] = torch.where(on, p[n] - lr * step, p[n])
            new_v[n] = torch.where(on, v_n, v[n])
        return new_p, new_v

    step_all = torch.func.vmap(update)
    for t in range(total):
        idx = batch_index[t]
        x, y = data.images[idx], data.labels[idx]
        params, velocity = step_all(params, velocity, buffers, x, y, batch_weight[t], lrs[t], momenta[t], active[t])

    trained = []
    for j, model in enumerate(models):
        fresh = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in fresh.named_parameters():
                p.copy_(params[n][j])
        trained.append(fresh.eval())
    return trained


@register("sisa")
def sisa(model: nn.Module, data: ImageDataset, split: Split, *, recipe: Recipe, shards: int = 5, slices: int = 4,
         seed: int = 0, aggregation: Aggregation = "mean", vmap: bool | str = "auto",
         checkpoints: str | Path = "memory", progress: bool = True) -> UnlearningResult:
    """SISA with the registry's calling convention: build the ensemble on ``split.train``, then forget
    ``split.forget`` in one batched request.

    Only the deletion is timed (``seconds``); the ensemble's training time is in
    ``details["train_seconds"]``. ``model`` supplies the architecture only (it is never trained or
    written to). The returned model is the ensemble as a :class:`SISAModel`; the live
    :class:`SISAEnsemble` (for further requests) is ``details["ensemble"]``.

    Args:
        recipe: the training recipe (that of the original model, for a fair comparison).
        shards, slices: S and R; more shards make deletions cheaper and each constituent weaker.
        aggregation: ``"mean"`` (mean probability) or ``"vote"`` (majority vote).
        vmap, checkpoints, seed: see :meth:`SISAEnsemble.train`.
    """
    check_call(model, data, split)
    if aggregation not in ("mean", "vote"):
        raise ValueError(f"aggregation must be 'mean' or 'vote', got {aggregation!r}")
    ensemble = SISAEnsemble.train(model, data, split.train, recipe, shards=shards, slices=slices, seed=seed,
                                  checkpoints=checkpoints, vmap=vmap, progress=progress)
    report = ensemble.forget(split.forget)
    details: dict[str, Any] = {
        "shards": shards, "slices": slices, "aggregation": aggregation, "vmap": ensemble.vmap,
        "train_seconds": ensemble.train_seconds, "shards_touched": report.shards_touched,
        "samples_retrained": report.samples_retrained, "cost_fraction": report.cost_fraction,
        "report": report, "ensemble": ensemble,
    }
    # a copy, so that later requests to ``details["ensemble"]`` leave this result as it is
    snapshot = SISAModel([clone(m) for m in ensemble.constituents], aggregation,
                         [len(ensemble.shard_indices(s)) > 0 for s in range(ensemble.n_shards)])
    return UnlearningResult(snapshot, report.seconds, "sisa", details)


__all__ = ["ForgetReport", "SISAEnsemble", "SISAModel", "constituent_seed", "layout_seed",
           "shard_layout", "sisa", "slice_step_epochs",
           "train_stacked"]
