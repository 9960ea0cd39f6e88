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


def mlp(in_shape: tuple[int, int, int], num_classes: int, mean, std, hidden: tuple[int, ...] = (256, 128),
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


def small_cnn(in_shape: tuple[int, int, int], num_classes: int, mean, std, width: int = 32) -> Classifier:
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


def resnet18(in_shape: tuple[int, int, int], num_classes: int, mean, std, width: int = 64) -> Classifier:
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


ARCHITECTURES = {"mlp": mlp, "cnn": small_cnn, "resnet18": resnet18}


def build_model(arch: str, in_shape, num_classes: int, mean, std, seed: int | None = None, **kwargs) -> Classifier:
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
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{type(model).__name__} has no final linear layer at `.head`; classifier-level methods "
                        "need one. Build the model with unlearnkit.models (every model there has one), or wrap "
                        "yours so that `model.head` is the last nn.Linear and `model.features(x)` its input.")
    return head
