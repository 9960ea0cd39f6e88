import pytest
import torch
import torch.nn.functional as F

from unlearnkit.head import flat_head_params, head_hessian, head_inputs, per_sample_head_grads
from unlearnkit.models import model_for


def _head_loss(theta, features, labels, c, d, label_smoothing=0.0):
    return F.cross_entropy(features @ theta[: c * d].view(c, d).T + theta[c * d:], labels,
                           label_smoothing=label_smoothing)


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    n, d, c = 9, 5, 4
    features = torch.randn(n, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, c, (n,), generator=g)
    head = torch.nn.Linear(d, c).double()
    return features, labels, head, n, d, c


def test_per_sample_head_grads_match_autograd(problem):
    features, labels, head, n, d, c = problem
    theta = flat_head_params(head)
    expected = torch.stack([torch.func.grad(_head_loss)(theta, features[i:i + 1], labels[i:i + 1], c, d)
                            for i in range(n)])
    torch.testing.assert_close(per_sample_head_grads(features, head(features).detach(), labels), expected)


def test_per_sample_head_grads_with_label_smoothing_match_autograd(problem):
    """The CIFAR recipes train with label smoothing, so the Newton step must remove that loss's gradients."""
    features, labels, head, n, d, c = problem
    theta = flat_head_params(head)
    expected = torch.stack([torch.func.grad(_head_loss)(theta, features[i:i + 1], labels[i:i + 1], c, d, 0.2)
                            for i in range(n)])
    logits = head(features).detach()
    torch.testing.assert_close(per_sample_head_grads(features, logits, labels, label_smoothing=0.2), expected)
    with pytest.raises(ValueError, match="label_smoothing"):
        per_sample_head_grads(features, logits, labels, label_smoothing=1.0)


def test_head_hessian_matches_autograd_with_damping_and_weight_decay(problem):
    features, labels, head, n, d, c = problem
    theta = flat_head_params(head)
    expected = torch.func.hessian(_head_loss)(theta, features, labels, c, d)
    logits = head(features).detach()
    torch.testing.assert_close(head_hessian(features, logits), expected)
    shifted = head_hessian(features, logits, damping=0.1, weight_decay=0.01)
    diagonal = torch.full((c * (d + 1),), 0.1, dtype=torch.float64)
    diagonal[: c * d] += 0.01
    torch.testing.assert_close(shifted, expected + torch.diag(diagonal))


def test_head_inputs_are_what_the_head_sees(data):
    model = model_for(data, "mlp", seed=0).eval()
    idx = torch.arange(5)
    torch.testing.assert_close(model.head(head_inputs(model, data, idx)), model(data.images[idx]))
    with pytest.raises(TypeError, match="no final linear layer"):
        head_inputs(torch.nn.Sequential(torch.nn.Flatten()), data, idx)
    assert head_inputs(model, data, idx[:0]).shape == (0, model.head.in_features)  # an empty set is no error
