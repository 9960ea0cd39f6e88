"""Unlearning methods, one module each, all with the calling convention of :mod:`.base`."""

from .base import METHODS, Stopwatch, UnlearningResult, get_method, register, unlearn
from .retrain import retrain

__all__ = ["METHODS", "Stopwatch", "UnlearningResult", "get_method", "register", "retrain", "unlearn"]
