"""Figures more than one lesson draws. Each returns its matplotlib ``Axes`` for further styling."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.axes import Axes
from torch import Tensor

from .data import ImageDataset


def _axes(ax: Axes | None) -> Axes:
    return ax if ax is not None else plt.subplots(figsize=(6, 4))[1]


def show_images(data: ImageDataset, indices: Sequence[int] | Tensor, titles: Sequence[str] | None = None,
                columns: int = 8, title: str | None = None) -> plt.Figure:
    """A grid of images from ``data`` with their class names (or the given ``titles``)."""
    indices = [int(i) for i in indices]
    rows = int(np.ceil(len(indices) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.4 * columns, 1.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i, k in zip(axes.flat, indices, range(len(indices))):
        image = data.images[i].cpu().permute(1, 2, 0).numpy()
        ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray")
        ax.set_title(titles[k] if titles is not None else data.classes[int(data.labels[i])], fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def confidence_histograms(groups: Mapping[str, Tensor], ax: Axes | None = None,
                          title: str = "Confidence in the true label", bins: int = 30) -> Axes:
    """Overlaid histograms (as densities) of p(y|x) for several groups of samples."""
    ax = _axes(ax)
    edges = np.linspace(0, 1, bins + 1)
    for name, values in groups.items():
        ax.hist(values.detach().float().cpu().numpy(), bins=edges, density=True, histtype="step", linewidth=2,
                label=f"{name} (n={len(values)})")
    ax.set(title=title, xlabel="p(true label | x)", ylabel="density")
    ax.legend(loc="upper left")
    return ax


def split_accuracy_bars(table: pd.DataFrame, columns: Sequence[str] = ("forget acc", "retain acc", "test acc"),
                        ax: Axes | None = None, title: str = "Accuracy on each split") -> Axes:
    """Grouped bars: one group per model (row of a comparison table), one bar per split."""
    ax = _axes(ax)
    x = np.arange(len(table))
    width = 0.8 / len(columns)
    for k, column in enumerate(columns):
        ax.bar(x + (k - (len(columns) - 1) / 2) * width, table[column], width, label=column)
    ax.set_xticks(x, table.index, rotation=15)
    ax.set(title=title, ylabel="accuracy (%)", ylim=(0, 105))
    ax.legend(loc="lower right")
    return ax


def roc_curve(member_scores: Tensor, nonmember_scores: Tensor, ax: Axes | None = None, label: str = "",
              log: bool = False) -> Axes:
    """ROC of a membership attack (true-positive vs false-positive rate over every threshold)."""
    ax = _axes(ax)
    scores = torch.cat([member_scores, nonmember_scores]).double().cpu()
    truth = torch.cat([torch.ones(len(member_scores)), torch.zeros(len(nonmember_scores))]).double()
    order = scores.argsort(descending=True)
    tpr = torch.cat([torch.zeros(1), truth[order].cumsum(0) / truth.sum()])
    fpr = torch.cat([torch.zeros(1), (1 - truth[order]).cumsum(0) / (1 - truth).sum()])
    ax.plot(fpr.numpy(), tpr.numpy(), label=label)
    ax.plot([1e-4 if log else 0, 1], [1e-4 if log else 0, 1], "k:", linewidth=1)
    if log:
        ax.set(xscale="log", yscale="log", xlim=(1e-3, 1), ylim=(1e-3, 1))
    ax.set(title="Membership attack ROC", xlabel="false-positive rate", ylabel="true-positive rate")
    if label:
        ax.legend(loc="lower right")
    return ax


def per_class_comparison(accuracy_a: Tensor, accuracy_b: Tensor, classes: Sequence[str],
                         names: tuple[str, str] = ("method", "retrain"), ax: Axes | None = None,
                         title: str = "Per-class test accuracy") -> Axes:
    """Side-by-side per-class accuracy of two models (the Unlearning Comparator's class view)."""
    ax = _axes(ax)
    x = np.arange(len(classes))
    ax.bar(x - 0.2, 100 * accuracy_a.cpu().numpy(), 0.4, label=names[0])
    ax.bar(x + 0.2, 100 * accuracy_b.cpu().numpy(), 0.4, label=names[1])
    ax.set_xticks(x, classes, rotation=45, ha="right")
    ax.set(title=title, ylabel="accuracy (%)", ylim=(0, 105))
    ax.legend(loc="lower right")
    return ax


def confidence_scatter(method_conf: Tensor, oracle_conf: Tensor, ax: Axes | None = None, name: str = "method",
                       title: str = "Per-sample confidence on the forget set") -> Axes:
    """Each forget sample's p(y|x) under a method against under the retrain oracle (diagonal = agreement)."""
    ax = _axes(ax)
    ax.scatter(oracle_conf.cpu().numpy(), method_conf.cpu().numpy(), s=6, alpha=0.4)
    ax.plot([0, 1], [0, 1], "k:", linewidth=1)
    ax.set(title=title, xlabel="p(y|x) under retrain", ylabel=f"p(y|x) under {name}", xlim=(0, 1), ylim=(0, 1))
    return ax
