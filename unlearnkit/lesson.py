"""The standard setting every lesson starts from: data, split, recipe, original model, retrain oracle.

Lessons differ in what they do *after* this point; building the starting point the same way
everywhere (and caching the trained models) keeps their numbers comparable and their run time low.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import ImageDataset, Split, class_split, load_dataset, random_split
from .device import get_device
from .methods.base import UnlearningResult
from .methods.retrain import retrain
from .models import Classifier
from .train import Recipe, default_recipe, fit

#: Training / test subset sizes in quick mode for datasets larger than the embedded one.
QUICK_SIZES = {"n_train": 10_000, "n_test": 2_000}


@dataclass
class Setting:
    """Everything a lesson needs to start unlearning.

    Attributes:
        data: the dataset, on ``device``.
        split: forget / retain / test indices.
        recipe: how the original (and so the oracle) was trained.
        arch: the model architecture's name.
        original: θ_o, trained on ``split.train``.
        original_seconds: its training time (recorded, also when it came from the cache).
        oracle: θ_r, the retrain result (trained on ``split.retain`` with the same recipe and seed).
    """

    data: ImageDataset
    split: Split
    recipe: Recipe
    arch: str
    seed: int
    quick: bool
    original: Classifier
    original_seconds: float
    oracle: UnlearningResult

    @property
    def device(self) -> torch.device:
        return self.data.device


def default_arch(dataset: str, quick: bool) -> str:
    """MLP in quick mode; the small CNN (MNIST family) or ResNet-18 (CIFAR-10) in full mode."""
    if quick:
        return "mlp"
    return "resnet18" if dataset == "cifar10" else "cnn"


def standard_setting(dataset: str = "embedded", device: str | torch.device = "auto", quick: bool = True,
                     seed: int = 0, forget: int | float | str = 0.1, arch: str | None = None,
                     data: ImageDataset | None = None, progress: bool = True) -> Setting:
    """Load the data, make the split, train (or load from cache) the original model and the oracle.

    Args:
        forget: a fraction (``0.1``) or count (``100``) of random training samples, or
            ``"class:3"`` / ``"class:Sneaker"`` to forget a whole class.
        arch: default :func:`default_arch`.
        data: reuse an already loaded dataset instead of loading ``dataset``.
    """
    device = get_device(device, verbose=False) if not isinstance(device, torch.device) else device
    data = data if data is not None else load_dataset(dataset, device)
    sizes = QUICK_SIZES if quick and data.n_train_pool > QUICK_SIZES["n_train"] else {}
    if isinstance(forget, str):
        if not forget.startswith("class:"):
            raise ValueError(f"forget={forget!r}: use a fraction, a count, or 'class:<index or name>'")
        label = forget.split(":", 1)[1]
        split = class_split(data, int(label) if label.isdigit() else label, seed=seed, **sizes)
    else:
        split = random_split(data, forget, seed=seed, **sizes)
    arch = arch or default_arch(data.name, quick)
    recipe = default_recipe(data, arch, quick)
    original, seconds = fit(data, split.train, recipe, arch=arch, seed=seed, progress=progress,
                            desc="original model")
    oracle = retrain(original, data, split, recipe=recipe, seed=seed, progress=progress)
    return Setting(data, split, recipe, arch, seed, quick, original, seconds, oracle)
