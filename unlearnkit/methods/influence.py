"""Influence functions (Koh & Liang 2017) and unlearning by one Newton step.

Removing a training point ``z`` from ``n`` points moves the minimiser of a smooth, strictly convex
objective by about ``+(1/n) H⁻¹ ∇L(z)``; everything here serves that formula:

* the machinery, for any small model written as ``loss_fn(params, inputs, targets)`` (a dict of
  tensors in, a mean loss out): per-sample gradients with ``torch.func.vmap(grad)``, Hessian-vector
  products (forward-over-reverse ``jvp`` of ``grad``, or double backprop), the explicit Hessian;
* three inverse-HVP solvers, each returning an :class:`InverseHVP` with its relative residual
  ``‖(H + λI)x − v‖ / ‖v‖`` so convergence can be seen: :func:`solve_exact` (Cholesky of the explicit
  Hessian), :func:`solve_cg` (conjugate gradient on HVPs) and :func:`solve_lissa` (the truncated
  Neumann series of Agarwal et al., on full-batch or minibatch HVPs);
* influence on a test loss, self-influence, and :func:`newton_removal` for a group of points;
* the registered method ``newton_head``: the same Newton step on the final linear layer of any
  :mod:`unlearnkit.models` model, with the exact head Hessian on frozen features.

Parameters are flattened in the order of the dict's keys (see :func:`ravel`). An L2 term
``l2/2 ‖θ‖²`` on all parameters is part of every objective here, as in the course's training
(``torch.optim.SGD``'s ``weight_decay`` decays biases too).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from ..data import ImageDataset, Split
from ..head import flat_head_params, head_hessian, head_inputs, per_sample_head_grads
from ..models import clone, head_of
from .base import Stopwatch, UnlearningResult, check_call, register

Params = dict[str, Tensor]
LossFn = Callable[[Params, Tensor, Tensor], Tensor]
HVP = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------------------------
# Parameters as one vector
# --------------------------------------------------------------------------------------------


def ravel(params: Params) -> tuple[Tensor, Callable[[Tensor], Params]]:
    """``(flat, unravel)``: the parameters as one vector, and the function that splits a vector back.

    ``unravel(flat)`` returns views with the original names and shapes, so gradients flow through it.
    """
    if not params:
        raise ValueError("params is empty: pass a dict of tensors, e.g. model_params(model)")
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [math.prod(s) for s in shapes]
    flat = torch.cat([params[k].detach().reshape(-1) for k in names])

    def unravel(vector: Tensor) -> Params:
        if vector.shape != flat.shape:
            raise ValueError(f"expected a vector of {flat.numel()} entries, got shape {tuple(vector.shape)}")
        return {k: piece.view(s) for k, piece, s in zip(names, vector.split(sizes), shapes, strict=True)}

    return flat, unravel


def model_params(model: nn.Module, dtype: torch.dtype | None = None) -> Params:
    """Detached copies of ``model``'s trainable parameters by name (optionally cast to ``dtype``)."""
    params = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return {k: v.to(dtype) for k, v in params.items()} if dtype is not None else params


def model_loss(model: nn.Module) -> LossFn:
    """The mean cross-entropy of ``model`` as ``loss_fn(params, inputs, targets)``, via ``functional_call``.

    Parameters not in ``params`` (and all buffers) come from ``model``. Put the model in eval mode
    first: batch-norm statistics must not depend on the batch when gradients are taken per sample.
    """

    def loss_fn(params: Params, inputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, params, (inputs,)), targets)

    return loss_fn


def logistic_loss(params: Params, inputs: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy of logistic regression ``σ(x·w + b)``; ``params = {"w": [d], "b": []}``,
    ``targets`` in {0, 1}."""
    return F.binary_cross_entropy_with_logits(inputs @ params["w"] + params["b"], targets.to(inputs.dtype))


def _objective(loss_fn: LossFn, unravel: Callable[[Tensor], Params], inputs: Tensor, targets: Tensor,
               l2: float) -> Callable[[Tensor], Tensor]:
    def objective(flat: Tensor) -> Tensor:
        return loss_fn(unravel(flat), inputs, targets) + 0.5 * l2 * flat.pow(2).sum()

    return objective


def _check_l2_damping(l2: float, damping: float) -> None:
    if l2 < 0 or damping < 0:
        raise ValueError(f"l2={l2} and damping={damping} must be >= 0 (they add a multiple of the identity)")


# --------------------------------------------------------------------------------------------
# Per-sample gradients, Hessian-vector products, the explicit Hessian
# --------------------------------------------------------------------------------------------


def per_sample_grads(loss_fn: LossFn, params: Params, inputs: Tensor, targets: Tensor,
                     chunk_size: int | None = None) -> Tensor:
    """``[n, P]``: the gradient of each sample's loss (no L2 term) w.r.t. the flattened ``params``.

    One ``vmap(grad)`` call, no Python loop over samples; ``chunk_size`` caps how many samples are
    vectorised at once (memory is about ``chunk_size × P`` floats plus activations).
    """
    if len(inputs) != len(targets):
        raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
    flat, unravel = ravel(params)

    def one_sample(vector: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(unravel(vector), x.unsqueeze(0), y.unsqueeze(0))

    return vmap(grad(one_sample), in_dims=(None, 0, 0), chunk_size=chunk_size)(flat, inputs, targets)


def per_sample_grads_loop(loss_fn: LossFn, params: Params, inputs: Tensor, targets: Tensor) -> Tensor:
    """The same as :func:`per_sample_grads`, one backward pass per sample: the slow reference."""
    flat, unravel = ravel(params)
    rows = []
    for x, y in zip(inputs, targets, strict=True):
        vector = flat.clone().requires_grad_(True)
        loss = loss_fn(unravel(vector), x.unsqueeze(0), y.unsqueeze(0))
        rows.append(torch.autograd.grad(loss, vector)[0])
    return torch.stack(rows)


def make_hvp(loss_fn: LossFn, params: Params, inputs: Tensor, targets: Tensor, *, l2: float = 0.0,
             damping: float = 0.0, mode: str = "forward-over-reverse", batch_size: int | None = None,
             generator: torch.Generator | None = None) -> HVP:
    """``v ↦ (H + damping·I) v`` with ``H`` the Hessian of ``mean loss + l2/2 ‖θ‖²`` at ``params``.

    Args:
        mode: ``"forward-over-reverse"`` (``jvp`` of ``grad``: one forward-mode pass through the
            backward graph, the cheapest) or ``"reverse-over-reverse"`` (double backprop:
            differentiate ``gᵀv`` with autograd, as Pearlmutter's trick is usually written).
        batch_size: if given, each call uses a fresh random minibatch of this many samples (the
            stochastic HVPs LiSSA was designed for), drawn with ``generator``.
    """
    _check_l2_damping(l2, damping)
    if mode not in ("forward-over-reverse", "reverse-over-reverse"):
        raise ValueError(f"mode={mode!r}: use 'forward-over-reverse' or 'reverse-over-reverse'")
    if batch_size is not None and not 0 < batch_size <= len(inputs):
        raise ValueError(f"batch_size={batch_size} must be in [1, {len(inputs)}] (the number of samples)")
    flat, unravel = ravel(params)

    def hvp(vector: Tensor) -> Tensor:
        x, y = inputs, targets
        if batch_size is not None:
            pick = torch.randperm(len(inputs), generator=generator)[:batch_size].to(inputs.device)
            x, y = inputs[pick], targets[pick]
        objective = _objective(loss_fn, unravel, x, y, l2)
        if mode == "forward-over-reverse":
            product = jvp(grad(objective), (flat,), (vector,))[1]
        else:
            point = flat.clone().requires_grad_(True)
            gradient = torch.autograd.grad(objective(point), point, create_graph=True)[0]
            product = torch.autograd.grad(gradient @ vector, point)[0]
        return product + damping * vector

    return hvp


def hessian_matrix(loss_fn: LossFn, params: Params, inputs: Tensor, targets: Tensor, *,
                   l2: float = 0.0) -> Tensor:
    """The explicit ``[P, P]`` Hessian of ``mean loss + l2/2 ‖θ‖²``: only for small models (P in the thousands)."""
    _check_l2_damping(l2, 0.0)
    flat, unravel = ravel(params)
    return torch.func.hessian(_objective(loss_fn, unravel, inputs, targets, l2))(flat)


def loss_grad(loss_fn: LossFn, params: Params, inputs: Tensor, targets: Tensor, *, l2: float = 0.0) -> Tensor:
    """The flat gradient of ``mean loss + l2/2 ‖θ‖²`` over all of ``inputs``."""
    flat, unravel = ravel(params)
    return grad(_objective(loss_fn, unravel, inputs, targets, l2))(flat)


# --------------------------------------------------------------------------------------------
# Inverse-HVP solvers
# --------------------------------------------------------------------------------------------


@dataclass
class InverseHVP:
    """An approximate ``x = (H + λI)⁻¹ v`` and how good it is.

    Attributes:
        solution: ``x``.
        residual: the final relative residual ``‖(H + λI)x − v‖ / ‖v‖`` (0 would be exact).
        residuals: the residual after each iteration (or each check), to plot convergence.
        iterations: iterations run.
        hvps: Hessian-vector products the solve used (its cost; the explicit Hessian counts 0).
        seconds: wall-clock time of the solve.
        method: ``"exact"``, ``"cg"`` or ``"lissa"``.
        info: solver-specific numbers (LiSSA's scale, the smallest eigenvalue, ...).
    """

    solution: Tensor
    residual: float
    residuals: list[float]
    iterations: int
    hvps: int
    seconds: float
    method: str
    info: dict = field(default_factory=dict)


def _not_pd_error(where: str, detail: str) -> ValueError:
    return ValueError(f"{where}: the Hessian is not positive definite ({detail}), so H⁻¹v is not a minimiser's "
                      "step. Add damping (damping=λ > 0 adds λI; it must exceed minus the smallest eigenvalue) "
                      "or an L2 term, or use a convex model.")


def _relative_residual(hvp: HVP, x: Tensor, v: Tensor) -> float:
    return ((hvp(x) - v).norm() / v.norm().clamp_min(torch.finfo(v.dtype).tiny)).item()


def solve_exact(hessian: Tensor, v: Tensor, damping: float = 0.0) -> InverseHVP:
    """``(H + damping·I)⁻¹ v`` by a Cholesky factorisation of the explicit Hessian (``v`` may be ``[P]`` or ``[P, k]``).

    Raises:
        ValueError: if ``H + damping·I`` is not positive definite (the message gives the smallest
            eigenvalue, so you know how much damping it needs).
    """
    _check_l2_damping(0.0, damping)
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1] or hessian.shape[0] != v.shape[0]:
        raise ValueError(f"hessian must be [P, P] and v [P] or [P, k]; got {tuple(hessian.shape)} and {tuple(v.shape)}")
    start = time.perf_counter()
    matrix = hessian + damping * torch.eye(len(hessian), dtype=hessian.dtype, device=hessian.device)
    factor, info = torch.linalg.cholesky_ex(matrix)
    if info.item() != 0:
        smallest = torch.linalg.eigvalsh(matrix).min().item()
        raise _not_pd_error("solve_exact", f"smallest eigenvalue of H + {damping}·I is {smallest:.3g}")
    rhs = v if v.ndim == 2 else v.unsqueeze(1)
    solution = torch.cholesky_solve(rhs, factor)
    solution = solution if v.ndim == 2 else solution.squeeze(1)
    seconds = time.perf_counter() - start
    residual = ((matrix @ solution - v).norm() / v.norm()).item()
    return InverseHVP(solution, residual, [residual], 1, 0, seconds, "exact")


def solve_cg(hvp: HVP, v: Tensor, *, damping: float = 0.0, tol: float = 1e-8, max_iter: int = 200) -> InverseHVP:
    """``(H + damping·I)⁻¹ v`` by conjugate gradient: one HVP per iteration, never the explicit Hessian.

    Converges in at most P steps in exact arithmetic, faster when the eigenvalues cluster. Stops when
    the relative residual (tracked by the CG recursion) falls below ``tol``.

    Raises:
        ValueError: on a direction of non-positive curvature (the Hessian is not positive definite).
    """
    _check_l2_damping(0.0, damping)
    if tol <= 0 or max_iter < 1:
        raise ValueError(f"tol={tol} must be > 0 and max_iter={max_iter} >= 1")
    start = time.perf_counter()
    norm_v = v.norm().clamp_min(torch.finfo(v.dtype).tiny)
    x = torch.zeros_like(v)
    r = v.clone()
    p = r.clone()
    rr = r @ r
    residuals, iterations = [], 0
    while iterations < max_iter and (rr.sqrt() / norm_v).item() > tol:
        ap = hvp(p) + damping * p
        curvature = p @ ap
        if curvature.item() <= 0:
            raise _not_pd_error("solve_cg", f"pᵀ(H + {damping}·I)p = {curvature.item():.3g} at iteration {iterations}")
        alpha = rr / curvature
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
        iterations += 1
        residuals.append((rr.sqrt() / norm_v).item())
    seconds = time.perf_counter() - start
    return InverseHVP(x, residuals[-1] if residuals else 0.0, residuals, iterations, iterations, seconds, "cg")


def largest_eigenvalue(hvp: HVP, dim: int, *, iterations: int = 30, dtype: torch.dtype = torch.float64,
                       device: torch.device | str = "cpu", seed: int = 0) -> float:
    """The Hessian's largest eigenvalue by power iteration (``iterations`` HVPs): LiSSA's scale must exceed it."""
    vector = torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)
    value = 0.0
    for _ in range(iterations):
        vector = vector / vector.norm()
        product = hvp(vector)
        value = (vector @ product).item()
        vector = product
    return value


def solve_lissa(hvp: HVP, v: Tensor, *, damping: float = 0.0, scale: float | None = None, steps: int = 1000,
                check_every: int = 50, exact_hvp: HVP | None = None) -> InverseHVP:
    """``(H + damping·I)⁻¹ v`` by LiSSA: the Neumann series ``x_j = v + (I − (H + λI)/s) x_{j−1}``, answer ``x/s``.

    Converges when ``s`` exceeds the largest eigenvalue of ``H + λI`` and the smallest is positive; the
    error shrinks by ``1 − λ_min/s`` per step, so an ill-conditioned Hessian needs many steps (damping
    helps, at the price of a biased answer).

    Args:
        hvp: the HVP used by the recursion; may be stochastic (``make_hvp(..., batch_size=...)``).
        scale: ``s``; default 1.1 × the largest eigenvalue of ``H + λI`` by power iteration (its HVPs
            are counted in ``hvps``).
        check_every: record the residual every this many steps (with ``exact_hvp``, default ``hvp``;
            those HVPs are monitoring, not counted in ``hvps``).

    Raises:
        ValueError: if the series blows up (a negative eigenvalue, or ``scale`` too small).
    """
    _check_l2_damping(0.0, damping)
    if steps < 1 or check_every < 1:
        raise ValueError(f"steps={steps} and check_every={check_every} must be >= 1")
    exact_hvp = exact_hvp or hvp
    hvps = 0
    start = time.perf_counter()
    if scale is None:
        scale = 1.1 * (largest_eigenvalue(exact_hvp, v.numel(), dtype=v.dtype, device=v.device) + damping)
        hvps += 30
    if scale <= 0:
        raise ValueError(f"scale={scale} must be > 0 (and above the largest eigenvalue of H + damping·I)")
    estimate = v.clone()
    residuals = []
    monitoring = 0.0
    for step in range(1, steps + 1):
        estimate = v + estimate - (hvp(estimate) + damping * estimate) / scale
        hvps += 1
        if step % check_every == 0 or step == steps:
            tick = time.perf_counter()
            residual = _relative_residual(lambda u: exact_hvp(u) + damping * u, estimate / scale, v)
            monitoring += time.perf_counter() - tick
            residuals.append(residual)
            if not math.isfinite(residual) or residual > 1e6:
                raise _not_pd_error("solve_lissa", f"the series diverged (residual {residual:.3g} after {step} "
                                    f"steps with scale {scale:.3g}); a negative eigenvalue, or a scale below "
                                    "the largest eigenvalue")
    seconds = time.perf_counter() - start - monitoring
    return InverseHVP(estimate / scale, residuals[-1], residuals, steps, hvps, seconds, "lissa",
                      {"scale": scale, "check_every": check_every})


# --------------------------------------------------------------------------------------------
# Influence
# --------------------------------------------------------------------------------------------


def influence_on_test_loss(train_grads: Tensor, s_test: Tensor) -> Tensor:
    """Koh & Liang's ``I_up,loss(z_i, z_test) = −∇L(z_test)ᵀ H⁻¹ ∇L(z_i)`` for every training point.

    Args:
        train_grads: ``[n, P]`` gradients of each training point's (regularised) loss.
        s_test: ``H⁻¹ ∇L(z_test)`` (a solver's ``.solution``), computed once for all training points.

    Up-weighting ``z_i`` by ``ε`` changes the test loss by ``ε·I``; removing it (``ε = −1/n``)
    changes it by about ``−I/n`` (see :func:`predicted_removal_change`).
    """
    if train_grads.ndim != 2 or train_grads.shape[1] != s_test.shape[0]:
        raise ValueError(f"train_grads must be [n, P] with P = len(s_test) = {s_test.shape[0]}; "
                         f"got {tuple(train_grads.shape)}")
    return -(train_grads @ s_test)


def predicted_removal_change(train_grads: Tensor, s_test: Tensor, n: int) -> Tensor:
    """The predicted change in test loss when each training point alone is removed from ``n``: ``+(1/n) gᵢᵀ s_test``."""
    return -influence_on_test_loss(train_grads, s_test) / n


def self_influence(train_grads: Tensor, hessian: Tensor, damping: float = 0.0) -> Tensor:
    """``gᵢᵀ (H + λI)⁻¹ gᵢ`` for each row of ``train_grads``: how much each point pulls the model toward itself.

    Large values flag points the model had to bend for (mislabelled or atypical ones). Uses the
    explicit Hessian: one Cholesky factorisation for all points.
    """
    solved = solve_exact(hessian, train_grads.T, damping).solution
    return (train_grads.T * solved).sum(0)


# --------------------------------------------------------------------------------------------
# Training small models to convergence, and Newton-step removal
# --------------------------------------------------------------------------------------------


def minimise(loss_fn: LossFn, params: Params, inputs: Tensor, targets: Tensor, *, l2: float = 0.0,
             method: str = "newton", tol: float = 1e-10, max_iter: int = 100, hessian: Tensor | None = None,
             ) -> tuple[Params, float]:
    """Minimise ``mean loss + l2/2 ‖θ‖²`` from ``params``; return ``(params, final gradient norm)``.

    ``"newton"``: Newton steps with the explicit Hessian (shifted by a multiple of I where it is not
    positive definite) and a backtracking line search; for small convex models it converges to
    machine precision in a few steps, and it is the fastest way to a local minimum of a tiny MLP too.
    Given ``hessian``, Newton re-uses that matrix at every step instead of recomputing it (the chord
    method: linear instead of quadratic convergence, but each step costs one gradient); it still
    stops at a true stationary point, since the gradient is exact. That is how many nearby problems,
    such as leave-one-out retrains started from the full-data optimum, are solved cheaply. ``"lbfgs"``: full-batch
    L-BFGS, for small non-convex models (a local minimum near the start). Use float64 for ``tol``
    below about 1e-6.
    """
    _check_l2_damping(l2, 0.0)
    flat, unravel = ravel(params)
    objective = _objective(loss_fn, unravel, inputs, targets, l2)
    if method == "newton":
        fixed = None
        if hessian is not None:
            if hessian.shape != (len(flat), len(flat)):
                raise ValueError(f"hessian must be [{len(flat)}, {len(flat)}], got {tuple(hessian.shape)}")
            fixed, info = torch.linalg.cholesky_ex(hessian)
            if info.item() != 0:
                raise _not_pd_error("minimise", "its Cholesky factorisation failed")
        for _ in range(max_iter):
            gradient = grad(objective)(flat)
            if gradient.norm().item() < tol:
                break
            if fixed is None:
                matrix, shift = torch.func.hessian(objective)(flat), 0.0
                while True:  # Levenberg-Marquardt: shift a non-convex model's Hessian until it is positive definite
                    try:
                        factor = torch.linalg.cholesky(matrix + shift * torch.eye(len(flat), dtype=flat.dtype,
                                                                                   device=flat.device))
                        break
                    except torch.linalg.LinAlgError:
                        shift = max(10 * shift, 1e-6 * matrix.diagonal().abs().max().item())
            else:
                factor = fixed
            step = torch.cholesky_solve(gradient.unsqueeze(1), factor).squeeze(1)
            value, t = objective(flat), 1.0
            # Armijo backtracking; the slack of a few ulps lets the last, tiny steps through, whose true
            # decrease is below the rounding error of the objective.
            slack = 4 * torch.finfo(flat.dtype).eps * value.abs()
            while objective(flat - t * step) > value - 1e-4 * t * (gradient @ step) + slack and t > 1e-8:
                t /= 2
            flat = flat - t * step
    elif method == "lbfgs":
        point = flat.clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([point], lr=1, max_iter=max_iter, tolerance_grad=tol,
                                      tolerance_change=0, history_size=50, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            value = objective(point)
            value.backward()
            return value

        optimizer.step(closure)
        flat = point.detach()
    else:
        raise ValueError(f"method={method!r}: use 'newton' (small convex models) or 'lbfgs'")
    final = grad(objective)(flat).norm().item()
    return {k: v.clone() for k, v in unravel(flat).items()}, final


def _as_mask(forget: Tensor, n: int) -> Tensor:
    forget = torch.as_tensor(forget)
    if forget.dtype == torch.bool:
        if forget.shape != (n,):
            raise ValueError(f"a boolean forget mask must have shape ({n},), got {tuple(forget.shape)}")
        mask = forget.clone()
    else:
        if forget.is_floating_point():
            raise ValueError(f"forget must be integer indices or a boolean mask, got dtype {forget.dtype}")
        if forget.numel() and (forget.min() < 0 or forget.max() >= n):
            raise ValueError(f"forget indices must be in [0, {n}); got min {forget.min().item()}, "
                             f"max {forget.max().item()}")
        mask = torch.zeros(n, dtype=torch.bool, device=forget.device)
        mask[forget] = True
    if not mask.any() or mask.all():
        raise ValueError(f"forget selects {int(mask.sum())} of {n} samples; select at least one and fewer than all")
    return mask


def newton_removal(loss_fn: LossFn, params: Params, inputs: Tensor, targets: Tensor, forget: Tensor, *,
                   l2: float = 0.0, damping: float = 0.0, solver: str = "exact", cg_tol: float = 1e-10,
                   ) -> tuple[Params, InverseHVP]:
    """Remove ``inputs[forget]`` by one Newton step: ``θ_u = θ + (H_r + λI)⁻¹ (1/n_r) Σ_{z∈D_f} (∇L(z) + l2·θ)``.

    If ``params`` minimise ``mean loss + l2/2 ‖θ‖²`` over all of ``inputs``, the bracket is exactly
    minus ``n_r`` times the gradient of the retained objective, so this is one Newton step on the
    retained objective from θ: exact up to third-order terms for a smooth convex model. It uses the
    forget set's gradients and the retained data's Hessian, never a retrain.

    Args:
        forget: indices into ``inputs`` or a boolean mask.
        l2: the L2 coefficient the model was trained with.
        damping: λ added to the Hessian (needed when it is not positive definite; it shortens the step).
        solver: ``"exact"`` (explicit Hessian; small models) or ``"cg"`` (HVPs only).

    Returns:
        ``(new params, the InverseHVP of the step)``.
    """
    mask = _as_mask(forget, len(inputs)).to(inputs.device)
    retain_x, retain_y = inputs[~mask], targets[~mask]
    flat, unravel = ravel(params)
    forget_grads = per_sample_grads(loss_fn, params, inputs[mask], targets[mask])
    rhs = (forget_grads.sum(0) + int(mask.sum()) * l2 * flat) / len(retain_x)
    if solver == "exact":
        solve = solve_exact(hessian_matrix(loss_fn, params, retain_x, retain_y, l2=l2), rhs, damping)
    elif solver == "cg":
        solve = solve_cg(make_hvp(loss_fn, params, retain_x, retain_y, l2=l2), rhs, damping=damping, tol=cg_tol)
    else:
        raise ValueError(f"solver={solver!r}: use 'exact' or 'cg'")
    return {k: v.clone() for k, v in unravel(flat + solve.solution).items()}, solve


def binary_projection_problem(data: ImageDataset, classes: tuple[int, int] = (0, 6), *, n_train: int = 600,
                              n_test: int = 400, dims: int = 50, seed: int = 0,
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A small convex test bed from ``data``: two classes, pixels through a fixed random projection.

    Returns float64 ``(x_train, y_train, x_test, y_test)``: ``dims`` standardised features (random
    Gaussian projection of the pixels, seeded) and labels 1 for ``classes[1]``, 0 for ``classes[0]``.
    Logistic regression on it trains to machine precision in milliseconds, so leave-one-out
    retrains are cheap ground truth.
    """
    if len(classes) != 2 or classes[0] == classes[1] or not all(0 <= c < data.num_classes for c in classes):
        raise ValueError(f"classes={classes}: give two different labels in [0, {data.num_classes})")
    generator = torch.Generator().manual_seed(seed)
    labels = data.labels.cpu()

    def pick(pool: Tensor, n: int, what: str) -> Tensor:
        pool = pool.cpu()
        pool = pool[(labels[pool] == classes[0]) | (labels[pool] == classes[1])]
        if n > len(pool):
            raise ValueError(f"{what}={n} but only {len(pool)} images of classes {classes} are available")
        return pool[torch.randperm(len(pool), generator=generator)[:n]]

    train, test = pick(data.train_pool, n_train, "n_train"), pick(data.test_pool, n_test, "n_test")
    pixels = data.images[0].numel()
    projection = torch.randn(pixels, dims, generator=generator, dtype=torch.float64) / math.sqrt(pixels)

    def features(idx: Tensor) -> Tensor:
        return (data.images[idx.to(data.device)].cpu().flatten(1).double() / 255) @ projection

    x_train, x_test = features(train), features(test)
    mean, std = x_train.mean(0), x_train.std(0)
    as_label = (lambda idx: (labels[idx] == classes[1]).double())
    return (x_train - mean) / std, as_label(train), (x_test - mean) / std, as_label(test)


# --------------------------------------------------------------------------------------------
# The registered method: a Newton step on the classifier head
# --------------------------------------------------------------------------------------------


def _head_hessian_chunked(features: Tensor, logits: Tensor, chunk: int = 2048) -> Tensor:
    # head_hessian materialises an [n, C, C, d+1] intermediate; summing chunks keeps memory bounded.
    total = torch.zeros((), dtype=torch.float64, device=features.device)
    for start in range(0, len(features), chunk):
        f, z = features[start:start + chunk], logits[start:start + chunk]
        total = total + head_hessian(f, z) * len(f)
    return total / len(features)


@register("newton_head")
def newton_head(model: nn.Module, data: ImageDataset, split: Split, *, weight_decay: float = 5e-4,
                damping: float = 0.0, label_smoothing: float = 0.0) -> UnlearningResult:
    """Classifier-level influence unlearning: one Newton step on the final linear layer, backbone frozen.

    With ``h`` the frozen features and ``θ = [W.flatten(), b]`` the head,
    ``θ_u = θ + (H_r + (weight_decay + damping)·I)⁻¹ (1/n_r) Σ_{z∈D_f} (∇L(z) + weight_decay·θ)``,
    where ``H_r`` is the exact Hessian of the mean cross-entropy over the retained features and
    ``∇L(z)`` the closed-form per-sample head gradients. It uses only the model, the forget set and the
    retained data (never the oracle), and is exact if the head were the only trained part and had
    converged; on a deep net the backbone still carries what it learnt from ``D_f``.

    Args:
        weight_decay: the L2 coefficient the model was trained with (``recipe.weight_decay``); it is
            also what makes the softmax head's Hessian invertible.
        damping: extra λ on the Hessian's diagonal (shrinks the step; needed if ``weight_decay=0``).
        label_smoothing: the label smoothing the model was trained with (``recipe.label_smoothing``;
            the CIFAR recipes use it): the step removes the forget set's gradients of the loss the
            model was trained to a minimum of, so it must be that loss.

    Raises:
        TypeError: if the model has no final linear layer at ``.head``.
        ValueError: for a negative hyper-parameter, a bad split or a Hessian that is not positive definite.
    """
    check_call(model, data, split)
    head = head_of(model)
    if weight_decay < 0 or damping < 0:
        raise ValueError(f"weight_decay={weight_decay} and damping={damping} must be >= 0")
    unlearned = clone(model)  # outside the timed region, as in every other method
    with Stopwatch(data.device) as watch:
        with torch.no_grad():
            features_r = head_inputs(model, data, split.retain).double()
            features_f = head_inputs(model, data, split.forget).double()
            weight, bias = head.weight.double(), head.bias.double()
            theta = flat_head_params(head).double()
            forget_labels = data.labels[split.forget.to(data.device)]
            grads = per_sample_head_grads(features_f, features_f @ weight.T + bias, forget_labels,
                                          label_smoothing)
            rhs = (grads.sum(0) + len(split.forget) * weight_decay * theta) / len(split.retain)
            hessian = _head_hessian_chunked(features_r, features_r @ weight.T + bias)
            # SGD's weight decay also decays the bias, so the L2 term goes on every entry, not only W.
            solve = solve_exact(hessian, rhs, damping=weight_decay + damping)
            new_theta = theta + solve.solution
        new_head = head_of(unlearned)
        with torch.no_grad():
            n_weights = new_head.weight.numel()
            new_head.weight.copy_(new_theta[:n_weights].view_as(new_head.weight))
            new_head.bias.copy_(new_theta[n_weights:])
    details = {"weight_decay": weight_decay, "damping": damping, "label_smoothing": label_smoothing,
               "forgotten": len(split.forget), "retained": len(split.retain), "step_norm": solve.solution.norm().item(),
               "residual": solve.residual, "head_params": theta.numel()}
    return UnlearningResult(unlearned, watch.seconds, "newton_head", details)
