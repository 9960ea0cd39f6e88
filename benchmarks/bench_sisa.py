"""SISA timings: one deletion vs a full retrain for several shards S and slices R, and the constituents
trained one after another vs all at once with torch.func (vmap).

    python benchmarks/bench_sisa.py [--device auto|cpu|cuda] [--repeats 3] [--full]

Writes ``benchmarks/results/sisa_<device type>.json`` and ``.md``. Medians over ``--repeats`` runs
after one warm-up run. A deletion with S = R = 1 *is* a full retrain of one model (minus the sample),
so it is the reference, measured in the same run. On a shared CPU wall-clock numbers are noisy;
the vmap comparison also records process CPU seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch

from unlearnkit.device import describe_device, get_device, synchronize
from unlearnkit.evaluate import accuracy
from unlearnkit.lesson import standard_setting
from unlearnkit.methods.sisa import SISAEnsemble

RESULTS = Path(__file__).parent / "results"


def timed(fn) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result) of ``fn()``, the device synchronised at both ends."""
    synchronize(DEVICE)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    synchronize(DEVICE)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def deletion_costs(setting, shards: list[int], slices: list[int], repeats: int) -> list[dict]:
    rows = []
    generator = torch.Generator().manual_seed(1)
    for s in shards:
        for r in slices:
            if s == 1 and r > 1:
                continue
            ensemble = SISAEnsemble.train(setting.original, setting.data, setting.split.train, setting.recipe,
                                          shards=s, slices=r, seed=0, vmap=False, progress=False)
            pool = setting.split.train[torch.randperm(len(setting.split.train), generator=generator)]
            walls, fractions = [], []
            for i in range(repeats + 1):  # the first deletion is the warm-up
                report = ensemble.forget(int(pool[i]))
                if i:
                    walls.append(report.seconds)
                    fractions.append(report.cost_fraction)
            rows.append({"shards": s, "slices": r, "train_s": ensemble.train_seconds,
                         "delete_s_median": statistics.median(walls), "delete_s_all": walls,
                         "cost_fraction_median": statistics.median(fractions),
                         "test_acc": accuracy(ensemble.model, setting.data, setting.split.test)})
    reference = next(r["delete_s_median"] for r in rows if r["shards"] == 1 and r["slices"] == 1)
    for row in rows:
        row["speedup_vs_retrain"] = reference / row["delete_s_median"]
        row["model_fraction"] = (2 * row["slices"] + 1) / (3 * row["slices"] * row["shards"])
    return rows


def vmap_vs_sequential(setting, shards: list[int], repeats: int) -> list[dict]:
    rows = []
    for s in shards:
        result = {"shards": s, "slices": 1}
        for vmap in (False, True):
            def train(vmap=vmap, s=s):
                return SISAEnsemble.train(setting.original, setting.data, setting.split.train, setting.recipe,
                                          shards=s, slices=1, seed=0, vmap=vmap, progress=False)
            runs = [timed(train) for _ in range(repeats + 1)][1:]
            key = "vmap" if vmap else "sequential"
            result[f"{key}_s_median"] = statistics.median(w for w, _, _ in runs)
            result[f"{key}_cpu_s_median"] = statistics.median(c for _, c, _ in runs)
            result[f"{key}_test_acc"] = accuracy(runs[-1][2].model, setting.data, setting.split.test)
        result["speedup_vmap"] = result["sequential_s_median"] / result["vmap_s_median"]
        rows.append(result)
    return rows


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="full-size data (default: quick mode)")
    args = parser.parse_args()
    DEVICE = get_device(args.device)
    setting = standard_setting("embedded" if not args.full else "fashion-mnist", DEVICE, not args.full, 0,
                               arch="mlp", progress=False)
    deletions = deletion_costs(setting, [1, 5, 10, 20], [1, 4], args.repeats)
    stacked = vmap_vs_sequential(setting, [5, 10, 20], args.repeats)
    device_name = describe_device(DEVICE)
    record = {
        "benchmark": "sisa", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name, "device_type": DEVICE.type, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "load_average_1_5_15": list(os.getloadavg()),
        "data": setting.data.name, "n_train": len(setting.split.train),
        "arch": setting.arch, "recipe": setting.recipe.__dict__, "repeats_after_warmup": args.repeats,
        "deletion": deletions, "vmap_vs_sequential": stacked,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"sisa_{DEVICE.type}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2))
    lines = [f"# SISA on {device_name} ({record['date']}, torch {record['torch']}, {record['threads']} threads)",
             "", f"{record['n_train']} training samples, {record['arch']}, medians of {args.repeats} runs after a "
             "warm-up. Deletion = one random training sample; S = R = 1 is a full retrain. Load average "
             f"during the run: {record['load_average_1_5_15'][1]:.1f} (5 min) on {os.cpu_count()} CPUs; wall-clock "
             "ratios on a loaded machine are noisy, the cost fraction (sample-gradient evaluations) is not.", "",
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
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


DEVICE = torch.device("cpu")

if __name__ == "__main__":
    main()
