"""Seconds to train the original model and the retrain oracle, in quick and full mode, on this device.

    python benchmarks/bench_training.py [--mode quick|full|both] [--dataset embedded] [--repeats 3] [--device auto]
                                        [--threads N] [--results benchmarks/results]

Writes ``training_<device type>.json`` (device, versions, sizes, every run and the median after one
warm-up run) and a Markdown table beside it to ``--results``; ``--mode full`` and ``--mode both`` write
``training_full_...`` and ``training_both_...`` instead. Models are trained without the cache.
"""

from __future__ import annotations

from pathlib import Path

import torch

from unlearnkit.benchmarking import (
    benchmark_parser,
    median_reported,
    parse_benchmark_args,
    record_header,
    run_summary,
    write_results,
)
from unlearnkit.data import load_dataset, random_split
from unlearnkit.device import get_device
from unlearnkit.lesson import QUICK_SIZES, default_arch
from unlearnkit.train import default_recipe, fit

RESULTS = Path(__file__).resolve().parent / "results"


def time_mode(dataset: str, device: torch.device, quick: bool, repeats: int) -> dict:
    data = load_dataset(dataset, device)
    sizes = QUICK_SIZES if quick and data.n_train_pool > QUICK_SIZES["n_train"] else {}
    split = random_split(data, 0.1, seed=0, **sizes)
    arch = default_arch(data.name, quick)
    recipe = default_recipe(data, arch, quick)
    record = {"mode": "quick" if quick else "full", "dataset": data.name, "arch": arch, "recipe": recipe.__dict__,
              "n_train": len(split.train), "n_retain": len(split.retain)}
    for role, indices in (("original", split.train), ("oracle", split.retain)):
        runs = median_reported(lambda indices=indices: fit(data, indices, recipe, arch=arch, seed=0, cache=False,
                                                           progress=False)[1], repeats)
        record[f"{role}_seconds"] = runs.seconds
        record[f"{role}_median_seconds"] = runs.median
    return record


def record_name(mode: str) -> str:
    """``training`` for quick mode; a full-mode record sits beside it (``training_full``) instead of replacing it."""
    return "training" if mode == "quick" else f"training_{mode}"


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, repeats=3, results=RESULTS)
    parser.add_argument("--mode", choices=("quick", "full", "both"), default="quick")
    parser.add_argument("--dataset", default="embedded")
    args = parse_benchmark_args(parser, argv)

    device = get_device(args.device)
    header = record_header("training", device)
    modes = {"quick": [True], "full": [False], "both": [True, False]}[args.mode]
    results = [time_mode(args.dataset, device, quick, args.repeats) for quick in modes]
    report = header | {"repeats": args.repeats, "results": results}
    lines = ["# Training time", "", run_summary(report), "",
             "| mode | dataset | arch | train size | epochs | original s (median) | oracle s (median) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['mode']} | {r['dataset']} | {r['arch']} | {r['n_train']} | {r['recipe']['epochs']} | "
                     f"{r['original_median_seconds']:.2f} | {r['oracle_median_seconds']:.2f} |")
    write_results(report, "\n".join(lines), record_name(args.mode), device, args.results)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
