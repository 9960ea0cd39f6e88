"""The classifier head in closed form: features, per-sample gradients and the exact Hessian.

For a linear softmax head ``z = W h + b`` with cross-entropy loss, the gradient of one sample's
loss is ``(p - e_y) [h; 1]^T`` and the Hessian of the mean loss is
``mean_i (diag(p_i) - p_i p_i^T) ⊗ [h_i; 1][h_i; 1]^T``. Influence functions, IMU and MIMU all
work at this level ("classifier level"), with the backbone frozen, so the formulas live here once.

Parameters are flattened as ``[W.flatten(), b]`` (row-major ``W``: class by feature), matching
``torch.cat([head.weight.flatten(), head.bias])``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .data import ImageDataset
from .evaluate import forward_in_batches
from .models import head_of


def head_inputs(model: nn.Module, data: ImageDataset, indices: Tensor, batch_size: int = 2048) -> Tensor:
    """The features the head sees (``model.features(x)``) for ``data[indices]``, in float32, eval mode."""
    return forward_in_batches(model, data, indices, head_of(model).in_features, model.features, batch_size)


def flat_head_params(head: nn.Linear) -> Tensor:
    """``[W.flatten(), b]`` as one detached vector."""
    return torch.cat([head.weight.detach().flatten(), head.bias.detach()])


def per_sample_head_grads(features: Tensor, logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """``[n, C*(d+1)]`` gradients of each sample's cross-entropy w.r.t. the flattened head.

    Closed form ``(p_i - t_i) [h_i; 1]^T``: one batched outer product, no loop over samples. The target
    ``t_i`` is ``e_{y_i}``, or with label smoothing ε, ``(1 - ε) e_{y_i} + ε/C`` (as in
    ``F.cross_entropy(..., label_smoothing=ε)``; the Hessian does not depend on the targets).
    """
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    residual = logits.softmax(1) - label_smoothing / logits.shape[1]
    residual[torch.arange(len(labels), device=labels.device), labels] -= 1 - label_smoothing
    grad_w = residual[:, :, None] * features[:, None, :]
    return torch.cat([grad_w.flatten(1), residual], dim=1)


def head_hessian(features: Tensor, logits: Tensor, damping: float = 0.0, weight_decay: float = 0.0) -> Tensor:
    """Exact Hessian of the mean cross-entropy w.r.t. the flattened head, ``[P, P]`` with ``P = C*(d+1)``.

    ``damping`` adds ``λI`` (keeps it invertible); ``weight_decay`` adds the Hessian of
    ``weight_decay/2 * ||W||²`` (weights only, not the bias).
    """
    n, d = features.shape
    c = logits.shape[1]
    p = logits.softmax(1).double()
    h = torch.cat([features.double(), torch.ones(n, 1, dtype=torch.float64, device=features.device)], 1)
    # H = mean_n (diag(p_n) - p_n p_nᵀ) ⊗ h_n h_nᵀ, indexed (class, feature): the p pᵀ part is one Gram
    # matrix of the Kronecker rows p_n ⊗ h_n, the diagonal part adds a (d+1)-square block per class.
    kron_rows = (p[:, :, None] * h[:, None, :]).reshape(n, c * (d + 1))
    full = -(kron_rows.T @ kron_rows)
    for a in range(c):
        block = slice(a * (d + 1), (a + 1) * (d + 1))
        full[block, block] += (h * p[:, a:a + 1]).T @ h
    full = full / n                                                            # then reorder to [W.flatten(), b]
    order = torch.cat([torch.arange(c * (d + 1)).view(c, d + 1)[:, :d].flatten(),
                       torch.arange(c * (d + 1)).view(c, d + 1)[:, d]])
    hessian = full.reshape(c * (d + 1), c * (d + 1))[order][:, order]
    diagonal = torch.full((c * (d + 1),), damping, dtype=torch.float64, device=features.device)
    diagonal[: c * d] += weight_decay
    return (hessian + torch.diag(diagonal)).to(features.dtype)
