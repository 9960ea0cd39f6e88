"""Measuring forgetting: accuracies, membership-inference attacks, distance to the retrain oracle,
and the one comparison table every lesson uses (columns as in the course's EVALUATION design).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from sklearn.svm import SVC
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data import ImageDataset, Split
from .train import Recipe, autocast, fit

TABLE_COLUMNS = ("forget acc", "retain acc", "test acc", "MIA", "gap", "JS to retrain", "seconds", "speed-up")
#: The columns the table's ``gap`` averages over.
GAP_COLUMNS = ("forget acc", "retain acc", "test acc", "MIA")


@torch.no_grad()
def forward_in_batches(model: nn.Module, data: ImageDataset, indices: Tensor, width: int,
                       forward: Callable[[Tensor], Tensor] | None = None, batch_size: int = 2048) -> Tensor:
    """``forward(x)`` (by default ``model(x)``) in float32 for ``data[indices]``: eval mode, batched, on the data's
    device, under the device's autocast policy. ``width`` is the output's width, the shape of an empty answer.

    The model's train/eval mode is restored afterwards, also when ``forward`` raises.
    """
    forward = model if forward is None else forward
    was_training = model.training
    model.eval()
    indices = torch.as_tensor(indices).to(data.device)
    out = []
    try:
        with autocast(data.device):
            for start in range(0, len(indices), batch_size):
                out.append(forward(data.images[indices[start:start + batch_size]]).float())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, width, device=data.device)


def predict_logits(model: nn.Module, data: ImageDataset, indices: Tensor, batch_size: int = 2048) -> Tensor:
    """Float32 logits of ``model`` on ``data[indices]`` (eval mode, batched, on the data's device).

    The model's train/eval mode is restored afterwards.
    """
    return forward_in_batches(model, data, indices, data.num_classes, batch_size=batch_size)


def accuracy(model: nn.Module, data: ImageDataset, indices: Tensor, *, flip_tta: bool = False) -> float:
    """Share of ``data[indices]`` classified correctly, in [0, 1].

    ``flip_tta=True`` classifies each image by the sum of the logits of the image and of its mirror image
    (test-time augmentation by horizontal flips, as airbench reports its CIFAR-10 accuracy). Use it only
    where a mirror image keeps its label (photographs, not digits); the course's tables never do.
    """
    if len(indices) == 0:
        raise ValueError("accuracy of an empty set of images is undefined: give at least one index")

    def mirrored(x: Tensor) -> Tensor:
        return model(x) + model(x.flip(-1))

    logits = forward_in_batches(model, data, indices, data.num_classes, forward=mirrored if flip_tta else None)
    return (logits.argmax(1) == data.labels[torch.as_tensor(indices).to(data.device)]).float().mean().item()


def assert_same_model(ours: nn.Module, theirs: nn.Module, data: ImageDataset, indices: Tensor, *,
                      rtol: float = 0.0, atol: float = 0.0, max_disagreement: float = 0.02,
                      exact: bool | None = None) -> None:
    """Check that two models built the same way (from scratch, and by the kit) are the same model.

    On the CPU, where the kit computes in fp32 with deterministic kernels, every entry of the two
    state dicts must agree to ``rtol`` / ``atol`` (the default 0 asks for bit-for-bit equality). On a
    GPU, reduced-precision autocast and kernels that sum with atomics make two runs of one
    computation differ in the last bits, and training amplifies them; there the two must predict the
    same class for all but ``max_disagreement`` of ``data[indices]``. ``exact`` overrides the choice
    (default: exact on the CPU only).

    Raises:
        AssertionError: naming the first entry that differs, or the share of predictions that do.
    """
    if exact is None:
        exact = data.device.type == "cpu"
    if exact:
        mine, kits = ours.state_dict(), theirs.state_dict()
        if mine.keys() != kits.keys():
            raise AssertionError(f"the models have different entries: {sorted(mine.keys() ^ kits.keys())}")
        for name, tensor in mine.items():
            torch.testing.assert_close(tensor, kits[name], rtol=rtol, atol=atol,
                                       msg=lambda message, name=name: f"{name}: {message}")
        return
    predicted = [predict_logits(model, data, indices).argmax(1) for model in (ours, theirs)]
    disagreement = (predicted[0] != predicted[1]).float().mean().item()
    if disagreement > max_disagreement:
        raise AssertionError(f"the models predict different classes for {disagreement:.1%} of the samples; at most "
                             f"{max_disagreement:.0%} is rounding on {data.device.type}")


def true_class_confidence(logits: Tensor, labels: Tensor) -> Tensor:
    """p(y | x): the softmax probability of each sample's true label."""
    return logits.softmax(1).gather(1, labels.view(-1, 1)).squeeze(1)


def confidences(model: nn.Module, data: ImageDataset, indices: Tensor) -> Tensor:
    """p(y | x) of ``model`` for each of ``data[indices]``."""
    indices = torch.as_tensor(indices).to(data.device)
    return true_class_confidence(predict_logits(model, data, indices), data.labels[indices])


def attack_auc(member_scores: Tensor, nonmember_scores: Tensor) -> float:
    """AUC of telling members from non-members by a score (higher = "more likely a member").

    0.5 means the attack cannot tell them apart; 1.0 means it separates them perfectly.
    """
    scores = torch.cat([member_scores, nonmember_scores]).double().cpu().numpy()
    truth = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    return float(roc_auc_score(truth, scores))


def tpr_at_fpr(member_scores: Tensor, nonmember_scores: Tensor, fpr: float = 0.01) -> float:
    """True-positive rate of the attack at the threshold that flags a share ``fpr`` of non-members.

    The low-FPR regime is what matters for privacy: an attack that confidently identifies a few
    members is dangerous even when its AUC is near 0.5 (Carlini et al. 2022).
    """
    threshold = torch.quantile(nonmember_scores.double().cpu(), 1 - fpr)
    return (member_scores.double().cpu() > threshold).double().mean().item()


def threshold_attack(model: nn.Module, data: ImageDataset, members: Tensor, nonmembers: Tensor) -> float:
    """The confidence-threshold membership attack: AUC of separating ``members`` from ``nonmembers``
    by p(y | x). For unlearning, members = the forget set, non-members = the test set; the target
    is the retrain oracle's value, not 0.5, when the two sets differ in distribution."""
    return attack_auc(confidences(model, data, members), confidences(model, data, nonmembers))


def mia_efficacy(model: nn.Module, data: ImageDataset, split: Split, *, max_per_class: int = 1000,
                 seed: int = 0) -> float:
    """MIA-efficacy (the SVC attack of the l1-sparse and SalUn papers), in [0, 1].

    An RBF SVM learns to tell retain samples (members) from test samples (non-members) by their
    confidence p(y | x), on a balanced subsample of at most ``max_per_class`` of each so the fit
    takes a second; it is then applied to the forget set. Returned: the share of forget samples
    it calls *non-members*. Higher = more forgotten; compare with the retrain oracle's value.
    """
    generator = torch.Generator().manual_seed(seed)
    n = min(len(split.retain), len(split.test), max_per_class)
    members = split.retain[torch.randperm(len(split.retain), generator=generator)[:n]]
    nonmembers = split.test[torch.randperm(len(split.test), generator=generator)[:n]]
    features = confidences(model, data, torch.cat([members, nonmembers])).double().cpu().numpy()[:, None]
    attack = SVC(C=3, gamma="auto", kernel="rbf").fit(features, np.r_[np.ones(n), np.zeros(n)])
    forget_features = confidences(model, data, split.forget).double().cpu().numpy()[:, None]
    return float((attack.predict(forget_features) == 0).mean())


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence (natural log, in [0, ln 2]) between rows of two probability tensors."""
    m = 0.5 * (p + q)

    def kl(a: Tensor, b: Tensor) -> Tensor:
        return (a * (a.clamp_min(1e-12).log() - b.clamp_min(1e-12).log())).sum(1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def js_to_oracle(model: nn.Module, oracle: nn.Module, data: ImageDataset, split: Split) -> float:
    """Mean JS divergence between ``model``'s and the oracle's outputs, averaged over D_f and D_t."""
    values = []
    for indices in (split.forget, split.test):
        p = predict_logits(model, data, indices).softmax(1)
        q = predict_logits(oracle, data, indices).softmax(1)
        values.append(js_divergence(p, q).mean().item())
    return float(np.mean(values))


def evaluate_model(model: nn.Module, data: ImageDataset, split: Split, *, seed: int = 0) -> dict[str, float]:
    """The per-model columns of the table: forget / retain / test accuracy and MIA-efficacy, in %."""
    return {
        "forget acc": 100 * accuracy(model, data, split.forget),
        "retain acc": 100 * accuracy(model, data, split.retain),
        "test acc": 100 * accuracy(model, data, split.test),
        "MIA": 100 * mia_efficacy(model, data, split, seed=seed),
    }


def gap_to_oracle(table: pd.DataFrame, columns: Sequence[str] = GAP_COLUMNS, oracle: str = "retrain") -> pd.Series:
    """Each row's mean absolute difference from the ``oracle`` row over ``columns``, in percentage points.

    With the default columns this is the table's ``gap``; pass the three accuracy columns alone to leave out
    MIA-efficacy, which for a single model can jump by tens of points (lesson 06).
    """
    columns = list(columns)
    return (table[columns] - table.loc[oracle, columns]).abs().mean(axis=1)


def comparison_table(rows: Mapping[str, object], data: ImageDataset, split: Split, *, oracle: str = "retrain",
                     seed: int = 0) -> pd.DataFrame:
    """The course's comparison table, retrain oracle first.

    Args:
        rows: name -> an unlearning result (anything with ``.model`` and ``.seconds``) or a
            ``(model, seconds)`` pair; must include the oracle's row.
        oracle: the name of the retrain row; ``gap``, ``JS to retrain`` and ``speed-up`` are
            measured against it.

    Returns:
        A DataFrame indexed by method with the columns ``forget acc``, ``retain acc``,
        ``test acc``, ``MIA`` (MIA-efficacy; all in %), ``gap`` (mean absolute difference from
        the oracle over those four, in percentage points), ``JS to retrain`` (mean JS divergence
        of the outputs on D_f and D_t), ``seconds`` and ``speed-up`` (oracle seconds / seconds).
    """
    if oracle not in rows:
        raise ValueError(f"the table needs the retrain oracle's row {oracle!r}; got rows {list(rows)}")

    def unpack(row) -> tuple[nn.Module, float]:
        if hasattr(row, "model") and hasattr(row, "seconds"):
            return row.model, float(row.seconds)
        model, seconds = row
        return model, float(seconds)

    oracle_model, oracle_seconds = unpack(rows[oracle])
    records = {}
    for name in [oracle, *[n for n in rows if n != oracle]]:
        model, seconds = unpack(rows[name])
        records[name] = evaluate_model(model, data, split, seed=seed)
        records[name]["JS to retrain"] = 0.0 if name == oracle else js_to_oracle(model, oracle_model, data, split)
        records[name]["seconds"] = seconds
        records[name]["speed-up"] = oracle_seconds / seconds if seconds > 0 else math.inf
    table = pd.DataFrame.from_dict(records, orient="index")
    table["gap"] = gap_to_oracle(table, oracle=oracle)
    table.index.name = "method"
    return table[list(TABLE_COLUMNS)]


# --------------------------------------------------------------------------------------------
# LiRA, offline variant (Carlini et al. 2022)
# --------------------------------------------------------------------------------------------


def scaled_logit_confidence(logits: Tensor, labels: Tensor) -> Tensor:
    """LiRA's statistic: log p(y|x) - log(1 - p(y|x)), computed stably from the logits.

    Unlike p itself, it is close to Gaussian across models, which is what the attack assumes.
    """
    true = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, labels.view(-1, 1), float("-inf")).logsumexp(1)
    return true - others


def lira_offline(target_statistic: Tensor, shadow_statistics: Tensor, shadow_in: Tensor, *,
                 fixed_variance: bool = True, min_out: int = 2) -> Tensor:
    """Per-example membership scores of the offline likelihood-ratio attack (LiRA).

    For each example, the shadow models that did *not* train on it (OUT) show what its confidence
    looks like when it is not a member; the attack measures how far the target model's confidence
    lies above that, in standard deviations.

    Args:
        target_statistic: ``[n]`` scaled-logit confidences of the attacked model.
        shadow_statistics: ``[K, n]`` the same statistic under K shadow models.
        shadow_in: ``[K, n]`` bool, whether each example was in each shadow's training set.
        fixed_variance: use one variance pooled over all examples (the paper's choice when there are
            few shadow models) instead of a per-example one.
        min_out: examples with fewer OUT shadows than this get a score of 0 (no evidence).

    Returns:
        ``[n]`` z-scores ``(target - mean_out) / std_out``: high = likely a member.
    """
    out = ~shadow_in.to(shadow_statistics.device)  # membership is bookkept on the CPU, statistics on the data's device
    count = out.sum(0)
    if (count < min_out).all():
        raise ValueError(f"no example has {min_out} or more OUT shadow models; train more shadows")
    stats = shadow_statistics.double()
    mean = (stats * out).sum(0) / count.clamp_min(1)
    squared = ((stats - mean) ** 2) * out
    if fixed_variance:
        var = squared.sum() / (count - 1).clamp_min(0).sum().clamp_min(1)
    else:
        var = squared.sum(0) / (count - 1).clamp_min(1)
    z = (target_statistic.to(stats.device).double() - mean) / var.sqrt().clamp_min(1e-6)
    return torch.where(count >= min_out, z, torch.zeros_like(z)).float()


def train_shadow_models(data: ImageDataset, pool: Tensor, count: int, recipe: Recipe, *, arch: str = "mlp",
                        seed: int = 0, progress: bool = True) -> tuple[list[nn.Module], Tensor]:
    """Train ``count`` shadow models, each on a random half of ``pool``, for LiRA.

    Returns the models and a ``[count, len(pool)]`` bool tensor saying which pool members each
    shadow trained on (column ``j`` is ``pool[j]``). Models come from the model cache when they can.
    """
    generator = torch.Generator().manual_seed(seed)
    pool = torch.as_tensor(pool).cpu()
    models, membership = [], []
    for k in tqdm(range(count), desc="shadow models", leave=False, disable=not progress):
        half = pool[torch.randperm(len(pool), generator=generator)[: len(pool) // 2]].sort().values
        model, _ = fit(data, half, recipe, arch=arch, seed=seed * 1000 + k, progress=False)
        models.append(model)
        membership.append(torch.isin(pool, half))
    return models, torch.stack(membership)


def shadow_statistics(shadow_models: list[nn.Module], data: ImageDataset, indices: Tensor) -> Tensor:
    """``[K, n]`` scaled-logit confidences of each shadow model on ``data[indices]``."""
    indices = torch.as_tensor(indices).to(data.device)
    labels = data.labels[indices]
    return torch.stack([scaled_logit_confidence(predict_logits(m, data, indices), labels) for m in shadow_models])


def per_class_accuracy(model: nn.Module, data: ImageDataset, indices: Tensor) -> Tensor:
    """Accuracy of ``model`` on each class among ``data[indices]`` (NaN for a class with no sample)."""
    indices = torch.as_tensor(indices).to(data.device)
    correct = (predict_logits(model, data, indices).argmax(1) == data.labels[indices]).float()
    labels = data.labels[indices]
    totals = torch.bincount(labels, minlength=data.num_classes).float()
    hits = torch.bincount(labels, weights=correct, minlength=data.num_classes)
    return torch.where(totals > 0, hits / totals.clamp_min(1), torch.full_like(totals, float("nan"))).cpu()
