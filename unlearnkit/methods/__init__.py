"""Unlearning methods, one module each, all with the calling convention of :mod:`.base`.

Importing this package registers every method; ``METHODS`` lists them by name, retrain first.
"""
# ruff: noqa: I001 - import order is registry order, and retrain, the reference, comes first

from .base import METHODS, Stopwatch, UnlearningResult, get_method, register, unlearn
from .retrain import retrain
from .sisa import SISAEnsemble, sisa
from .gradient import finetune, gradient_ascent, neggrad_plus, random_labels
from .influence import newton_head
from .imu import imu
from .mimu import MaskedModel, mimu

__all__ = ["METHODS", "MaskedModel", "SISAEnsemble", "Stopwatch", "UnlearningResult", "finetune", "get_method",
           "gradient_ascent", "imu", "mimu", "neggrad_plus", "newton_head", "random_labels", "register", "retrain",
           "sisa", "unlearn"]
