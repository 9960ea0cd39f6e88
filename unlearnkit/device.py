"""Choosing where tensors live: one ``get_device()`` for the whole course."""

from __future__ import annotations

import random
import sys

import numpy as np
import torch

_COLAB_HINT = (
    "You are on Colab without a GPU. For the full-mode lessons turn one on: "
    "Runtime > Change runtime type > Hardware accelerator > T4 GPU, then re-run the notebook."
)


def get_device(preferred: str | torch.device | None = "auto", verbose: bool = True) -> torch.device:
    """Return the device to compute on: CUDA, then Apple's MPS, then the CPU.

    Args:
        preferred: ``"auto"`` (or ``None``) picks the best available device; any other value
            (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) is used as given, after checking
            that it exists.
        verbose: print which device was chosen and, on Colab without a GPU, how to get one.

    Raises:
        ValueError: if the requested device is not available on this machine.
    """
    if preferred not in (None, "auto"):
        device = torch.device(preferred)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {preferred!r} was asked for but CUDA is not available; use 'auto' or 'cpu'")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {preferred!r} was asked for but MPS is not available; use 'auto' or 'cpu'")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")

    if verbose:
        if device.type == "cuda":
            print(f"Using GPU: {torch.cuda.get_device_name(device)}")
        else:
            print(f"Using {device.type.upper()}.")
            if device.type == "cpu" and "google.colab" in sys.modules:
                print(_COLAB_HINT)
    return device


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch, and return a torch generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def to_device_async(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor.to(device)`` for a small CPU tensor (random draws, say) that a GPU loop needs every step.

    A plain copy to the GPU makes the CPU wait until every queued kernel has run, so the CPU could no
    longer queue step t+1 while the GPU computes step t. Staged through pinned memory, the copy joins
    the GPU's queue instead. On the CPU it is ``tensor`` itself.
    """
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
