"""MIMU: the parameter graph, the control unit's gradient, masks, reversibility, saving."""

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from torch_geometric.nn import GCNConv

from unlearnkit.data import class_split, load_dataset, random_split, request_sequence
from unlearnkit.methods import mimu as M
from unlearnkit.methods.base import METHODS
from unlearnkit.models import head_of, model_for
from unlearnkit.train import Recipe, fit


@pytest.fixture(scope="module")
def setting():
    data = load_dataset("embedded", "cpu")
    split = random_split(data, 100, seed=0, n_train=1500, n_test=300)
    model, _ = fit(data, split.train, Recipe(epochs=2), arch="mlp", seed=0, progress=False,
                   hidden=(32, 16), cache=False)
    return data, split, model


@pytest.fixture(scope="module")
def controller(setting):
    data, split, model = setting
    return M.train_controller(model, data, split.train, steps=3, batch_size=8, hidden=8, progress=False)


def test_graph_has_linear_size_and_two_hop_weight_links():
    graph = M.build_parameter_graph([(3, 4), (2, 3)])
    n = 12 + 6
    assert graph.n_weights == n and graph.n_nodes == n + 4 + 3 + 2
    assert graph.data.edge_index.shape[1] == 2 * 2 * n  # two undirected edges per weight
    degrees = graph.degrees()
    assert (degrees[:n] == 2).all()
    # the hidden neurons join the two layers: fan-in 4 from layer 1 plus fan-out 2 into layer 2
    assert degrees[n + 4:n + 7].tolist() == [6, 6, 6]
    # weights (0,0) and (0,1) of layer 1 share output neuron 0: two hops apart, never one
    adjacency = torch.zeros(graph.n_nodes, graph.n_nodes)
    adjacency[graph.data.edge_index[0], graph.data.edge_index[1]] = 1
    assert adjacency[0, 1] == 0 and (adjacency @ adjacency)[0, 1] == 1
    with pytest.raises(ValueError, match="do not connect"):
        M.build_parameter_graph([(3, 4), (2, 5)])


def test_batched_propagation_equals_gcnconv():
    graph = M.build_parameter_graph([(3, 5)])
    conv = GCNConv(4, 6)
    h = torch.randn(3, graph.n_nodes, 4)
    ours = graph.propagate(conv.lin(h)) + conv.bias
    reference = torch.stack([conv(h[b], graph.data.edge_index) for b in range(3)])
    torch.testing.assert_close(ours, reference)
    # the stored normalised adjacency is what the kit's control unit uses: GCNConv(normalize=False) on it agrees
    prenormalised = GCNConv(4, 6, normalize=False)
    prenormalised.load_state_dict(conv.state_dict())
    torch.testing.assert_close(prenormalised(h[0], graph.norm_edge_index, graph.norm_edge_weight), reference[0])


def test_node_features_and_gradients(setting):
    data, split, model = setting
    targets = M.find_targets(model, 2)
    graph = M.build_parameter_graph(targets.shapes)
    inputs = M.prefix_inputs(model, targets, data, split.train[:4])
    labels = data.labels[split.train[:4]]
    features = M.node_features(model, targets, graph, inputs, labels)
    assert features.shape == (4, graph.n_nodes, M.N_FEATURES)
    torch.testing.assert_close(features[:, :targets.sizes[0], 2].mean(1), torch.zeros(4), atol=1e-5, rtol=0)
    # the closed-form per-sample gradients equal autograd's, one sample at a time
    _, _, grads = M.sample_statistics(model, targets, inputs, labels)
    model.zero_grad()
    F.cross_entropy(model(data.images[split.train[:1]]), labels[:1]).backward()
    torch.testing.assert_close(grads[1][0], model.head.weight.grad)
    torch.testing.assert_close(grads[0][0], model.backbone[4].weight.grad)
    model.zero_grad()


def test_gumbel_topk_is_hard_forward_and_differentiable():
    logits = torch.randn(4, 50, requires_grad=True)
    mask = M.gumbel_topk(logits, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask.detach().sum(1), torch.full((4,), 7.0))
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    (mask * torch.arange(50.0)).sum().backward()
    assert logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="k=50 must be between 1 and N-1=49"):
        M.gumbel_topk(logits, 50)


def _with_gradients(model):
    return [name for name, p in model.named_parameters() if p.grad is not None]


def test_likelihood_term_sends_gradient_to_the_control_unit(setting):
    data, split, model = setting
    targets = M.find_targets(model, 1)
    graph = M.build_parameter_graph(targets.shapes)
    unit = M.ControlUnit(hidden=8)
    x = M.prefix_inputs(model, targets, data, split.train[:16])
    y = data.labels[split.train[:16]]
    logits = unit(M.node_features(model, targets, graph, x, y), graph)
    mask = M.gumbel_topk(logits, 20, generator=torch.Generator().manual_seed(0))
    nll = F.cross_entropy(M.per_sample_masked_logits(model, targets, x, mask), y)
    nll.backward()  # the likelihood term alone
    for name, p in unit.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert sum(p.grad.abs().sum() for p in unit.parameters()) > 0
    # no gradient reaches the model: not its masked weights, nor the biases the masked layers also use
    assert not _with_gradients(model), _with_gradients(model)


def test_training_a_controller_leaves_the_models_gradients_alone(setting):
    data, split, model = setting
    M.train_controller(model, data, split.train, layers=2, steps=2, batch_size=8, hidden=8, progress=False)
    assert not _with_gradients(model), _with_gradients(model)


@pytest.fixture(scope="module")
def trained(setting):
    data, split, model = setting
    return M.train_controller(model, data, split.train, steps=25, batch_size=8, hidden=8, lr=1e-2,
                              prior_weight=0.0, progress=False)


def test_training_lowers_the_masked_likelihood(trained):
    nll = trained.history["nll"]
    assert sum(nll[-10:]) / 10 < 0.8 * sum(nll[:10]) / 10, nll


def test_masked_suffix_matches_masked_model(setting, controller):
    data, split, model = setting
    keep = torch.ones(controller.targets.n_weights)
    keep[::3] = 0
    masked = M.MaskedModel(model, controller.targets, {"r": keep == 0})
    inputs = M.prefix_inputs(model, controller.targets, data, split.test[:20])
    torch.testing.assert_close(M.suffix_logits(model, controller.targets, inputs, keep),
                               masked(data.images[split.test[:20]]))


def test_masks_have_k_ones_and_overlap_is_normalised(setting, controller):
    data, split, _ = setting
    for ranking in M.RANKINGS:
        masks = controller.masks(data, split.forget[:10], ranking)
        assert masks.dtype == torch.bool and (masks.sum(1) == controller.k).all()
    masks = controller.masks(data, split.forget[:10])
    scores = M.overlap_scores(masks, masks, exclude_self=True)
    assert ((scores >= 0) & (scores <= 1)).all()
    assert torch.allclose(M.overlap_scores(masks[:1], masks[:1]), torch.ones(1))
    e = M.exclusivity(masks[:5], masks[5:])
    assert e.shape == (controller.targets.n_weights,) and e.abs().max() <= 1
    with pytest.raises(ValueError, match="ranking='nonsense'"):
        controller.masks(data, split.forget[:2], "nonsense")


def test_request_never_writes_and_revoking_restores_bitwise(setting, controller):
    data, split, model = setting
    before = {k: v.clone() for k, v in model.state_dict().items()}
    original = model(data.images[split.test])
    result = M.mimu(model, data, split, controller=controller, threshold=0.3, reference_size=100)
    assert isinstance(result.model, M.MaskedModel) and result.details["n_off"] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(result.model(data.images[split.test]), original)
    result.model.revoke(result.details["request"])
    assert torch.equal(result.model(data.images[split.test]), original)


def test_requests_compose_revoke_one_by_one_without_drift(setting, controller):
    data, split, model = setting
    original = model(data.images[split.test])
    masked = model
    requests = []
    bank = controller.bank(data, split.retain[:50])
    sequence = request_sequence(data, 20, 5, seed=0, n_train=1500, n_test=300)
    assert torch.equal(sequence[0].train, split.train)  # the model's training set, 5 more samples forgotten each time
    for t, request in enumerate(sequence):
        result = M.mimu(masked, data, request, controller=controller, threshold=0.5, chunk=4, budget=0.05,
                        reference_bank=bank.without(request.forget), seed=t)
        masked = result.model
        requests.append(result.details["request"])
    assert len(masked.requests) == 20
    # each request switched off weights that no earlier one had, and the view computes what the model computes
    # with all of them written to zero in a copy
    union = torch.stack(list(masked.requests.values())).any(0)
    assert sum(int(off.sum()) for off in masked.requests.values()) == int(union.sum()) > 0
    zeroed = copy.deepcopy(model)
    params = dict(zeroed.named_parameters())
    with torch.no_grad():
        for name, off in zip(controller.targets.names, controller.targets.split_flat(union), strict=True):
            params[name][off] = 0.0
    torch.testing.assert_close(masked(data.images[split.test]), zeroed(data.images[split.test]), rtol=0, atol=1e-6)
    for name in requests[:-1]:
        masked.revoke(name)
    last = M.MaskedModel(model, controller.targets, {"one": masked.requests[requests[-1]]})
    assert torch.equal(masked(data.images[split.test]), last(data.images[split.test]))
    masked.revoke(requests[-1])
    assert torch.equal(masked(data.images[split.test]), original)


def test_a_reference_bank_holds_retained_samples_of_the_requests_ranking(setting, controller):
    data, split, model = setting
    bank = controller.bank(data, torch.cat([split.forget[:3], split.retain[:7]]))
    assert torch.equal(bank.masks, controller.masks(data, bank.indices)) and bank.ranking == "learned"
    kept = bank.without(split.forget)
    assert len(kept) == 7 and torch.equal(kept.masks, bank.masks[3:])
    with pytest.raises(ValueError, match="3 of the reference bank's 10 samples are not in split.retain"):
        M.mimu(model, data, split, controller=controller, reference_bank=bank)
    with pytest.raises(ValueError, match="'learned' masks but ranking='saliency'"):
        M.mimu(model, data, split, controller=controller, reference_bank=kept, ranking="saliency")
    with pytest.raises(ValueError, match="uses no reference masks"):
        M.mimu(model, data, split, controller=controller, reference_bank=kept, ranking="random")
    with pytest.raises(ValueError, match="empty"):
        M.mimu(model, data, split, controller=controller, reference_bank=kept.without(split.retain))
    with pytest.raises(ValueError, match="one mask row per sample"):
        M.ReferenceBank(kept.indices, kept.masks[:2], "learned")
    # the kept bank is what the request uses: the same masks given as a bank or by hand give the same request
    by_bank = M.mimu(model, data, split, controller=controller, reference_bank=kept, seed=0)
    order = M.ranking_order(controller, data, split.request, None, "learned", 0, kept.masks)
    assert torch.equal(by_bank.model.requests[by_bank.details["request"]].nonzero().flatten().sort().values,
                       order[:by_bank.details["n_off"]].sort().values)


def test_class_request_switches_off_few_weights_and_forgets(setting, trained):
    data, _, model = setting
    split = class_split(data, 1, seed=0, n_train=1500, n_test=300)
    result = M.mimu(model, data, split, controller=trained, reference_size=200)
    assert result.details["reached"], result.details["curve"]
    assert result.details["share_off"] <= 0.1, result.details["share_off"]


def test_save_and_load_round_trip(setting, controller, tmp_path):
    data, split, model = setting
    path = tmp_path / "unit.pt"
    controller.save(path)
    loaded = M.load_controller(path, model)
    assert torch.equal(loaded.masks(data, split.forget[:8]), controller.masks(data, split.forget[:8]))
    other, _ = fit(data, split.train, Recipe(epochs=1), arch="mlp", seed=1, progress=False, hidden=(32, 16),
                   cache=False)
    with pytest.raises(ValueError, match="different weights"):
        M.load_controller(path, other)


def test_bad_input_is_rejected(setting, controller):
    data, split, model = setting
    with pytest.raises(ValueError, match="delta"):
        M.train_controller(model, data, split.train, delta=1.5)
    with pytest.raises(ValueError, match="layers"):
        M.find_targets(model, 3)
    with pytest.raises(ValueError, match="ranking"):
        M.mimu(model, data, split, controller=controller, ranking="best")
    with pytest.raises(ValueError, match="threshold"):
        M.mimu(model, data, split, controller=controller, threshold=2.0)
    with pytest.raises(TypeError, match="mimu needs a unlearnkit Classifier"):
        M.mimu(torch.nn.Linear(2, 2), data, split, controller=controller)
    with pytest.raises(TypeError, match=r"unknown keyword arguments \['treshold'\]"):
        M.mimu(model, data, split, treshold=0.5)
    with pytest.raises(ValueError, match="reference_size=0"):
        M.mimu(model, data, split, controller=controller, reference_size=0)
    with pytest.raises(ValueError, match="not both"):
        M.mimu(model, data, split, controller=controller, reference_size=10,
               reference_bank=controller.bank(data, split.retain[:5]))
    with pytest.raises(ValueError, match="another model"):
        M.mimu(model_for(data, "mlp", hidden=(32, 16)), data, split, controller=controller)
    with pytest.raises(ValueError, match="bool"):
        M.MaskedModel(model, controller.targets).add_request(torch.zeros(3))
    with pytest.raises(TypeError, match="no final linear layer"):  # a masked view hides its head from head-level code
        head_of(M.MaskedModel(model, controller.targets))
    assert METHODS["mimu"] is M.mimu


def test_a_view_leaves_the_batch_norm_of_its_base_alone():
    """Evaluation code puts a model back in the mode it found it in (``model.train(was_training)``). A view that
    started in training mode would thereby switch its base's batch norm to batch statistics, and every later
    forward pass would rewrite the running statistics of the original model (found by lesson 06 in full mode,
    whose CNN has batch norm; the MLP of quick mode has none)."""
    data = load_dataset("embedded", "cpu")
    split = random_split(data, 50, seed=0, n_train=600, n_test=200)
    model, _ = fit(data, split.train, Recipe(epochs=1), arch="cnn", seed=0, progress=False, cache=False)
    assert any("running_mean" in name for name in model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    controller = M.train_controller(model, data, split.train, steps=2, batch_size=8, hidden=8, progress=False)
    view = M.mimu(model, data, split, controller=controller, threshold=0.5, reference_size=50).model
    was_training = view.training
    view.eval()
    view.train(was_training)
    assert not model.training and not view.copy().training
    view(data.images[split.test])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_control_units_seconds_include_the_forward_pass_over_its_training_samples(setting, monkeypatch):
    """The one-off cost lesson 07 reports: on full mode's CNN the forward pass was 18.7 of 19.3 seconds."""
    data, split, model = setting
    forward = M.prefix_inputs

    def slow_forward(*args, **kwargs):
        time.sleep(0.3)
        return forward(*args, **kwargs)

    monkeypatch.setattr(M, "prefix_inputs", slow_forward)
    controller = M.train_controller(model, data, split.train, steps=1, batch_size=8, hidden=8, progress=False)
    assert controller.seconds >= 0.3
