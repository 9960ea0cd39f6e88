"""Tests of unlearnkit.methods.influence: HVPs, per-sample gradients, solvers, influence, Newton removal."""

import numpy as np
import pytest
import torch
from torch import nn

from unlearnkit.data import load_dataset, make_split
from unlearnkit.head import head_inputs
from unlearnkit.methods import influence as inf
from unlearnkit.models import model_for


@pytest.fixture(scope="module")
def data():
    return load_dataset("embedded", "cpu")


@pytest.fixture(scope="module")
def convex(data):
    """A converged L2-regularised logistic regression on 200 two-class samples."""
    x, y, x_test, y_test = inf.binary_projection_problem(data, (0, 6), n_train=200, n_test=200, dims=10, seed=1)
    start = {"w": torch.zeros(10, dtype=torch.float64), "b": torch.zeros((), dtype=torch.float64)}
    params, grad_norm = inf.minimise(inf.logistic_loss, start, x, y, l2=1e-2)
    assert grad_norm < 1e-10
    return params, x, y, x_test, y_test


def tiny_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def test_ravel_round_trip_and_wrong_length():
    params = {"a": torch.randn(2, 3), "b": torch.randn(4)}
    flat, unravel = inf.ravel(params)
    assert flat.shape == (10,)
    back = unravel(flat)
    torch.testing.assert_close(back["a"], params["a"])
    with pytest.raises(ValueError, match="expected a vector of 10"):
        unravel(torch.zeros(9))


def test_hvp_modes_agree_with_explicit_hessian():
    net = tiny_mlp()
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    loss, params = inf.model_loss(net), inf.model_params(net)
    hessian = inf.hessian_matrix(loss, params, x, y, l2=0.1)
    v = torch.randn(hessian.shape[0], dtype=torch.float64)
    for mode in ("forward-over-reverse", "reverse-over-reverse"):
        hvp = inf.make_hvp(loss, params, x, y, l2=0.1, damping=0.5, mode=mode)
        torch.testing.assert_close(hvp(v), hessian @ v + 0.5 * v)
    torch.testing.assert_close(hessian, hessian.T)


def test_per_sample_grads_match_loop_and_mean_gradient():
    net = tiny_mlp()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    loss, params = inf.model_loss(net), inf.model_params(net)
    fast = inf.per_sample_grads(loss, params, x, y, chunk_size=5)
    torch.testing.assert_close(fast, inf.per_sample_grads_loop(loss, params, x, y))
    torch.testing.assert_close(fast.mean(0), inf.loss_grad(loss, params, x, y))


def test_solvers_agree_and_report_small_residuals(convex):
    params, x, y, x_test, y_test = convex
    hessian = inf.hessian_matrix(inf.logistic_loss, params, x, y, l2=1e-2)
    hvp = inf.make_hvp(inf.logistic_loss, params, x, y, l2=1e-2)
    v = inf.loss_grad(inf.logistic_loss, params, x_test, y_test)
    exact = inf.solve_exact(hessian, v)
    cg = inf.solve_cg(hvp, v, tol=1e-10)
    # LiSSA contracts by 1 - λ_min/s per step: damping 0.3 makes 300 steps enough here.
    lissa = inf.solve_lissa(hvp, v, damping=0.3, steps=300, check_every=20)
    damped = inf.solve_exact(hessian, v, damping=0.3)
    assert exact.residual < 1e-12 and cg.residual < 1e-9 and cg.iterations <= len(v)
    assert lissa.residual < 1e-6 and lissa.residuals[0] > lissa.residuals[-1]
    assert lissa.info["scale"] > torch.linalg.eigvalsh(hessian).max().item() + 0.3
    torch.testing.assert_close(cg.solution, exact.solution, atol=1e-8, rtol=1e-7)
    torch.testing.assert_close(lissa.solution, damped.solution, atol=1e-6, rtol=1e-5)


def test_indefinite_hessian_is_refused_until_damped():
    hessian = torch.diag(torch.tensor([2.0, 1.0, -0.5], dtype=torch.float64))
    v = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="not positive definite.*-0.5"):
        inf.solve_exact(hessian, v)
    with pytest.raises(ValueError, match="not positive definite"):
        inf.solve_cg(lambda u: hessian @ u, v)
    with pytest.raises(ValueError, match="diverged"):
        inf.solve_lissa(lambda u: hessian @ u, v, scale=3.0, steps=2000)
    damped = inf.solve_exact(hessian, v, damping=1.0)
    torch.testing.assert_close(damped.solution, v / torch.tensor([3.0, 2.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(inf.solve_cg(lambda u: hessian @ u, v, damping=1.0).solution, damped.solution)


def test_influence_predicts_leave_one_out_on_the_convex_model(convex):
    params, x, y, x_test, y_test = convex
    flat, _ = inf.ravel(params)
    hessian = inf.hessian_matrix(inf.logistic_loss, params, x, y, l2=1e-2)
    s_test = inf.solve_exact(hessian, inf.loss_grad(inf.logistic_loss, params, x_test, y_test)).solution
    grads = inf.per_sample_grads(inf.logistic_loss, params, x, y) + 1e-2 * flat
    predicted = inf.predicted_removal_change(grads, s_test, len(x))[:15]
    base = inf.logistic_loss(params, x_test, y_test)
    actual = []
    for i in range(15):
        keep = torch.arange(len(x)) != i
        loo, _ = inf.minimise(inf.logistic_loss, params, x[keep], y[keep], l2=1e-2, hessian=hessian)
        actual.append((inf.logistic_loss(loo, x_test, y_test) - base).item())
    assert np.corrcoef(predicted.numpy(), actual)[0, 1] > 0.95
    assert (inf.self_influence(grads, hessian) > 0).all()


def test_newton_removal_lands_next_to_the_retrained_model(convex):
    params, x, y, _, _ = convex
    forget = torch.arange(20)
    retrained, _ = inf.minimise(inf.logistic_loss, params, x[20:], y[20:], l2=1e-2)
    target, _ = inf.ravel(retrained)
    original, _ = inf.ravel(params)
    for solver in ("exact", "cg"):
        removed, solve = inf.newton_removal(inf.logistic_loss, params, x, y, forget, l2=1e-2, solver=solver)
        assert solve.residual < 1e-8
        moved, _ = inf.ravel(removed)
        assert (moved - target).norm() < 0.05 * (original - target).norm()
    with pytest.raises(ValueError, match="at least one and fewer than all"):
        inf.newton_removal(inf.logistic_loss, params, x, y, torch.zeros(len(x), dtype=torch.bool))
    with pytest.raises(ValueError, match="solver="):
        inf.newton_removal(inf.logistic_loss, params, x, y, forget, solver="svd")


def test_newton_head_matches_the_generic_newton_step(data):
    model = model_for(data, "mlp", seed=0, hidden=(16,))
    pool = data.train_pool[:300]
    split = make_split(data, pool[:30], train=pool, test=data.test_pool[:100])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = inf.newton_head(model, data, split, weight_decay=1e-2, damping=1e-3)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])  # the input model is untouched
    for k, v in result.model.backbone.state_dict().items():
        torch.testing.assert_close(v, before["backbone." + k])
    features = torch.cat([head_inputs(model, data, split.retain), head_inputs(model, data, split.forget)]).double()
    labels = torch.cat([data.labels[split.retain], data.labels[split.forget]])
    head = {"weight": model.head.weight.detach().double(), "bias": model.head.bias.detach().double()}

    def head_loss(params, inputs, targets):
        return nn.functional.cross_entropy(inputs @ params["weight"].T + params["bias"], targets)

    forget = torch.arange(len(split.retain), len(labels))
    expected, _ = inf.newton_removal(head_loss, head, features, labels, forget, l2=1e-2, damping=1e-3)
    torch.testing.assert_close(result.model.head.weight.double(), expected["weight"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(result.model.head.bias.double(), expected["bias"], atol=1e-5, rtol=1e-4)
    assert result.method == "newton_head" and result.seconds > 0 and result.details["residual"] < 1e-8


def test_newton_head_clear_errors(data):
    pool = data.train_pool[:100]
    split = make_split(data, pool[:10], train=pool, test=data.test_pool[:50])
    with pytest.raises(TypeError, match="no final linear layer"):
        inf.newton_head(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), data, split)
    model = model_for(data, "mlp", seed=0, hidden=(8,))
    with pytest.raises(ValueError, match="not positive definite"):
        inf.newton_head(model, data, split, weight_decay=0.0, damping=0.0)
    with pytest.raises(ValueError, match=">= 0"):
        inf.newton_head(model, data, split, damping=-1.0)


def test_bad_arguments_are_explained(data):
    with pytest.raises(ValueError, match="two different labels"):
        inf.binary_projection_problem(data, (3, 3))
    with pytest.raises(ValueError, match="mode="):
        inf.make_hvp(inf.logistic_loss, {"w": torch.zeros(2), "b": torch.zeros(())}, torch.zeros(3, 2),
                     torch.zeros(3), mode="fast")
    with pytest.raises(ValueError, match="must be >= 0"):
        inf.solve_exact(torch.eye(2), torch.ones(2), damping=-1.0)
