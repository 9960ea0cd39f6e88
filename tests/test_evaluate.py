import math

import pytest
import torch

from unlearnkit.evaluate import (
    accuracy,
    assert_same_model,
    attack_auc,
    comparison_table,
    evaluate_model,
    forward_in_batches,
    js_divergence,
    lira_offline,
    mia_efficacy,
    per_class_accuracy,
    predict_logits,
    scaled_logit_confidence,
    threshold_attack,
    tpr_at_fpr,
)
from unlearnkit.models import clone, model_for
from unlearnkit.train import Recipe, fit

RECIPE = Recipe(epochs=3, batch_size=128, lr=0.05)


@pytest.fixture(scope="module")
def overfit(data):
    """An MLP that memorises 200 training images (many epochs, no weight decay)."""
    from unlearnkit.data import random_split
    split = random_split(data, 100, seed=0, n_train=200, n_test=1000)
    model, _ = fit(data, split.train, Recipe(epochs=60, batch_size=32, lr=0.05, weight_decay=0.0), cache=False,
                   progress=False)
    return split, model


def test_attack_auc_of_one_distribution_is_near_half_and_of_separated_scores_near_one():
    g = torch.Generator().manual_seed(0)
    same = attack_auc(torch.rand(2000, generator=g), torch.rand(2000, generator=g))
    assert abs(same - 0.5) < 0.04
    assert attack_auc(torch.rand(500, generator=g) + 1, torch.rand(500, generator=g)) == 1.0


def test_tpr_at_fpr_reads_the_roc_curve_at_a_low_false_positive_rate():
    nonmembers = torch.arange(1000.0)  # threshold at the 99th percentile: 989.01
    members = torch.tensor([995.0, 2000.0, 10.0, 20.0])
    assert tpr_at_fpr(members, nonmembers, 0.01) == 0.5


def test_threshold_attack_separates_members_of_an_overfit_model(data, overfit):
    split, model = overfit
    members_vs_test = threshold_attack(model, data, split.forget, split.test)
    held_out_vs_test = threshold_attack(model, data, split.test[:500], split.test[500:])
    assert members_vs_test > 0.65, members_vs_test  # 0.73-0.77 over seeds
    assert abs(held_out_vs_test - 0.5) < 0.07, held_out_vs_test


def test_mia_efficacy_calls_training_members_members(data, overfit):
    split, model = overfit
    # Forget samples were trained on, exactly like retain samples: few should look like non-members.
    assert mia_efficacy(model, data, split) < 0.3


def test_js_divergence_is_zero_for_identical_and_ln2_for_disjoint():
    p = torch.tensor([[0.2, 0.8], [1.0, 0.0]])
    assert torch.allclose(js_divergence(p, p), torch.zeros(2), atol=1e-6)
    q = torch.tensor([[0.0, 1.0]])
    assert math.isclose(js_divergence(torch.tensor([[1.0, 0.0]]), q).item(), math.log(2), rel_tol=1e-5)


def test_the_retrain_row_comes_first_with_zero_gap(data, small_split):
    oracle, seconds = fit(data, small_split.retain, RECIPE, seed=0, progress=False)
    original, _ = fit(data, small_split.train, RECIPE, seed=0, progress=False)
    table = comparison_table({"original": (original, 0.5), "retrain": (oracle, seconds)}, data, small_split)
    assert list(table.index) == ["retrain", "original"]
    assert list(table.columns) == ["forget acc", "retain acc", "test acc", "MIA", "gap", "JS to retrain",
                                   "seconds", "speed-up"]
    assert table.loc["retrain", "gap"] == 0 and table.loc["retrain", "JS to retrain"] == 0
    assert table.loc["retrain", "speed-up"] == 1
    assert table.loc["original", "speed-up"] == pytest.approx(seconds / 0.5)
    row = evaluate_model(original, data, small_split)
    expected_gap = sum(abs(row[c] - table.loc["retrain", c]) for c in row) / 4
    assert table.loc["original", "gap"] == pytest.approx(expected_gap)
    assert table.loc["original", "JS to retrain"] > 0
    with pytest.raises(ValueError, match="oracle"):
        comparison_table({"original": (original, 1.0)}, data, small_split)


def test_scaled_logit_matches_its_definition():
    logits = torch.randn(5, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 0])
    p = logits.softmax(1)[torch.arange(5), labels]
    torch.testing.assert_close(scaled_logit_confidence(logits, labels), (p / (1 - p)).log())


def test_lira_scores_high_when_the_target_is_more_confident_than_out_shadows():
    g = torch.Generator().manual_seed(0)
    shadows = torch.randn(16, 200, generator=g)
    shadow_in = torch.zeros(16, 200, dtype=torch.bool)
    target = torch.cat([torch.full((100,), 3.0), torch.zeros(100)])  # first half far above the OUT mean
    for fixed in (True, False):
        scores = lira_offline(target, shadows, shadow_in, fixed_variance=fixed)
        assert scores[:100].mean() > 2 and abs(scores[100:].mean()) < 0.5
        assert attack_auc(scores[:100], scores[100:]) > 0.95
    shadow_in[:, :50] = True  # no OUT shadow for the first 50: no evidence either way
    assert (lira_offline(target, shadows, shadow_in)[:50] == 0).all()
    with pytest.raises(ValueError, match="OUT shadow"):
        lira_offline(target, shadows, torch.ones(16, 200, dtype=torch.bool))


def test_forward_in_batches_evaluates_in_eval_mode_and_restores_the_mode_even_on_error(data, small_split):
    model = model_for(data, "mlp", seed=0).train()
    seen_modes = []

    def forward(x):
        seen_modes.append(model.training)
        return model(x)

    out = forward_in_batches(model, data, small_split.test[:300], data.num_classes, forward, batch_size=128)
    assert out.shape == (300, data.num_classes) and out.dtype == torch.float32
    assert seen_modes == [False, False, False] and model.training
    assert forward_in_batches(model, data, small_split.test[:0], 7).shape == (0, 7)

    def broken(x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        forward_in_batches(model, data, small_split.test[:10], data.num_classes, broken)
    assert model.training, "the model was left in eval mode after the forward pass raised"


def test_flip_tta_classifies_by_the_logits_of_an_image_and_its_mirror_image(data, small_split):
    import dataclasses

    model = model_for(data, "mlp", seed=0)
    indices = small_split.test[:300]
    x, y = data[indices]
    with torch.no_grad():
        by_hand = ((model(x) + model(x.flip(-1))).argmax(1) == y).float().mean().item()
    assert accuracy(model, data, indices, flip_tta=True) == by_hand
    # the sum is the same for an image and its mirror image, so mirroring the data cannot change the answer
    mirrored = dataclasses.replace(data, images=data.images.flip(-1))
    assert accuracy(model, mirrored, indices, flip_tta=True) == by_hand
    plain, mirrored_plain = predict_logits(model, data, indices), predict_logits(model, mirrored, indices)
    assert not torch.equal(plain.argmax(1), mirrored_plain.argmax(1))  # unlike the plain predictions


def test_per_class_accuracy_is_the_accuracy_on_each_class(data, small_split):
    model, _ = fit(data, small_split.train, RECIPE, seed=0, progress=False)
    acc = per_class_accuracy(model, data, small_split.test)
    labels = data.labels[small_split.test]
    assert acc.shape == (10,)
    for c in range(10):
        assert acc[c].item() == pytest.approx(accuracy(model, data, small_split.test[labels == c]))
    assert per_class_accuracy(model, data, small_split.test[labels == 3]).isnan().sum() == 9  # absent: NaN
    with pytest.raises(ValueError, match="empty set"):
        accuracy(model, data, small_split.test[:0])


def test_assert_same_model_is_bitwise_on_the_cpu_and_names_what_differs(data, small_split):
    model = model_for(data, "mlp", seed=0)
    assert_same_model(model, clone(model), data, small_split.test)
    nudged = clone(model)
    with torch.no_grad():
        nudged.head.bias[0] += 1e-6
    with pytest.raises(AssertionError, match="head.bias"):
        assert_same_model(model, nudged, data, small_split.test)
    assert_same_model(model, nudged, data, small_split.test, atol=1e-5)
    # on a GPU (or with exact=False) the models need only predict the same classes
    assert_same_model(model, nudged, data, small_split.test, exact=False)
    with pytest.raises(AssertionError, match="different classes for"):
        assert_same_model(model, model_for(data, "mlp", seed=1), data, small_split.test, exact=False)
    with pytest.raises(AssertionError, match="different entries"):
        assert_same_model(model, model_for(data, "mlp", seed=0, hidden=(32,)), data, small_split.test)
