"""IMU's influence scores for a forget set: vectorised vs a per-sample loop, side by side.

The IMU authors' code computes each forget sample's head gradient in a Python loop (one forward
and one backward per sample). The kit uses the closed form of a linear softmax head's gradient,
``(p - e_y) [h; 1]^T``, for all samples at once. Both paths start from the same head inputs and
end in the same damped-diagonal-Fisher formula; the script checks they agree, then times them
(median of repeats after a warm-up) and writes ``imu_<device type>.json`` and ``.md`` to ``--results``.

    python benchmarks/bench_imu.py [--device auto] [--n 5000] [--repeats 5] [--threads N] [--results benchmarks/results]
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from unlearnkit.benchmarking import (
    benchmark_parser,
    median_seconds,
    parse_benchmark_args,
    record_header,
    run_summary,
    write_results,
)
from unlearnkit.data import load_dataset, random_split
from unlearnkit.device import get_device
from unlearnkit.head import head_inputs, per_sample_head_grads
from unlearnkit.methods.imu import influence_scores
from unlearnkit.train import default_recipe, fit

RESULTS = Path(__file__).resolve().parent / "results"


def loop_scores(head: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor, damping: float = 0.01):
    """The per-sample loop: one autograd pass per forget sample, then the same formula."""
    rows = []
    for h, y in zip(features, labels, strict=True):
        loss = F.cross_entropy(head(h[None]), y[None])
        gw, gb = torch.autograd.grad(loss, [head.weight, head.bias])
        rows.append(torch.cat([gw.flatten(), gb]))
    grads = torch.stack(rows).double()
    mean_grad = grads.mean(0)
    return -(grads @ (mean_grad / (grads.square().mean(0) + damping)))


def vmap_scores(head: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor, damping: float = 0.01):
    """``vmap(grad)``: per-sample gradients of any head, batched by torch.func, then the same formula."""
    params = {k: v.detach() for k, v in head.named_parameters()}

    def loss(p, h, y):
        return F.cross_entropy(functional_call(head, p, (h[None],)), y[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, features, labels)
    grads = torch.cat([g["weight"].flatten(1), g["bias"]], 1).double()
    mean_grad = grads.mean(0)
    return -(grads @ (mean_grad / (grads.square().mean(0) + damping)))


def materialised_scores(head: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor, damping: float = 0.01):
    """Closed-form per-sample gradients stored as an ``[n, P]`` matrix (``per_sample_head_grads``), then the formula."""
    with torch.no_grad():
        logits = head(features)
    grads = per_sample_head_grads(features.double(), logits.double(), labels)
    mean_grad = grads.mean(0)
    return -(grads @ (mean_grad / (grads.square().mean(0) + damping)))


def kit_scores(head: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor):
    """What ``imu`` runs: the closed form through its outer-product structure, no ``[n, P]`` matrix."""
    with torch.no_grad():
        logits = head(features)
    return influence_scores(features, logits, labels)


def main(argv: list[str] | None = None) -> dict:
    parser = benchmark_parser(__doc__, repeats=5, results=RESULTS)
    parser.add_argument("--n", type=int, default=5000, help="forget samples")
    args = parse_benchmark_args(parser, argv)

    device = get_device(args.device)
    header = record_header("imu", device)
    data = load_dataset("embedded", device)
    if not 0 < args.n < data.n_train_pool:
        parser.error(f"--n must be between 1 and {data.n_train_pool - 1}")
    split = random_split(data, args.n, seed=0)
    # the quick-mode MLP on the whole embedded training pool: a trained head, as IMU would see it
    model, _ = fit(data, split.train, default_recipe(data, "mlp", quick=True), arch="mlp", seed=0, progress=False)
    head = model.head
    features = head_inputs(model, data, split.forget)
    labels = data.labels[split.forget.to(device)]

    reference = loop_scores(head, features, labels)
    # the loop's float32 gradients differ in the last bits; scores near 0 then differ in relative
    # terms, so tolerate an absolute error that is tiny compared with the scores' range
    tolerance = 1e-5 * reference.abs().max().item()
    paths = {"per-sample loop": loop_scores, "vmap(grad)": vmap_scores,
             "closed form, materialised": materialised_scores, "closed form, factorised (kit)": kit_scores}
    for name, fn in list(paths.items())[1:]:
        torch.testing.assert_close(fn(head, features, labels), reference, rtol=1e-4, atol=tolerance,
                                   msg=lambda m, name=name: f"{name} scores disagree with the loop: {m}")

    seconds = {name: median_seconds(lambda fn=fn: fn(head, features, labels), device,
                                    args.repeats if name == "per-sample loop" else 4 * args.repeats)
               for name, fn in paths.items()}
    loop = seconds["per-sample loop"]

    result = header | {
        "description": "IMU influence scores of a forget set (head gradients + damped diagonal Fisher)",
        "forget_samples": args.n,
        "head": f"{head.in_features} -> {head.out_features}",
        "seconds_median": seconds,
        "speedup_vs_loop": {name: loop / t for name, t in seconds.items()},
        "agree_with_loop": True,
    }
    rows = "\n".join(f"| {k} | {v:.4f} | {loop / v:.1f}x |" for k, v in result["seconds_median"].items())
    text = (f"# IMU influence scores, {args.n} forget samples, head {result['head']}\n\n"
            f"{run_summary(result)}. Medians after a warm-up; all "
            "paths give the same scores (checked).\n\n"
            f"| path | seconds | speed-up vs loop |\n|---|---|---|\n{rows}\n")
    write_results(result, text, "imu", device, args.results)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
