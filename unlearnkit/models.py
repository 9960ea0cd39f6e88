"""The course's models: every one is a feature ``backbone`` followed by a linear ``head``.

That shape is what the classifier-level methods need (influence on the last layer, IMU, MIMU's
target layers), so it is a contract here rather than a convention: ``model.head`` is always the
final ``nn.Linear`` and ``model.features(x)`` gives its input.

Models take raw uint8 images (or floats in [0, 1]) and standardise them themselves, so the
dataset can stay on the GPU as compact uint8.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .data import ImageDataset

#: Per-channel normalisation statistics (mean or standard deviation), one float per channel.
Stats = tuple[float, ...]


class Standardize(nn.Module):
    """Turn uint8 images (or floats in [0, 1]) into per-channel standardised floats."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div(255)
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """``head(backbone(x))``, remembering how it was built so it can be rebuilt fresh.

    Attributes:
        backbone: images to a feature vector.
        head: the final linear layer, features to logits.
        config: ``{"arch": ..., **kwargs}``; ``build_model(**model.config)`` rebuilds it.
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear, config: dict):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.config = config

    def features(self, x: Tensor) -> Tensor:
        """The penultimate representation: the head's input."""
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def mlp(in_shape: tuple[int, int, int], num_classes: int, mean: Stats, std: Stats, hidden: tuple[int, ...] = (256, 128),
        ) -> Classifier:
    """A multilayer perceptron: flatten, then ``Linear-ReLU`` blocks of the ``hidden`` widths."""
    layers: list[nn.Module] = [Standardize(mean, std), nn.Flatten()]
    width = in_shape[0] * in_shape[1] * in_shape[2]
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    config = dict(arch="mlp", in_shape=tuple(in_shape), num_classes=num_classes, mean=tuple(mean), std=tuple(std),
                  hidden=tuple(hidden))
    return Classifier(nn.Sequential(*layers), nn.Linear(width, num_classes), config)


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


def small_cnn(in_shape: tuple[int, int, int], num_classes: int, mean: Stats, std: Stats, width: int = 32) -> Classifier:
    """A small CNN for 28x28 (or 32x32) images: three conv blocks with pooling, then a hidden layer."""
    backbone = nn.Sequential(
        Standardize(mean, std),
        _conv_block(in_shape[0], width), nn.MaxPool2d(2),
        _conv_block(width, 2 * width), nn.MaxPool2d(2),
        _conv_block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4 * width, 128), nn.ReLU(),
    )
    config = dict(arch="cnn", in_shape=tuple(in_shape), num_classes=num_classes, mean=tuple(mean), std=tuple(std),
                  width=width)
    return Classifier(backbone, nn.Linear(128, num_classes), config)


class BasicBlock(nn.Module):
    """ResNet's two-conv residual block."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(in_shape: tuple[int, int, int], num_classes: int, mean: Stats, std: Stats, width: int = 64) -> Classifier:
    """ResNet-18 with the CIFAR stem: a 3x3 first convolution, stride 1, and no max-pool."""
    stages, c_in = [], width
    for i, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
        stages += [BasicBlock(c_in, c_out, 1 if i == 0 else 2), BasicBlock(c_out, c_out, 1)]
        c_in = c_out
    backbone = nn.Sequential(
        Standardize(mean, std),
        nn.Conv2d(in_shape[0], width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    config = dict(arch="resnet18", in_shape=tuple(in_shape), num_classes=num_classes, mean=tuple(mean),
                  std=tuple(std), width=width)
    return Classifier(backbone, nn.Linear(c_in, num_classes), config)


def _fast_group(c_in: int, c_out: int) -> nn.Sequential:
    # conv, pool, then batch norm and GELU on the pooled (4x smaller) map: the order airbench uses,
    # because normalising after the pool costs a quarter of the work
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(c_out), nn.GELU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU(),
    )


def fastnet(in_shape: tuple[int, int, int], num_classes: int, mean: Stats, std: Stats,
            widths: tuple[int, int, int] = (64, 256, 256)) -> Classifier:
    """A small, fast CIFAR net after Keller Jordan's airbench: the shape that reaches about 94% on
    CIFAR-10 in seconds on one GPU (with airbench's full recipe; see ``default_recipe``).

    A 2x2 convolution stem (``2 * 4 * channels`` filters, which :func:`whiten_stem` can set to a
    frozen whitening of the data's 2x2 patches), then three groups of ``conv-pool-BN-GELU,
    conv-BN-GELU`` of the given ``widths``, a global max-pool and the linear ``head``.
    About 2 million parameters, against ResNet-18's 11 million.
    """
    c = in_shape[0]
    stem_width = 2 * 4 * c  # every 2x2 patch direction, with both signs (what the whitening fills in)
    groups, c_in = [], stem_width
    for width in widths:
        groups.append(_fast_group(c_in, width))
        c_in = width
    backbone = nn.Sequential(
        Standardize(mean, std),
        nn.Conv2d(c, stem_width, 2, bias=True), nn.GELU(),
        *groups, nn.AdaptiveMaxPool2d(1), nn.Flatten(),
    )
    config = dict(arch="fastnet", in_shape=tuple(in_shape), num_classes=num_classes, mean=tuple(mean),
                  std=tuple(std), widths=tuple(widths))
    return Classifier(backbone, nn.Linear(c_in, num_classes), config)


@torch.no_grad()
def whiten_stem(model: Classifier, images: Tensor, eps: float = 5e-4) -> Classifier:
    """Set a :func:`fastnet`'s 2x2 stem to whiten the 2x2 patches of ``images``, and freeze it.

    Each filter is an eigenvector of the patch covariance divided by the square root of its
    eigenvalue (plus ``eps``), once with each sign, so the stem's outputs are decorrelated and of
    unit variance: airbench's trick, which lets training start from useful low-level features.

    Args:
        model: a ``fastnet`` model (changed in place and returned).
        images: a few thousand training images, uint8 or floats in [0, 1], ``[N, C, H, W]``.
        eps: added to the eigenvalues so near-constant directions are not blown up.
    """
    if model.config.get("arch") != "fastnet":
        raise ValueError(f"whiten_stem needs a 'fastnet' model, got {model.config.get('arch')!r}; build one with "
                         "model_for(data, 'fastnet')")
    standardize, stem = model.backbone[0], model.backbone[1]
    if images.ndim != 4 or images.shape[1] != stem.in_channels:
        raise ValueError(f"images must be [N, {stem.in_channels}, H, W], got shape {tuple(images.shape)}")
    x = standardize(images.to(stem.weight.device))
    patches = x.unfold(2, 2, 1).unfold(3, 2, 1)  # [N, C, H-1, W-1, 2, 2]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, stem.in_channels * 4).double()
    patches = patches - patches.mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
    filters = (eigenvectors.T / (eigenvalues + eps).sqrt()[:, None]).view(-1, stem.in_channels, 2, 2)
    stem.weight.copy_(torch.cat([filters, -filters]).to(stem.weight.dtype))
    stem.bias.zero_()
    stem.requires_grad_(False)  # airbench keeps the whitening fixed; the optimizer skips gradless tensors
    return model


ARCHITECTURES = {"mlp": mlp, "cnn": small_cnn, "resnet18": resnet18, "fastnet": fastnet}


def build_model(arch: str, in_shape: tuple[int, int, int], num_classes: int, mean: Stats, std: Stats,
                seed: int | None = None, **kwargs) -> Classifier:
    """Build a freshly initialised model; ``seed`` makes the initial weights reproducible."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if seed is None:
        return ARCHITECTURES[arch](tuple(in_shape), num_classes, mean, std, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ARCHITECTURES[arch](tuple(in_shape), num_classes, mean, std, **kwargs)


def model_for(data: ImageDataset, arch: str = "mlp", seed: int | None = None, **kwargs) -> Classifier:
    """A fresh model sized for ``data`` (channels, image size, classes, normalisation), on its device."""
    shape = (data.channels, data.image_size, data.image_size)
    return build_model(arch, shape, data.num_classes, data.mean, data.std, seed=seed, **kwargs).to(data.device)


def fresh_copy(model: Classifier, seed: int | None = None) -> Classifier:
    """A newly initialised model of the same architecture as ``model``, on the same device."""
    device = next(model.parameters()).device
    return build_model(**model.config, seed=seed).to(device)


def clone(model: nn.Module) -> nn.Module:
    """An independent copy (weights and buffers), so a method never writes to its input."""
    return copy.deepcopy(model)


def head_of(model: nn.Module) -> nn.Linear:
    """The model's final linear layer, or a clear error if it has none."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear) or not callable(getattr(model, "features", None)):
        raise TypeError(f"{type(model).__name__} has no final linear layer at `.head` fed by `.features(x)`; "
                        "classifier-level methods need both. Build the model with unlearnkit.models "
                        "(every model there has them), or wrap yours so that `model.head` is the last nn.Linear and "
                        "`model.features(x)` its input.")
    return head
