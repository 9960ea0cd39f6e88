"""The one calling convention of every unlearning method, and the registry of methods by name.

A method is a function ``method(model, data, split, **hyper) -> UnlearningResult``. It never
writes to ``model`` (it works on a copy, or on a masked view), and it returns the new model, the
seconds the unlearning step took, and a ``details`` dict of what it did.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ..data import ImageDataset, Split, check_split
from ..device import synchronize


@dataclass
class UnlearningResult:
    """What an unlearning method returns.

    Attributes:
        model: the unlearned model (a new module, or a masked view of the original).
        seconds: wall-clock time of the unlearning step itself, GPU work included.
        method: the registry name of the method.
        details: what it did (hyper-parameters, steps taken, samples touched, ...).
    """

    model: nn.Module
    seconds: float
    method: str
    details: dict[str, Any] = field(default_factory=dict)


class UnlearningMethod(Protocol):
    """What the registry holds: ``method(model, data, split, **hyper) -> UnlearningResult``."""

    def __call__(self, model: nn.Module, data: ImageDataset, split: Split, **hyper: Any) -> UnlearningResult: ...


METHODS: dict[str, UnlearningMethod] = {}


def register(name: str) -> Callable[[UnlearningMethod], UnlearningMethod]:
    """Decorator adding a method to the registry under ``name``."""

    def add(method: UnlearningMethod) -> UnlearningMethod:
        if name in METHODS and METHODS[name] is not method:
            raise ValueError(f"an unlearning method named {name!r} is already registered")
        METHODS[name] = method
        return method

    return add


def get_method(name: str) -> UnlearningMethod:
    """The registered method called ``name``."""
    if name not in METHODS:
        raise KeyError(f"no unlearning method {name!r}; registered: {', '.join(METHODS)}")
    return METHODS[name]


def unlearn(name: str, model: nn.Module, data: ImageDataset, split: Split, **hyper: Any) -> UnlearningResult:
    """Run the registered method ``name``: ``unlearn("retrain", model, data, split, recipe=...)``."""
    return get_method(name)(model, data, split, **hyper)


def _same_device(a: torch.device, b: torch.device) -> bool:
    # "cuda" and "cuda:0" name the same GPU when the current device is the first one
    default = torch.cuda.current_device() if a.type == "cuda" and torch.cuda.is_available() else 0

    def index(device: torch.device) -> int:
        return device.index if device.index is not None else default

    return a.type == b.type and index(a) == index(b)


def check_call(model: nn.Module, data: ImageDataset, split: Split) -> None:
    """The checks every method makes before it starts: the argument types, one device for the model and
    the data, and the split itself (:func:`unlearnkit.data.check_split`); each error says how to fix it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if not isinstance(data, ImageDataset):
        raise TypeError(f"data must be an unlearnkit ImageDataset (from load_dataset), got {type(data).__name__}")
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise ValueError("the model has no parameters, so there is nothing to unlearn")
    if not _same_device(parameter.device, data.device):
        raise ValueError(f"the model is on {parameter.device} but the data on {data.device}; move one of them, "
                         "e.g. model.to(data.device)")
    check_split(data, split)


class Stopwatch:
    """Times a block, synchronising the device at both ends: ``with Stopwatch(device) as t: ...; t.seconds``."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start
