import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from unlearnkit.data import load_dataset, random_split


@pytest.fixture(scope="session")
def data():
    """The embedded Fashion-MNIST subset, on the CPU."""
    return load_dataset("embedded")


@pytest.fixture(scope="session")
def small_split(data):
    """A small split (2,000 train / 500 test, 10% forgotten) for fast tests."""
    return random_split(data, 0.1, seed=0, n_train=2000, n_test=500)


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path, monkeypatch):
    """Each unit test trains into its own model cache, so tests never see each other's models.

    Lessons run against the shared cache, as they do for a learner: the cache is keyed by everything
    that determines a model, and a course run before the tests makes them faster.
    """
    if request.node.get_closest_marker("notebook") is None:
        monkeypatch.setenv("UNLEARNKIT_DATA", str(tmp_path / "data"))
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def benchmark_script():
    """Import a script of ``benchmarks/`` by name (``benchmark_script("bench_cifar")``); it is not a package."""

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the script runs
        spec.loader.exec_module(module)
        return module

    return load
