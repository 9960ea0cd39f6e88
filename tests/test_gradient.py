import math

import pytest
import torch
import torch.nn.functional as F

from unlearnkit.evaluate import accuracy, confidences
from unlearnkit.methods.base import METHODS
from unlearnkit.methods.gradient import (
    DEFAULTS,
    default_hyper,
    finetune,
    gradient_ascent,
    neggrad_plus,
    random_labels,
    wrong_labels,
)
from unlearnkit.models import model_for
from unlearnkit.train import Recipe, batches, fit

ALL = [gradient_ascent, neggrad_plus, finetune, random_labels]


@pytest.fixture(scope="module")
def model(data, small_split):
    """A small MLP trained for a few epochs on the small split (not cached: fast enough)."""
    trained, _ = fit(data, small_split.train, Recipe(epochs=3, batch_size=128, lr=0.05), arch="mlp", seed=0,
                     cache=False, progress=False)
    return trained


def test_registered_under_their_names():
    assert METHODS["ga"] is gradient_ascent and METHODS["neggrad+"] is neggrad_plus
    assert METHODS["finetune"] is finetune and METHODS["random_labels"] is random_labels


def test_gradient_ascent_is_the_plain_update_rule(data, small_split, model):
    lr, batch_size, seed = 0.005, 64, 3
    result = gradient_ascent(model, data, small_split, lr=lr, epochs=1, batch_size=batch_size, seed=seed)
    # theta <- theta + lr * grad CE(forget batch), batches in the same seeded order.
    manual = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    reference = {name: p for (name, _), p in zip(model.named_parameters(), manual, strict=True)}
    for batch in batches(small_split.forget, batch_size, torch.Generator().manual_seed(seed)):
        logits = torch.func.functional_call(model, reference, (data.images[batch],))
        grads = torch.autograd.grad(F.cross_entropy(logits, data.labels[batch]), manual)
        with torch.no_grad():
            for p, g in zip(manual, grads, strict=True):
                p += lr * g
    for p, q in zip(result.model.parameters(), manual, strict=True):
        torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6)
    assert result.details["steps"] == len(list(batches(small_split.forget, batch_size, shuffle=False)))


@pytest.mark.parametrize("method", ALL, ids=lambda m: m.__name__)
def test_methods_never_modify_their_input_and_report_what_they_did(data, small_split, model, method):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = method(model, data, small_split, epochs=2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{method.__name__} changed the input model's {k}"
    assert result.model is not model and result.seconds > 0
    details = result.details
    assert details["epochs_run"] == 2 and not details["stopped_early"] and details["steps"] > 0
    assert len(details["trace"]) == len(details["trace_steps"]) == 3  # before the first step, then per epoch
    assert details["trace"][0] == pytest.approx(accuracy(model, data, small_split.forget))
    assert details["trace"][-1] == pytest.approx(accuracy(result.model, data, small_split.forget))


@pytest.mark.parametrize("method", [gradient_ascent, neggrad_plus], ids=lambda m: m.__name__)
def test_ascent_stops_as_soon_as_forget_accuracy_reaches_the_target(data, small_split, model, method):
    start = accuracy(model, data, small_split.forget)
    target = start - 0.05
    result = method(model, data, small_split, lr=0.02, epochs=20, target_forget_acc=target, check_every=1)
    details = result.details
    assert details["stopped_early"] and details["target_forget_acc"] == target
    assert details["trace"][-1] <= target < min(details["trace"][:-1])  # the first check at or below it
    assert details["trace_steps"][-1] == details["steps"] == len(details["trace"]) - 1
    assert accuracy(result.model, data, small_split.forget) == pytest.approx(details["trace"][-1])


def test_a_target_already_met_takes_no_step(data, small_split, model):
    result = gradient_ascent(model, data, small_split, target_forget_acc=1.0)
    assert result.details["steps"] == 0 and result.details["stopped_early"]
    for p, q in zip(result.model.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_divergence_raises_and_names_the_step_size(data, small_split, model):
    with pytest.raises(FloatingPointError, match=r"lr=1e\+06"):
        gradient_ascent(model, data, small_split, lr=1e6, epochs=3)


def test_random_labels_are_always_wrong_and_cover_the_other_classes():
    labels = torch.arange(10).repeat(500)
    fake = wrong_labels(labels, 10, torch.Generator().manual_seed(0))
    assert not (fake == labels).any()
    for c in range(10):
        assert set(fake[labels == c].tolist()) == set(range(10)) - {c}


def test_random_labels_pulls_the_forget_set_down_more_than_the_retain_set(data, small_split, model):
    result = random_labels(model, data, small_split, lr=0.03, epochs=3)
    drop = {name: (confidences(model, data, idx) - confidences(result.model, data, idx)).mean().item()
            for name, idx in (("forget", small_split.forget), ("retain", small_split.retain))}
    assert drop["forget"] > drop["retain"] + 0.03, drop


@pytest.mark.parametrize("bad, message", [
    ({"lr": -0.1}, "lr must be a positive"),
    ({"lr": float("nan")}, "lr must be a positive"),
    ({"epochs": 0}, "epochs must be a positive integer"),
    ({"batch_size": 1}, "batch_size must be an integer of at least 2"),
    ({"target_forget_acc": 87.5}, r"did you mean 0.875"),
    ({"check_every": 0}, "check_every must be"),
    ({"momentum": 1.0}, "momentum must be in"),
    ({"schedule": "onecycle"}, "schedule must be one of"),
])
def test_bad_hyper_parameters_are_rejected_with_a_fix(data, small_split, model, bad, message):
    with pytest.raises(ValueError, match=message):
        gradient_ascent(model, data, small_split, **bad)


def test_bad_beta_and_bad_arguments(data, small_split, model):
    with pytest.raises(ValueError, match="beta must be in"):
        neggrad_plus(model, data, small_split, beta=1.5)
    with pytest.raises(TypeError, match="Split"):
        finetune(model, data, small_split.forget)
    with pytest.raises(ValueError, match="unknown method"):
        default_hyper("gd", model)


def test_defaults_follow_the_architecture(data, model):
    cnn = model_for(data, "cnn", seed=0)
    for method, table in DEFAULTS.items():
        assert default_hyper(method, model) == {"schedule": "constant", **table["mlp"]}
        assert default_hyper(method, cnn) == {"schedule": "constant", **table["cnn"]}
        assert default_hyper(method, torch.nn.Linear(2, 2)) == default_hyper(method, model)  # unknown: the MLP's
    assert default_hyper("finetune", cnn)["epochs"] != default_hyper("finetune", model)["epochs"]


def test_without_a_target_the_trace_is_recorded_but_not_timed(data, small_split, model):
    """The trace only feeds plots when nothing stops on it, so its evaluations are not the method's time."""
    result = gradient_ascent(model, data, small_split, epochs=3)
    assert len(result.details["trace"]) == 4 and result.details["trace_seconds"] > 0
    stopped = gradient_ascent(model, data, small_split, epochs=3, target_forget_acc=0.0)
    assert stopped.details["trace_seconds"] == 0.0  # with a target the checks are part of the method


def test_cosine_schedule_anneals_the_step_to_zero_along_a_cosine(data, small_split, model):
    """Step t of T takes lr * (1 + cos(pi t / T)) / 2, so the last step is the smallest and the next would be zero."""
    lr, batch_size, seed = 0.005, 64, 3
    result = gradient_ascent(model, data, small_split, lr=lr, epochs=2, batch_size=batch_size, seed=seed,
                             schedule="cosine")
    manual = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    reference = {name: p for (name, _), p in zip(model.named_parameters(), manual, strict=True)}
    generator = torch.Generator().manual_seed(seed)
    steps = [batch for _ in range(2) for batch in batches(small_split.forget, batch_size, generator)]
    for t, batch in enumerate(steps):
        logits = torch.func.functional_call(model, reference, (data.images[batch],))
        grads = torch.autograd.grad(F.cross_entropy(logits, data.labels[batch]), manual)
        with torch.no_grad():
            for p, g in zip(manual, grads, strict=True):
                p += lr * (1 + math.cos(math.pi * t / len(steps))) / 2 * g
    for p, q in zip(result.model.parameters(), manual, strict=True):
        torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6)
    assert result.details["final_lr"] == pytest.approx(0.0, abs=1e-12)
    assert finetune(model, data, small_split, lr=lr, epochs=1).details["final_lr"] == lr  # the default: constant
