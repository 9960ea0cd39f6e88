"""One training loop for every model of the course, and a cache of trained models.

The data never leaves the device: each epoch draws a permutation of the training indices and
slices GPU-resident batches out of the whole-dataset tensor. On CUDA the loop adds bf16/fp16
autocast, channels_last and a fused optimizer; on the CPU it is seeded and bit-reproducible.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data import ImageDataset, data_root
from .device import synchronize, to_device_async
from .models import Classifier, model_for, whiten_stem


@dataclass(frozen=True)
class Recipe:
    """Everything that determines how a model is trained (and so, with the data, what it becomes).

    Attributes:
        epochs: passes over the training indices.
        batch_size: samples per step.
        lr: peak learning rate.
        optimizer: ``"sgd"`` (with Nesterov momentum) or ``"adam"``.
        momentum: SGD momentum.
        weight_decay: L2 penalty applied by the optimizer.
        schedule: ``"onecycle"`` (warm up then anneal; fast and robust), ``"cosine"`` or ``"constant"``.
        label_smoothing: cross-entropy label smoothing.
        augment: ``"flip-crop"`` (random 4-pixel-padded crops and horizontal flips, drawn per
            sample and done on the device in batches; for CIFAR) or ``None``.
        compile: run the model through ``torch.compile`` (CUDA only: a GPU pays back the minute of
            compilation within a few epochs, a CPU rarely does, so elsewhere it is skipped with a
            warning). It changes speed, not what is learned, so it is not part of the cache key.
    """

    epochs: int = 8
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    label_smoothing: float = 0.0
    augment: str | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        def number(value: object) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        def integer(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not (integer(self.epochs) and self.epochs >= 1):
            raise ValueError(f"Recipe(epochs={self.epochs!r}): epochs must be a positive integer")
        if not (integer(self.batch_size) and self.batch_size >= 2):
            raise ValueError(f"Recipe(batch_size={self.batch_size!r}): batch_size must be an integer of at least 2 "
                             "(the loop drops a last batch of one sample, which batch norm cannot train on)")
        if not (number(self.lr) and self.lr > 0):
            raise ValueError(f"Recipe(lr={self.lr!r}): the learning rate must be a positive number")
        if not (number(self.momentum) and 0 <= self.momentum < 1):
            raise ValueError(f"Recipe(momentum={self.momentum!r}): momentum must be in [0, 1)")
        if not (number(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"Recipe(weight_decay={self.weight_decay!r}): weight decay must be >= 0")
        if not (number(self.label_smoothing) and 0 <= self.label_smoothing < 1):
            raise ValueError(f"Recipe(label_smoothing={self.label_smoothing!r}): label smoothing must be in [0, 1)")
        choices = {"optimizer": ("sgd", "adam"), "schedule": ("onecycle", "cosine", "constant"),
                   "augment": ("flip-crop", None)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"Recipe({name}={getattr(self, name)!r}): use one of {allowed}")

    def with_(self, **changes) -> Recipe:
        """A copy with some fields changed: ``recipe.with_(epochs=2)``."""
        return replace(self, **changes)


def default_recipe(data: ImageDataset, arch: str = "mlp", quick: bool = True) -> Recipe:
    """The recipe the course uses for ``arch`` on ``data``, in quick or full mode."""
    if arch == "resnet18":
        return Recipe(epochs=2 if quick else 30, batch_size=256, lr=0.2, label_smoothing=0.1,
                      augment="flip-crop" if data.name == "cifar10" else None)
    if arch == "cnn":
        return Recipe(epochs=4 if quick else 12, batch_size=128, lr=0.05,
                      augment="flip-crop" if data.name == "cifar10" else None)
    if arch == "fastnet":
        # airbench's ingredients (large batches, label smoothing 0.2, flips and crops) at the kit's
        # SGD scale; its 94% on CIFAR-10 comes with its own tuned optimiser and test-time flips
        return Recipe(epochs=2 if quick else 10, batch_size=512, lr=0.2, weight_decay=5e-4, label_smoothing=0.2,
                      augment="flip-crop" if data.name == "cifar10" else None)
    return Recipe(epochs=8 if quick else 15, batch_size=128, lr=0.05)


@dataclass
class TrainLog:
    """What a training run did: mean loss per epoch and the wall-clock seconds."""

    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def batches(indices: Tensor, batch_size: int, generator: torch.Generator | None = None,
            shuffle: bool = True) -> Iterator[Tensor]:
    """Yield batches of indices (a fresh permutation when ``shuffle``); a last batch of one is dropped,
    since batch norm cannot train on a single sample."""
    order = indices[torch.randperm(len(indices), generator=generator)] if shuffle else indices
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        if len(chunk) > 1 or len(order) == 1:
            yield chunk


def flip_crop(images: Tensor, generator: torch.Generator | None = None, pad: int = 4,
              per_sample: bool = True) -> Tensor:
    """Random horizontal flips and zero-padded random crops of a batch ``[N, C, H, W]``, on its device.

    Args:
        generator: a CPU generator the random choices are drawn from (so CPU runs reproduce).
        pad: the largest shift in pixels, each way.
        per_sample: a shift drawn for every image (one gather, so it stays cheap on a GPU);
            ``False`` shifts the whole batch by one offset.
    """
    n, _, h, w = images.shape
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(to_device_async(flip, images.device).view(-1, 1, 1, 1), images.flip(-1), images)
    padded = F.pad(images, (pad, pad, pad, pad))
    if not per_sample:
        dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
        return padded[:, :, dy:dy + h, dx:dx + w]
    dy, dx = to_device_async(torch.randint(0, 2 * pad + 1, (2, n), generator=generator), images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, :, None]  # [N, H, 1]
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, :]  # [N, 1, W]
    sample = torch.arange(n, device=images.device)[:, None, None]
    # advanced indices around a slice put their dimensions first: [N, H, W, C]
    return padded[sample, :, rows, cols].permute(0, 3, 1, 2).contiguous()


def make_optimizer(params: Iterable[nn.Parameter], recipe: Recipe, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer a recipe names (fused on CUDA, where that is faster)."""
    extra = {"fused": True} if device.type == "cuda" else {}
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.momentum > 0,
                               weight_decay=recipe.weight_decay, **extra)
    if recipe.optimizer == "adam":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, **extra)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}; use 'sgd' or 'adam'")


def make_schedule(optimizer: torch.optim.Optimizer, recipe: Recipe,
                  total_steps: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The learning-rate schedule a recipe names, stepped once per optimizer step (``None`` for constant)."""
    if recipe.schedule == "onecycle":
        total_steps = max(total_steps, 1)
        # torch's OneCycleLR divides by zero when pct_start * total_steps == 1 (4 steps at 0.25)
        pct_start = 0.3 if total_steps == 4 else 0.25
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=total_steps,
                                                   pct_start=pct_start, anneal_strategy="linear")
    if recipe.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    if recipe.schedule == "constant":
        return None
    raise ValueError(f"unknown schedule {recipe.schedule!r}; use 'onecycle', 'cosine' or 'constant'")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision the kit computes in on ``device``: bf16 on a GPU that has it, fp16 on one
    that does not (a T4), ``None`` (full fp32) elsewhere, so that CPU runs stay bit-reproducible.

    Every autocast region and loss scaler of the kit follows this one policy.
    """
    if device.type != "cuda":
        return None
    # bf16 tensor cores came with compute capability 8 (Ampere); torch.cuda.is_bf16_supported() also says
    # yes to older GPUs that only emulate it, slowly
    return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16


def autocast(device: torch.device) -> torch.autocast:
    """A context computing in :func:`autocast_dtype` precision on ``device`` (a no-op where that is ``None``)."""
    dtype = autocast_dtype(device)
    if dtype is None:  # a switched-off context, of the one device type every build of torch accepts
        return torch.autocast("cpu", enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def memory_format(device: torch.device) -> torch.memory_format:
    """``channels_last`` on CUDA, the layout its tensor-core convolutions run fastest in; the default elsewhere."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """A loss scaler, switched on only for fp16, whose narrow exponent range lets small gradients underflow."""
    fp16 = autocast_dtype(device) == torch.float16
    return torch.amp.GradScaler(device.type if fp16 else "cpu", enabled=fp16)  # a switched-off one, as above


def _compiled(model: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile(model)`` on CUDA; the model itself elsewhere, with a warning that says why."""
    if device.type != "cuda":
        warnings.warn(f"Recipe(compile=True) is only used on CUDA; training eagerly on {device.type} "
                      "(compiling takes longer than it saves there)", stacklevel=3)
        return model
    return torch.compile(model)  # shares the parameters, so training it trains ``model``


def train_model(model: nn.Module, data: ImageDataset, indices: Tensor, recipe: Recipe, *, seed: int = 0,
                progress: bool = True, desc: str = "training") -> TrainLog:
    """Train ``model`` in place on ``data[indices]`` with ``recipe``; return the :class:`TrainLog`.

    Reproducible on the CPU for a given ``seed`` (batch order and augmentation are drawn from it).
    On CUDA it computes in :func:`autocast_dtype` precision and the :func:`memory_format` layout.
    """
    if len(indices) == 0:
        raise ValueError("cannot train on an empty index set")
    device = data.device
    generator = torch.Generator().manual_seed(seed)
    indices = torch.as_tensor(indices).to(device)
    layout = memory_format(device)
    model = model.to(memory_format=layout)  # in place: a module's ``to`` converts its own parameters
    forward = _compiled(model, device) if recipe.compile else model
    optimizer = make_optimizer(model.parameters(), recipe, device)
    steps_per_epoch = sum(1 for _ in batches(indices, recipe.batch_size, shuffle=False))
    schedule = make_schedule(optimizer, recipe, recipe.epochs * steps_per_epoch)
    scaler = grad_scaler(device)
    log = TrainLog()
    model.train()
    synchronize(device)
    start = time.perf_counter()
    with warnings.catch_warnings():
        if scaler.is_enabled():
            # fp16's scaler skips the first steps, whose scaled gradients overflow, while it settles on a
            # scale; the schedule moving on meanwhile is torch's AMP recipe, not the mistake it warns of
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        for _ in tqdm(range(recipe.epochs), desc=desc, leave=False, disable=not progress, mininterval=1.0):
            total = torch.zeros((), device=device)
            for batch in batches(indices, recipe.batch_size, generator):
                x, y = data.images[batch], data.labels[batch]
                if recipe.augment == "flip-crop":
                    x = flip_crop(x, generator)
                x = x.contiguous(memory_format=layout)
                with autocast(device):
                    loss = F.cross_entropy(forward(x), y, label_smoothing=recipe.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                if schedule is not None:
                    schedule.step()
                total += loss.detach() * len(batch)
            log.epoch_losses.append(total.item() / len(indices))  # one sync per epoch, not per step
    synchronize(device)
    log.seconds = time.perf_counter() - start
    if not torch.isfinite(torch.tensor(log.epoch_losses[-1])):
        raise FloatingPointError(f"training diverged (loss {log.epoch_losses[-1]}) with lr={recipe.lr:g}; "
                                 "lower the learning rate")
    model.eval()
    return log


# --------------------------------------------------------------------------------------------
# Checkpoints and the cache of trained models
# --------------------------------------------------------------------------------------------


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Write ``payload`` (tensors, numbers, strings, lists, dicts) atomically: a reader sees the old
    file or the whole new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True`` (no pickled code runs)."""
    return torch.load(path, map_location=device, weights_only=True)


def cache_dir() -> Path:
    """Where trained models are cached: ``<data root>/cache/models``."""
    return data_root() / "cache" / "models"


def _cache_key(model: Classifier, data: ImageDataset, indices: Tensor, recipe: Recipe, seed: int) -> str:
    indices = torch.as_tensor(indices).cpu().long()
    description = {
        "model": {k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items()},
        "data": [data.name, len(data), data.n_train_pool],
        "indices": hashlib.sha256(indices.numpy().tobytes()).hexdigest(),
        "labels": hashlib.sha256(data.labels.cpu()[indices].numpy().tobytes()).hexdigest(),
        "recipe": {k: v for k, v in asdict(recipe).items() if k != "compile"},
        "seed": seed,
        "device": data.device.type,  # timings differ by device, so models trained elsewhere are not reused
        # CPU kernels sum in a thread-count-dependent order; keep bit-reproducibility per thread count
        "threads": torch.get_num_threads() if data.device.type == "cpu" else None,
        "torch": torch.__version__.split("+")[0],
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]


#: Training images whose 2x2 patches set a fast net's whitening stem (airbench uses 5,000).
WHITENING_SAMPLES = 5000


def initialise_whitening(model: Classifier, data: ImageDataset, indices: Tensor, seed: int = 0) -> None:
    """Set a fresh ``fastnet``'s frozen stem to whiten the patches of a seeded sample of ``data[indices]``.

    Only the model's own training indices are used: an oracle trained on the retain set must not
    take even its first-layer filters from the forget set.
    """
    indices = torch.as_tensor(indices)
    chosen = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))[:WHITENING_SAMPLES]
    whiten_stem(model, data.images[indices[chosen].to(data.device)])


def fit(data: ImageDataset, indices: Tensor, recipe: Recipe, *, arch: str = "mlp", seed: int = 0,
        cache: bool = True, progress: bool = True, desc: str = "training", **model_kwargs,
        ) -> tuple[Classifier, float]:
    """Train a fresh ``arch`` model on ``data[indices]``; return ``(model, training seconds)``.

    With ``cache=True`` a model trained before with exactly the same architecture, data, indices,
    recipe, seed and device type is loaded instead (its recorded training seconds are returned, so
    speed-ups stay honest). A cache file that cannot be read is rebuilt, never trusted.

    A ``fastnet`` starts from a whitening stem computed from its training images
    (:func:`initialise_whitening`), as airbench's recipe does.
    """
    def fresh() -> Classifier:
        model = model_for(data, arch, seed=seed, **model_kwargs)
        if arch == "fastnet":
            initialise_whitening(model, data, indices, seed)  # also freezes the stem of a model loaded below
        return model

    model = fresh()
    path = cache_dir() / f"{_cache_key(model, data, indices, recipe, seed)}.pt"
    if cache and path.exists():
        try:
            saved = load_checkpoint(path, data.device)
            model.load_state_dict(saved["state_dict"])
            model.eval()
            return model, float(saved["seconds"])
        except Exception as error:  # a truncated or foreign file: retrain and overwrite it
            warnings.warn(f"ignoring unreadable cached model {path.name} ({type(error).__name__}); retraining",
                          stacklevel=2)
            model = fresh()
    log = train_model(model, data, indices, recipe, seed=seed, progress=progress, desc=desc)
    if cache:
        save_checkpoint(path, {"state_dict": model.state_dict(), "seconds": log.seconds})
    return model, log.seconds
