"""Tests of IMU (unlearnkit.methods.imu): scores, selection, weights, the ascent loop, retain-freeness."""

import copy
import dataclasses
import math
import time

import pytest
import torch
import torch.nn.functional as F

import unlearnkit.methods.imu as imu_module
from unlearnkit.data import load_dataset, random_split
from unlearnkit.evaluate import accuracy
from unlearnkit.head import head_inputs
from unlearnkit.methods.base import get_method
from unlearnkit.methods.imu import at_forget_accuracy, imu, imu_weights, influence_scores, weighted_ascent
from unlearnkit.models import clone
from unlearnkit.train import Recipe, fit


@pytest.fixture(scope="module")
def setting():
    data = load_dataset("embedded", "cpu")
    split = random_split(data, 0.1, seed=0, n_train=800, n_test=300)
    model, _ = fit(data, split.train, Recipe(epochs=3, batch_size=64, lr=0.05), arch="mlp", seed=0, cache=False,
                   progress=False, hidden=(32, 16))
    return data, split, model


def head_tensors(model, data, split):
    """Float64 features, logits and labels of the forget set, so references can be exact."""
    head = copy.deepcopy(model.head).double()
    features = head_inputs(model, data, split.forget).double()
    with torch.no_grad():
        logits = head(features)
    return head, features, logits, data.labels[split.forget]


def autograd_grads(head, features, labels):
    """Per-sample head gradients the slow way (a loop, as the authors' code does)."""
    rows = []
    for h, y in zip(features, labels, strict=True):
        loss = F.cross_entropy(head(h[None]), y[None])
        gw, gb = torch.autograd.grad(loss, [head.weight, head.bias])
        rows.append(torch.cat([gw.flatten(), gb]))
    return torch.stack(rows)


def test_fisher_scores_match_the_definition(setting):
    data, split, model = setting
    head, features, logits, labels = head_tensors(model, data, split)
    g = autograd_grads(head, features, labels)
    fisher = g.square().mean(0) + 0.01
    expected = -(g @ (g.mean(0) / fisher))
    torch.testing.assert_close(influence_scores(features, logits, labels), expected, rtol=1e-9, atol=1e-12)


def test_exact_scores_match_an_autograd_hessian(setting):
    data, split, model = setting
    head, features, logits, labels = head_tensors(model, data, split)
    params = torch.cat([head.weight.detach().flatten(), head.bias.detach()])
    c, d = head.weight.shape

    def mean_loss(flat):
        return F.cross_entropy(features @ flat[: c * d].view(c, d).T + flat[c * d:], labels)

    hessian = torch.autograd.functional.hessian(mean_loss, params, vectorize=True)
    hessian += 0.01 * torch.eye(len(params), dtype=torch.float64)
    g = autograd_grads(head, features, labels)
    expected = -(g @ torch.linalg.solve(hessian, g.mean(0)))
    torch.testing.assert_close(influence_scores(features, logits, labels, curvature="exact"), expected,
                               rtol=1e-9, atol=1e-12)


def test_weights_keep_negative_scores_and_clip_at_the_percentile():
    scores = torch.tensor([-9.0, -4.0, -1.0, 0.5, 2.0, -0.25, -100.0, 0.0], dtype=torch.float64)
    kept, weights = imu_weights(scores)
    assert kept.tolist() == [True, True, True, False, False, True, True, False]
    raw = scores[kept].abs().sqrt()
    ceiling = torch.quantile(raw, 0.93)
    torch.testing.assert_close(weights[kept], raw.clamp(max=ceiling).float())
    assert (weights[~kept] == 0).all()
    assert weights.max() < 10  # the outlier (-100 -> 10) was clipped


def test_top_fraction_keeps_the_largest_negative_scores():
    scores = torch.tensor([-9.0, -4.0, -1.0, 0.5, -0.25, -100.0], dtype=torch.float64)
    kept, _ = imu_weights(scores, top_fraction=0.4)  # 5 negative -> ceil(2) kept
    assert kept.tolist() == [True, False, False, False, False, True]


@pytest.mark.parametrize("kwargs", [dict(top_fraction=0), dict(top_fraction=1.5), dict(clip_percentile=0)])
def test_weights_reject_bad_hyper_parameters(kwargs):
    with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be in"):
        imu_weights(torch.tensor([-1.0]), **kwargs)


def test_result_carries_scores_selection_weights_and_history(setting):
    data, split, model = setting
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = imu(model, data, split, epochs=2)
    assert get_method("imu") is imu
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), "imu wrote to the model it was given"
    d = result.details
    n = len(split.forget)
    assert d["scores"].shape == (n,) and d["kept"].shape == (n,) and d["weights"].shape == (n,)
    assert torch.equal(d["kept"], d["scores"] < 0)
    assert torch.equal(d["weights"] > 0, d["kept"])
    assert [h["epoch"] for h in d["history"]] == [0, 1, 2]
    assert result.seconds > 0
    # head only: the backbone is untouched, the head moved
    for (name, p), q in zip(result.model.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q) != name.startswith("head"), name


def test_retain_free_garbage_retain_images_give_bit_identical_results(setting):
    data, split, model = setting
    garbage = data.images.clone()
    garbage[split.retain] = torch.randint(0, 256, garbage[split.retain].shape, dtype=torch.uint8)
    spoiled = dataclasses.replace(data, images=garbage)
    for kwargs in (dict(), dict(weighting="uniform", params="all", alpha=0.0), dict(curvature="exact")):
        clean = imu(model, data, split, epochs=2, track=False, **kwargs)
        dirty = imu(model, spoiled, split, epochs=2, track=False, **kwargs)
        assert torch.equal(clean.details["scores"], dirty.details["scores"])
        for a, b in zip(clean.model.state_dict().values(), dirty.model.state_dict().values(), strict=True):
            assert torch.equal(a, b), f"retain images changed the unlearned model ({kwargs})"
    # recording accuracies reads the retain set, but never feeds back into training
    tracked = imu(model, spoiled, split, epochs=2, track=True)
    untracked = imu(model, data, split, epochs=2, track=False)
    for a, b in zip(tracked.model.state_dict().values(), untracked.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_uniform_and_shuffled_weightings(setting):
    data, split, model = setting
    base = imu(model, data, split, epochs=1, track=False)
    uniform = imu(model, data, split, epochs=1, track=False, weighting="uniform")
    shuffled = imu(model, data, split, epochs=1, track=False, weighting="shuffled", seed=3)
    assert torch.equal(uniform.details["weights"], torch.ones(len(split.forget)))
    assert torch.equal(shuffled.details["weights"].sort().values, base.details["weights"].sort().values)
    assert not torch.equal(shuffled.details["weights"], base.details["weights"])


def test_plain_gradient_ascent_matches_a_hand_written_loop(setting):
    data, split, model = setting
    result = imu(model, data, split, weighting="uniform", params="all", alpha=0.0, weight_decay=0.0, momentum=0.0,
                 lr=0.05, epochs=1, batch_size=len(split.forget), track=False)
    manual = clone(model)
    loss = -F.cross_entropy(manual(data.images[split.forget]), data.labels[split.forget])
    manual.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in manual.parameters():
            p -= 0.05 * p.grad
    for a, b in zip(result.model.parameters(), manual.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_stop_at_stops_at_the_first_crossing(setting):
    data, split, model = setting
    result = imu(model, data, split, lr=0.05, epochs=20, eval_every=1, stop_at=50.0)
    history = result.details["history"]
    assert history[-1]["forget acc"] <= 50.0
    assert all(h["forget acc"] > 50.0 for h in history[:-1])
    assert result.details["steps"] == history[-1]["step"] == len(history) - 1


def test_at_forget_accuracy_interpolates_the_first_crossing():
    history = [{"epoch": 0, "forget acc": 90.0, "test acc": 80.0},
               {"epoch": 1, "forget acc": 86.0, "test acc": 78.0},
               {"epoch": 2, "forget acc": 70.0, "test acc": 60.0}]
    point = at_forget_accuracy(history, 82.0)
    assert point["epoch"] == pytest.approx(1.25) and point["test acc"] == pytest.approx(73.5)
    assert at_forget_accuracy(history, 95.0)["epoch"] == 0
    assert math.isnan(at_forget_accuracy(history, 10.0)["test acc"])


def test_bad_input_is_rejected_with_a_clear_message(setting):
    data, split, model = setting
    with pytest.raises(ValueError, match="weighting"):
        imu(model, data, split, weighting="ranked")
    with pytest.raises(ValueError, match="one weight per forget sample"):
        imu(model, data, split, weighting=torch.ones(3))
    with pytest.raises(ValueError, match="params"):
        imu(model, data, split, params="backbone")
    with pytest.raises(ValueError, match="curvature"):
        imu(model, data, split, curvature="kfac")
    with pytest.raises(ValueError, match="track"):
        imu(model, data, split, track=False, stop_at=10.0)
    with pytest.raises(ValueError, match="every weight is 0"):
        weighted_ascent(clone(model), data, split.forget, torch.zeros(len(split.forget)))
    with pytest.raises(ValueError, match=">= 0"):
        weighted_ascent(clone(model), data, split.forget, -torch.ones(len(split.forget)))
    with pytest.raises(ValueError, match="params='head' only"):
        weighted_ascent(clone(model), data, split.forget, torch.ones(len(split.forget)), params="all",
                        features=torch.zeros(len(split.forget), model.head.in_features))
    with pytest.raises(ValueError, match="give a monitor"):
        weighted_ascent(clone(model), data, split.forget, torch.ones(len(split.forget)), eval_every=1)
    with pytest.raises(TypeError, match="final linear layer"):
        imu(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)), data, split)


def test_recorded_accuracies_are_those_of_the_returned_model(setting):
    data, split, model = setting
    for kwargs in (dict(), dict(weighting="uniform", params="all", alpha=0.0)):
        result = imu(model, data, split, epochs=2, **kwargs)
        last = result.details["history"][-1]
        for part in ("forget", "retain", "test"):
            measured = 100 * accuracy(result.model, data, getattr(split, part))
            assert last[f"{part} acc"] == pytest.approx(measured, abs=1e-4), (part, kwargs)


def test_imu_rejects_settings_that_would_do_nothing_and_restores_what_was_frozen(setting):
    data, split, model = setting
    for bad, message in [({"batch_size": 1}, "^batch_size=1 "), ({"epochs": 0}, "^epochs=0 "),
                         ({"stop_at": 250.0}, "in %"), ({"stop_at": 0.9}, "not a fraction.*stop_at=90"),
                         ({"track": False, "eval_every": 1}, "track=True")]:
        with pytest.raises(ValueError, match=message):
            imu(model, data, split, **bad)
    frozen = clone(model)
    first = next(frozen.backbone.parameters())
    first.requires_grad_(False)  # a backbone layer the caller froze stays frozen in the result
    result = imu(frozen, data, split, params="all", epochs=1)
    flags = [p.requires_grad for p in result.model.parameters()]
    assert flags == [p.requires_grad for p in frozen.parameters()] and not flags[0]


@pytest.mark.parametrize("weighting, params, pays", [("influence", "head", True), ("uniform", "head", True),
                                                      ("uniform", "all", False)])
def test_each_variant_pays_for_the_forward_pass_it_uses(setting, monkeypatch, weighting, params, pays):
    """The head's inputs for the forget set cost a forward pass: a variant that needs them (for the scores, or to
    ascend on the head alone) counts it; plain ascent on every parameter uses neither and does not."""
    data, split, model = setting

    def slow_head_inputs(*args, **kwargs):
        time.sleep(0.3)
        return head_inputs(*args, **kwargs)

    monkeypatch.setattr(imu_module, "head_inputs", slow_head_inputs)
    alpha = 0.0 if params == "all" else 0.2
    result = imu(model, data, split, weighting=weighting, params=params, alpha=alpha, epochs=1, track=False)
    assert (result.seconds >= 0.3) == pays, result.seconds
