import dataclasses

import pytest
import torch

from unlearnkit.methods import METHODS, UnlearningResult, get_method, register, unlearn
from unlearnkit.models import model_for
from unlearnkit.train import Recipe, fit

RECIPE = Recipe(epochs=2, batch_size=128, lr=0.05)


# the cheapest settings that run each method for real; every other argument is the method's default
CHEAP = {"retrain": {"recipe": RECIPE}, "sisa": {"recipe": RECIPE, "shards": 2, "slices": 1, "progress": False},
         "mimu": {"steps": 20, "progress": False}}


@pytest.fixture(scope="module")
def original(data, small_split):
    model, _ = fit(data, small_split.train, RECIPE, cache=False, progress=False)
    return model


def test_retrain_is_registered_first(data, small_split, original):
    assert next(iter(METHODS)) == "retrain"
    assert unlearn("retrain", original, data, small_split, recipe=RECIPE).details["trained_on"] == \
        len(small_split.retain)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_registered_method_follows_the_convention_and_never_mutates_its_input(data, small_split, original,
                                                                                     name):
    before = {k: v.clone() for k, v in original.state_dict().items()}
    result = unlearn(name, original, data, small_split, **CHEAP.get(name, {}))
    assert isinstance(result, UnlearningResult) and result.method == name and result.seconds > 0
    assert result.model is not original
    changed = [k for k, v in original.state_dict().items() if not torch.equal(before[k], v)]
    assert not changed, f"{name} changed its input's {changed}"


def test_retrain_is_training_on_the_retain_set_with_the_same_recipe(data, small_split):
    original, _ = fit(data, small_split.train, RECIPE, seed=3, progress=False)
    oracle = unlearn("retrain", original, data, small_split, recipe=RECIPE, seed=3).model
    reference, _ = fit(data, small_split.retain, RECIPE, seed=3, cache=False, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(oracle.state_dict().values(), reference.state_dict().values()))


def test_registry_errors_are_clear(data, small_split):
    with pytest.raises(KeyError, match="no unlearning method 'magic'"):
        get_method("magic")
    with pytest.raises(ValueError, match="already registered"):
        register("retrain")(lambda *a, **k: None)
    with pytest.raises(TypeError, match="Classifier"):
        unlearn("retrain", torch.nn.Linear(2, 2), data, small_split, recipe=RECIPE)


def test_models_built_for_the_data_can_be_retrained(data, small_split):
    model = model_for(data, "mlp", seed=0, hidden=(32,))
    result = unlearn("retrain", model, data, small_split, recipe=RECIPE.with_(epochs=1))
    assert result.model.config["hidden"] == (32,)


@pytest.mark.parametrize("name", ["retrain", "sisa", "ga", "neggrad+", "finetune", "random_labels", "newton_head",
                                  "imu", "mimu"])
def test_every_method_checks_a_hand_built_split_before_it_starts(data, small_split, name):
    """A Split is a plain dataclass, so every method checks it: here its forget set is made of test images."""
    model = model_for(data, "mlp", seed=0)
    leaked = dataclasses.replace(small_split, forget=small_split.test[:5], request=small_split.test[:5])
    with pytest.raises(ValueError, match="test set"):
        unlearn(name, model, data, leaked, **({"recipe": RECIPE} if name in ("retrain", "sisa") else {}))


def test_recipes_refuse_settings_that_cannot_train():
    for bad, message in [({"epochs": 0}, "epochs"), ({"batch_size": 1}, "batch_size"), ({"lr": 0.0}, "learning rate"),
                         ({"momentum": 1.5}, "momentum"), ({"weight_decay": -1e-4}, "weight decay"),
                         ({"label_smoothing": 1.0}, "label smoothing"), ({"optimizer": "lbfgs"}, "optimizer"),
                         ({"schedule": "step"}, "schedule"), ({"augment": "mixup"}, "augment"),
                         ({"epochs": True}, "epochs")]:
        with pytest.raises(ValueError, match=message):
            Recipe(**bad)
    assert Recipe().with_(epochs=1).epochs == 1
