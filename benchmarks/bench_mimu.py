"""Seconds per MIMU forget request (after the control unit is trained) vs a retrain.

    python benchmarks/bench_mimu.py [--device auto] [--repeats 5] [--seed 0] [--threads N]
                                    [--results benchmarks/results]

Measures, in one run on one device: the retrain oracle trained from scratch (no cache), the
control unit's one-off training, and the median seconds of a forget request (random 10%, random
100 samples, a whole class), with the reference masks precomputed (a serving system keeps them)
and with them computed inside the request. Writes ``mimu_<device type>.json`` and ``.md`` to
``--results``. The target (PERFORMANCE.md): a request at most 1% of a retrain's seconds.
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
from unlearnkit.data import class_split, load_dataset, random_split
from unlearnkit.device import get_device
from unlearnkit.lesson import QUICK_SIZES
from unlearnkit.methods import Stopwatch, mimu
from unlearnkit.methods.retrain import retrain
from unlearnkit.train import default_recipe, fit

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, repeats=5, results=RESULTS)
    parser.add_argument("--dataset", default="embedded")
    parser.add_argument("--seed", type=int, default=0)
    args = parse_benchmark_args(parser, argv)
    device = get_device(args.device)
    header = record_header("mimu", device)
    data = load_dataset(args.dataset, device)
    sizes = QUICK_SIZES if data.n_train_pool > QUICK_SIZES["n_train"] else {}
    splits = {"random 10%": random_split(data, 0.1, seed=args.seed, **sizes),
              "random 100": random_split(data, 100, seed=args.seed, **sizes),
              "class 3": class_split(data, 3, seed=args.seed, **sizes)}
    recipe = default_recipe(data, "mlp", quick=True)
    original, _ = fit(data, splits["random 10%"].train, recipe, arch="mlp", seed=args.seed, progress=False)

    retrain_seconds = median_reported(
        lambda: retrain(original, data, splits["random 10%"], recipe=recipe, seed=args.seed, cache=False,
                        progress=False), max(1, args.repeats // 2)).median
    controller = mimu.train_controller(original, data, splits["random 10%"].train, seed=args.seed, progress=False)

    rows = []
    for name, split in splits.items():
        generator = torch.Generator().manual_seed(args.seed)
        reference = split.retain[torch.randperm(len(split.retain), generator=generator)[:500]]
        with Stopwatch(device) as bank_watch:
            bank = controller.bank(data, reference)
        with_bank = median_reported(lambda s=split, b=bank: mimu.mimu(original, data, s, controller=controller,
                                                                      reference_bank=b, seed=args.seed),
                                    args.repeats).median
        without_bank = median_reported(lambda s=split: mimu.mimu(original, data, s, controller=controller,
                                                                 seed=args.seed), args.repeats).median
        rows.append({"request": name, "forget samples": len(split.request), "request s (bank kept)": with_bank,
                     "request s (bank inside)": without_bank, "reference bank s": bank_watch.seconds,
                     "% of retrain (bank kept)": 100 * with_bank / retrain_seconds,
                     "% of retrain (bank inside)": 100 * without_bank / retrain_seconds})

    result = header | {"description": "mimu forget request vs retrain",
                       "dataset": data.name, "n_train": len(splits["random 10%"].train),
                       "model": "mlp 784-256-128-10", "targets": controller.targets.names,
                       "n_weights": controller.targets.n_weights,
                       "repeats": args.repeats, "retrain_seconds": retrain_seconds,
                       "control_unit_training_seconds": controller.seconds, "control_unit": controller.config,
                       "target": "request <= 1% of a retrain", "rows": rows}
    lines = ["# MIMU forget request vs retrain", "", run_summary(result), "",
             f"Retrain (no cache, median): {retrain_seconds:.3f} s. Control unit training (one-off): "
             f"{controller.seconds:.2f} s. Target: a request <= 1% of a retrain.", "",
             "| request | forget samples | request s (bank kept) | % of retrain | request s (bank inside) "
             "| % of retrain | reference bank s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['request']} | {r['forget samples']} | {r['request s (bank kept)']:.3f} | "
              f"{r['% of retrain (bank kept)']:.1f} | {r['request s (bank inside)']:.3f} | "
              f"{r['% of retrain (bank inside)']:.1f} | {r['reference bank s']:.3f} |" for r in rows]
    write_results(result, "\n".join(lines), "mimu", device, args.results)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
