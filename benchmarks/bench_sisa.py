"""SISA timings: one deletion vs a full retrain for several shards S and slices R, and the constituents
trained one after another vs all at once with torch.func (vmap).

    python benchmarks/bench_sisa.py [--device auto|cpu|cuda] [--repeats 3] [--full] [--threads N]
                                    [--results benchmarks/results]

Writes ``sisa_<device type>.json`` and ``.md`` to ``--results``. Medians over ``--repeats`` runs
after one warm-up run. A deletion with S = R = 1 *is* a full retrain of one model (minus the sample),
so it is the reference, measured in the same run. On a shared CPU wall-clock numbers are noisy;
the vmap comparison also records process CPU seconds.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
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
from unlearnkit.device import get_device
from unlearnkit.evaluate import accuracy
from unlearnkit.lesson import Setting, standard_setting
from unlearnkit.methods.sisa import SISAEnsemble

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class EnsembleTraining:
    """One training of a SISA ensemble: its own wall-clock seconds and the process CPU seconds around it."""

    seconds: float
    cpu_seconds: float
    ensemble: SISAEnsemble


def train_ensemble(setting: Setting, shards: int, vmap: bool) -> EnsembleTraining:
    cpu_start = time.process_time()
    ensemble = SISAEnsemble.train(setting.original, setting.data, setting.split.train, setting.recipe,
                                  shards=shards, slices=1, seed=0, vmap=vmap, progress=False)
    return EnsembleTraining(ensemble.train_seconds, time.process_time() - cpu_start, ensemble)


def deletion_costs(setting: Setting, shards: list[int], slices: list[int], repeats: int) -> list[dict]:
    rows = []
    generator = torch.Generator().manual_seed(1)
    for s in shards:
        for r in slices:
            if s == 1 and r > 1:
                continue
            ensemble = SISAEnsemble.train(setting.original, setting.data, setting.split.train, setting.recipe,
                                          shards=s, slices=r, seed=0, vmap=False, progress=False)
            # every call deletes another random training sample: one cannot be deleted twice
            samples = iter(setting.split.train[torch.randperm(len(setting.split.train), generator=generator)].tolist())
            deletions = median_reported(lambda ensemble=ensemble, samples=samples: ensemble.forget(next(samples)),
                                        repeats)
            rows.append({"shards": s, "slices": r, "train_s": ensemble.train_seconds,
                         "delete_s_median": deletions.median, "delete_s_all": deletions.seconds,
                         "cost_fraction_median": statistics.median(d.cost_fraction for d in deletions.results),
                         "test_acc": accuracy(ensemble.model, setting.data, setting.split.test)})
    reference = next(r["delete_s_median"] for r in rows if r["shards"] == 1 and r["slices"] == 1)
    for row in rows:
        row["speedup_vs_retrain"] = reference / row["delete_s_median"]
        row["model_fraction"] = (2 * row["slices"] + 1) / (3 * row["slices"] * row["shards"])
    return rows


def vmap_vs_sequential(setting: Setting, shards: list[int], repeats: int) -> list[dict]:
    rows = []
    for s in shards:
        result = {"shards": s, "slices": 1}
        for vmap in (False, True):
            runs = median_reported(lambda s=s, vmap=vmap: train_ensemble(setting, s, vmap), repeats)
            key = "vmap" if vmap else "sequential"
            result[f"{key}_s_median"] = runs.median
            result[f"{key}_cpu_s_median"] = statistics.median(run.cpu_seconds for run in runs.results)
            result[f"{key}_test_acc"] = accuracy(runs.last.ensemble.model, setting.data, setting.split.test)
        result["speedup_vmap"] = result["sequential_s_median"] / result["vmap_s_median"]
        rows.append(result)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, repeats=3, results=RESULTS)
    parser.add_argument("--full", action="store_true", help="full-size data (default: quick mode)")
    args = parse_benchmark_args(parser, argv)
    device = get_device(args.device)
    header = record_header("sisa", device)
    setting = standard_setting("embedded" if not args.full else "fashion-mnist", device, not args.full, 0,
                               arch="mlp", progress=False)
    deletions = deletion_costs(setting, [1, 5, 10, 20], [1, 4], args.repeats)
    stacked = vmap_vs_sequential(setting, [5, 10, 20], args.repeats)
    record = header | {
        "data": setting.data.name, "n_train": len(setting.split.train),
        "arch": setting.arch, "recipe": setting.recipe.__dict__, "repeats": args.repeats,
        "deletion": deletions, "vmap_vs_sequential": stacked,
    }
    lines = ["# SISA", "", f"{run_summary(record)}.", "",
             f"{record['n_train']} training samples, {record['arch']}, medians of {args.repeats} runs after a "
             "warm-up. Deletion = one random training sample; S = R = 1 is a full retrain. On a loaded machine "
             f"with {os.cpu_count()} CPUs wall-clock ratios are noisy; the cost fraction (sample-gradient "
             "evaluations) is not.", "",
             "| S | R | test acc | train s | delete s | speed-up vs retrain | cost fraction | model (2R+1)/(3RS) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in deletions:
        lines.append(f"| {r['shards']} | {r['slices']} | {100 * r['test_acc']:.1f}% | {r['train_s']:.2f} | "
                     f"{r['delete_s_median']:.3f} | {r['speedup_vs_retrain']:.1f}x | {r['cost_fraction_median']:.3f} | "
                     f"{r['model_fraction']:.3f} |")
    lines += ["", "| S (R=1) | sequential s | vmap s | speed-up of vmap |", "|---|---|---|---|"]
    for r in stacked:
        lines.append(f"| {r['shards']} | {r['sequential_s_median']:.2f} | {r['vmap_s_median']:.2f} | "
                     f"{r['speedup_vmap']:.2f}x |")
    write_results(record, "\n".join(lines), "sisa", device, args.results)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
