"""Exact unlearning: train from scratch on the retain set with the original recipe."""

from __future__ import annotations

from torch import nn

from ..data import ImageDataset, Split
from ..models import Classifier
from ..train import Recipe, fit
from .base import UnlearningResult, check_call, register


@register("retrain")
def retrain(model: nn.Module, data: ImageDataset, split: Split, *, recipe: Recipe, seed: int = 0,
            cache: bool = True, progress: bool = True) -> UnlearningResult:
    """The retrain oracle: a fresh model of ``model``'s architecture trained on ``split.retain``.

    It is exact (the result never saw the forget set) and the reference of every comparison.
    ``recipe`` and ``seed`` should be those of the original model, so that the only difference
    is the data. ``seconds`` is the training time (the recorded time when the model came from
    the cache).
    """
    check_call(model, data, split)
    if not isinstance(model, Classifier):
        raise TypeError("retrain needs a unlearnkit.models.Classifier (it rebuilds the architecture from "
                        f"model.config); got {type(model).__name__}")
    config = {k: v for k, v in model.config.items() if k not in ("arch", "in_shape", "num_classes", "mean", "std")}
    oracle, seconds = fit(data, split.retain, recipe, arch=model.config["arch"], seed=seed, cache=cache,
                          progress=progress, desc="retraining", **config)
    return UnlearningResult(oracle, seconds, "retrain",
                            {"trained_on": len(split.retain), "epochs": recipe.epochs, "seed": seed})
