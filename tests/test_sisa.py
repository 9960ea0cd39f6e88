"""SISA: layout, exact deletion, the guarantees it promises, and the vmapped path against the sequential one."""

import copy

import pytest
import torch

from unlearnkit.data import random_split
from unlearnkit.evaluate import accuracy, comparison_table, predict_logits
from unlearnkit.methods.base import get_method
from unlearnkit.methods.sisa import SISAEnsemble, SISAModel, slice_step_epochs, train_stacked
from unlearnkit.models import model_for
from unlearnkit.train import Recipe

RECIPE = Recipe(epochs=3, batch_size=64, lr=0.05)


@pytest.fixture(scope="module")
def tiny(data):
    """600 training samples, a narrow MLP: enough to learn something in well under a second."""
    split = random_split(data, 30, seed=0, n_train=600, n_test=300)
    return split, model_for(data, "mlp", seed=0, hidden=(32,))


def states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def train(data, tiny, **kwargs) -> SISAEnsemble:
    split, template = tiny
    options = dict(shards=3, slices=3, seed=0, vmap=False, progress=False) | kwargs
    return SISAEnsemble.train(template, data, split.train, RECIPE, **options)


def test_layout_is_a_seeded_partition(data, tiny):
    split, _ = tiny
    ensemble = train(data, tiny)
    assert torch.equal(ensemble.training_indices, split.train)
    sizes = [len(part) for shard in ensemble.slices for part in shard]
    assert len(sizes) == 9 and max(sizes) - min(sizes) <= 1
    again = train(data, tiny)
    pairs = zip(ensemble.slices, again.slices, strict=True)
    assert all(torch.equal(a, b) for s, t in pairs for a, b in zip(s, t, strict=True))
    assert all(states_equal(a, b) for a, b in zip(ensemble.constituents, again.constituents, strict=True))
    assert accuracy(ensemble.model, data, split.test) > 0.5


def test_epoch_budget_matches_ordinary_training():
    assert slice_step_epochs(Recipe(epochs=8), 1) == 8
    assert slice_step_epochs(Recipe(epochs=8), 4) == 3  # 2*8/5 = 3.2
    assert slice_step_epochs(Recipe(epochs=1), 20) == 1


def test_forget_is_exact_and_leaves_other_shards_alone(data, tiny):
    ensemble = train(data, tiny)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in ensemble.constituents]
    target = int(ensemble.slices[1][1][0])
    assert ensemble.shard_of(target) == (1, 1)
    report = ensemble.forget(target)
    assert report.shards_touched == [1] and report.restart_slice == {1: 1}
    for s, model in enumerate(ensemble.constituents):
        assert target not in ensemble.shard_indices(s).tolist()
        if s != 1:
            assert all(torch.equal(model.state_dict()[k], before[s][k]) for k in before[s])
    assert not all(torch.equal(ensemble.constituents[1].state_dict()[k], before[1][k]) for k in before[1])
    # Exactness: the retrained constituent is bit for bit the one training from scratch on what is left gives.
    assert states_equal(ensemble.constituents[1], ensemble.replay_from_scratch(1))
    # Only slice steps 2 and 3 were replayed, on about 2/3 and 3/3 of a 200-sample shard.
    epochs = ensemble.epochs_per_step
    assert report.sample_passes == epochs * (len(torch.cat(ensemble.slices[1][:2])) + len(ensemble.shard_indices(1)))
    assert report.samples_retrained == 199
    assert 0 < report.cost_fraction < 0.5 and report.seconds > 0


def test_batched_request_retrains_each_shard_once(data, tiny):
    ensemble = train(data, tiny)
    request = torch.cat([ensemble.slices[0][2][:3], ensemble.slices[0][0][:1], ensemble.slices[2][1][:2]])
    report = ensemble.forget(request)
    assert report.shards_touched == [0, 2] and report.restart_slice == {0: 0, 2: 1}
    assert not torch.isin(request, ensemble.training_indices).any()
    assert torch.equal(ensemble.forgotten, request.sort().values)
    for s in (0, 2):
        assert states_equal(ensemble.constituents[s], ensemble.replay_from_scratch(s))


def test_disk_checkpoints_give_the_same_result(data, tiny, tmp_path):
    in_memory, on_disk = train(data, tiny), train(data, tiny, checkpoints=tmp_path / "ckpt")
    assert len(list((tmp_path / "ckpt").glob("*.pt"))) == 9
    target = int(in_memory.slices[2][2][5])
    in_memory.forget(target)
    on_disk.forget(target)
    assert all(states_equal(a, b) for a, b in zip(in_memory.constituents, on_disk.constituents, strict=True))


def test_bad_requests_are_refused_clearly(data, tiny):
    split, _ = tiny
    ensemble = train(data, tiny)
    target = int(split.train[0])
    ensemble.forget(target)
    with pytest.raises(ValueError, match="already forgotten"):
        ensemble.forget(target)
    with pytest.raises(ValueError, match="not in the ensemble's training set"):
        ensemble.shard_of(target)
    with pytest.raises(ValueError, match="never in the ensemble's training set"):
        ensemble.forget(int(split.test[0]))
    with pytest.raises(ValueError, match="empty"):
        ensemble.forget([])
    with pytest.raises(ValueError, match="more than once"):
        ensemble.forget([int(split.train[1])] * 2)
    with pytest.raises(ValueError, match="integer indices"):
        ensemble.forget(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="at least one"):
        SISAEnsemble.train(tiny[1], data, split.train[:5], RECIPE, shards=3, slices=2)
    with pytest.raises(ValueError, match="positive integer"):
        SISAEnsemble.train(tiny[1], data, split.train, RECIPE, shards=0)


def test_vote_and_mean_aggregation(data, tiny):
    split, _ = tiny
    ensemble = train(data, tiny)
    x = data.images[split.test]
    probs = torch.stack([m(x).softmax(1) for m in ensemble.constituents])
    torch.testing.assert_close(ensemble.predict_proba(x), probs.mean(0))
    votes = torch.nn.functional.one_hot(probs.argmax(2), 10).sum(0)
    predicted = ensemble.predict(x, "vote")
    assert torch.equal(votes.gather(1, predicted[:, None]).squeeze(1), votes.max(1).values)
    assert torch.equal(ensemble.predict(x, "mean"), probs.mean(0).argmax(1))
    with pytest.raises(ValueError, match="aggregation"):
        SISAModel(ensemble.constituents, "median")


def test_emptied_shard_stops_voting(data, tiny):
    ensemble = train(data, tiny)
    ensemble.forget(ensemble.shard_indices(0))
    module = ensemble.model
    assert module.active.tolist() == [False, True, True]
    x = data.images[tiny[0].test]
    probs = torch.stack([m(x).softmax(1) for m in ensemble.constituents[1:]])
    torch.testing.assert_close(ensemble.predict_proba(x), probs.mean(0))


def test_vmapped_training_matches_sequential(data, tiny):
    split, _ = tiny
    sequential = train(data, tiny)
    stacked = train(data, tiny, vmap=True)
    for a, b in zip(sequential.constituents, stacked.constituents, strict=True):
        torch.testing.assert_close(dict(a.named_parameters()), dict(b.named_parameters()), atol=1e-4, rtol=1e-4)
    p = predict_logits(sequential.model, data, split.test).exp()
    q = predict_logits(stacked.model, data, split.test).exp()
    assert torch.equal(p.argmax(1), q.argmax(1))
    torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4)
    # A deletion (shards of unequal size now) through the vmapped path still matches.
    request = torch.cat([sequential.slices[0][0][:2], sequential.slices[1][2][:1]])
    sequential.forget(request)
    stacked.forget(request)
    for a, b in zip(sequential.constituents, stacked.constituents, strict=True):
        torch.testing.assert_close(dict(a.named_parameters()), dict(b.named_parameters()), atol=1e-4, rtol=1e-4)


def test_vmapped_path_refuses_what_it_cannot_do(data, tiny):
    split, _ = tiny
    cnn = model_for(data, "cnn", seed=0, width=4)
    with pytest.raises(TypeError, match="BatchNorm2d"):
        train_stacked([cnn, cnn], data, [split.train[:10], split.train[10:20]], RECIPE, [0, 1])
    with pytest.raises(ValueError, match="SGD only"):
        SISAEnsemble.train(tiny[1], data, split.train, RECIPE.with_(optimizer="adam"), shards=2, slices=1, vmap=True)


def test_registry_entry_follows_the_calling_convention(data, tiny):
    split, template = tiny
    before = {k: v.clone() for k, v in template.state_dict().items()}
    result = get_method("sisa")(template, data, split, recipe=RECIPE, shards=3, slices=2, vmap=False, progress=False)
    assert result.method == "sisa" and result.seconds > 0 and result.details["train_seconds"] > 0
    assert all(torch.equal(template.state_dict()[k], before[k]) for k in before)
    ensemble = result.details["ensemble"]
    assert not torch.isin(split.forget, ensemble.training_indices).any()
    # The shard permutation is not the one that drew the forget set: 30 random forgets reach all 3 shards.
    assert result.details["shards_touched"] == [0, 1, 2]
    table = comparison_table({"retrain": (template, 1.0), "sisa": result}, data, split)
    assert table.loc["sisa", "test acc"] == pytest.approx(100 * accuracy(result.model, data, split.test))
    # the result is a copy: a later request to the live ensemble (trained in place here) leaves it as it was
    returned = copy.deepcopy(result.model.state_dict())
    ensemble.forget(ensemble.training_indices[:3])
    assert all(torch.equal(v, returned[k]) for k, v in result.model.state_dict().items())


def test_request_cost_predicts_the_report(data, tiny):
    ensemble = train(data, tiny)
    request = torch.cat([ensemble.slices[0][1][:2], ensemble.slices[2][0][:1]])
    predicted = ensemble.request_cost(request)
    assert predicted == ensemble.forget(request).cost_fraction


def test_the_ensemble_module_leaves_the_batch_norm_of_its_constituents_alone(data, tiny):
    """Evaluating the ensemble module puts it back in the mode it found it in; that must be the constituents'
    (eval), or their batch norm would switch to batch statistics and rewrite its running statistics."""
    split, _ = tiny
    ensemble = SISAEnsemble.train(model_for(data, "cnn", seed=0), data, split.train, Recipe(epochs=1, batch_size=64),
                                  shards=2, slices=1, seed=0, vmap=False, progress=False)
    before = [copy.deepcopy(m) for m in ensemble.constituents]
    assert any("running_mean" in name for name in before[0].state_dict())
    accuracy(ensemble.model, data, split.test)
    assert not any(m.training for m in ensemble.constituents)
    ensemble.predict_proba(data.images[split.test])
    assert all(states_equal(m, kept) for m, kept in zip(ensemble.constituents, before, strict=True))
