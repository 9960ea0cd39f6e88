"""Unlearning methods, one module each, all with the calling convention of :mod:`.base`.

Importing this package imports every method module, which registers its methods; ``METHODS`` lists
them by name, retrain first. Call one by name with ``unlearn("ga", model, data, split, ...)`` or
import its module (``from unlearnkit.methods import sisa``) for the method's own tools.
"""
# ruff: noqa: I001 - import order is registry order, and retrain, the reference, comes first

from .base import METHODS, Stopwatch, UnlearningResult, get_method, register, unlearn
from . import retrain, sisa, gradient, influence, imu, mimu

__all__ = ["METHODS", "Stopwatch", "UnlearningResult", "get_method", "gradient", "imu", "influence", "mimu",
           "register", "retrain", "sisa", "unlearn"]
