"""Unlearning methods, one module each, all with the calling convention of :mod:`.base`.

Importing this package registers every method; ``METHODS`` lists them by name, retrain first.
"""

from .base import METHODS, Stopwatch, UnlearningResult, get_method, register, unlearn
from .retrain import retrain  # noqa: I001 - imported first so that retrain heads the registry
from .gradient import finetune, gradient_ascent, neggrad_plus, random_labels

__all__ = ["METHODS", "Stopwatch", "UnlearningResult", "finetune", "get_method", "gradient_ascent", "neggrad_plus",
           "random_labels", "register", "retrain", "unlearn"]
