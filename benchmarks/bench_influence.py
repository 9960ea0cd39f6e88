"""Benchmark of lesson 04's speed claims, measured side by side in one run.

1. Per-sample gradients of the forget set: ``vmap(grad)`` vs a per-sample loop, for the whole
   model and for the head alone (where the closed form of ``unlearnkit.head`` is a third option).
2. The inverse-HVP of the classifier-level Newton step: exact (explicit Hessian + Cholesky),
   conjugate gradient and LiSSA, with the residual each one reaches (one timed run after a warm-up).

    python benchmarks/bench_influence.py [--device auto] [--repeats 3] [--full] [--dataset embedded]
        [--threads N] [--results benchmarks/results]

Writes ``influence_<device type>.json`` and ``.md`` to ``--results`` (medians after a warm-up).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from unlearnkit.benchmarking import (
    benchmark_parser,
    median_seconds,
    parse_benchmark_args,
    record_header,
    run_summary,
    write_results,
)
from unlearnkit.device import get_device
from unlearnkit.head import flat_head_params, head_hessian, head_inputs, per_sample_head_grads
from unlearnkit.lesson import standard_setting
from unlearnkit.methods import influence

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, repeats=3, results=RESULTS)
    parser.add_argument("--full", action="store_true", help="full-size data and model instead of quick mode")
    parser.add_argument("--dataset", default="embedded", help="embedded (default), fashion-mnist, mnist")
    args = parse_benchmark_args(parser, argv)
    device = get_device(args.device)
    header = record_header("influence", device)
    setting = standard_setting(args.dataset, device, not args.full, 0, forget=0.1, progress=False)
    model, data, split = setting.original.eval(), setting.data, setting.split
    rows = []

    xf, yf = data.images[split.forget], data.labels[split.forget]
    loss, params = influence.model_loss(model), influence.model_params(model)
    n_params = sum(p.numel() for p in params.values())
    chunk = max(1, min(len(xf), 250_000_000 // max(n_params, 1)))  # bound the [chunk, P] block to ~1 GB
    vmap_s = median_seconds(lambda: influence.per_sample_grads(loss, params, xf, yf, chunk_size=chunk), device,
                            args.repeats)
    loop_s = median_seconds(lambda: influence.per_sample_grads_loop(loss, params, xf, yf), device, args.repeats)
    rows.append({"task": f"per-sample grads, whole model ({n_params:,} params), {len(xf)} forget samples",
                 "vmap_s": vmap_s, "loop_s": loop_s, "speedup_vmap_vs_loop": loop_s / vmap_s})

    feats_f = head_inputs(model, data, split.forget)
    head = model.head
    head_params = {"weight": head.weight.detach(), "bias": head.bias.detach()}

    def head_loss(p, feats, labels):
        return F.cross_entropy(feats @ p["weight"].T + p["bias"], labels)

    vmap_s = median_seconds(lambda: influence.per_sample_grads(head_loss, head_params, feats_f, yf), device,
                            args.repeats)
    loop_s = median_seconds(lambda: influence.per_sample_grads_loop(head_loss, head_params, feats_f, yf), device,
                            args.repeats)
    closed_s = median_seconds(lambda: per_sample_head_grads(feats_f, head(feats_f).detach(), yf), device,
                              args.repeats)
    rows.append({"task": f"per-sample grads, head only ({head.weight.numel() + head.bias.numel():,} params), "
                         f"{len(xf)} forget samples",
                 "vmap_s": vmap_s, "loop_s": loop_s, "closed_form_s": closed_s,
                 "speedup_vmap_vs_loop": loop_s / vmap_s})

    wd = setting.recipe.weight_decay
    feats_r = head_inputs(model, data, split.retain).double()
    labels_r = data.labels[split.retain]
    w, b = head.weight.detach().double(), head.bias.detach().double()
    theta = flat_head_params(head).double()
    grads = per_sample_head_grads(feats_f.double(), feats_f.double() @ w.T + b, yf)
    rhs = (grads.sum(0) + len(xf) * wd * theta) / len(feats_r)
    eye = torch.eye(len(theta), dtype=torch.float64, device=device)
    hessian = head_hessian(feats_r, feats_r @ w.T + b) + wd * eye
    hvp = influence.make_hvp(head_loss, {"weight": w, "bias": b}, feats_r, labels_r, l2=wd)
    build_s = median_seconds(lambda: head_hessian(feats_r, feats_r @ w.T + b), device, args.repeats)
    solves = {
        "exact (Cholesky of the explicit Hessian)": lambda: influence.solve_exact(hessian, rhs),
        "conjugate gradient (tol 1e-8)": lambda: influence.solve_cg(hvp, rhs, tol=1e-8, max_iter=1000),
        "LiSSA (300 steps)": lambda: influence.solve_lissa(hvp, rhs, steps=300, check_every=300),
    }
    reference = influence.solve_exact(hessian, rhs).solution
    for name, solve in solves.items():
        result = solve()  # the warm-up gives the solution; each solve is hundreds of HVPs: one timed run
        seconds = median_seconds(solve, device, 1, warm_up=False)
        row = {"task": f"inverse-HVP, head Newton step ({len(theta)} unknowns, {len(feats_r)} retained): {name}",
               "seconds": seconds + (build_s if name.startswith("exact") else 0.0),
               "hvps": result.hvps, "residual": result.residual,
               "error_vs_exact": ((result.solution - reference).norm() / reference.norm()).item()}
        if name.startswith("exact"):
            row["hessian_build_s"] = build_s
        rows.append(row)

    report = header | {"mode": "full" if args.full else "quick", "dataset": args.dataset, "repeats": args.repeats,
                       "sizes": {"train": len(split.train), "forget": len(split.forget), "retain": len(split.retain),
                                 "model_params": n_params},
                       "rows": rows}
    lines = [f"# Influence benchmark ({report['mode']} mode, {args.dataset}, median of {args.repeats} after a "
             "warm-up)", "",
             run_summary(report), "",
             "| task | seconds | vs loop / quality |", "|---|---|---|"]
    for row in rows:
        if "vmap_s" in row:
            extra = f", closed form {row['closed_form_s']:.4f}" if "closed_form_s" in row else ""
            lines.append(f"| {row['task']} | vmap {row['vmap_s']:.4f}, loop {row['loop_s']:.4f}{extra} | "
                         f"vmap {row['speedup_vmap_vs_loop']:.1f}x faster than the loop |")
        else:
            lines.append(f"| {row['task']} | {row['seconds']:.4f} | {row['hvps']} HVPs, residual "
                         f"{row['residual']:.1e}, error vs exact {row['error_vs_exact']:.1e} |")
    write_results(report, "\n".join(lines), "influence", device, args.results)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
