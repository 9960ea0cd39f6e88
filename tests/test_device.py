import subprocess
import sys

import pytest
import torch

from unlearnkit.device import get_device, seed_everything, to_device_async


def test_auto_picks_an_available_device_and_says_which(capsys):
    device = get_device("auto")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert device.type == expected
    assert "Using" in capsys.readouterr().out


def test_asking_for_a_missing_gpu_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        get_device("cuda")


def test_colab_without_gpu_gets_instructions(monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setitem(sys.modules, "google.colab", object())
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    get_device()
    assert "Change runtime type" in capsys.readouterr().out


def test_seed_everything_makes_draws_repeat():
    seed_everything(5)
    a = torch.rand(3)
    seed_everything(5)
    assert torch.equal(a, torch.rand(3))



def test_to_device_async_is_the_tensor_itself_on_the_cpu():
    draws = torch.randint(0, 9, (2, 5))
    assert to_device_async(draws, torch.device("cpu")) is draws


def test_the_kit_hides_only_the_jit_script_deprecation_that_torch_raises_for_itself():
    # a fresh interpreter: forward-mode AD loads its decompositions, and torch-geometric its scripted helpers, once
    code = """
import warnings
import torch
import unlearnkit
import torch_geometric.nn
square = lambda t: (t ** 2).sum()
torch.func.jvp(torch.func.grad(square), (torch.ones(3),), (torch.ones(3),))
warnings.warn("a learner's own FutureWarning", FutureWarning)
"""
    run = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True, text=True)
    assert "torch.jit.script" not in run.stderr, run.stderr
    assert "a learner's own FutureWarning" in run.stderr, "the kit must not hide other FutureWarnings"
