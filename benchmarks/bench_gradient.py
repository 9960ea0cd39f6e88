"""Seconds of the gradient family (GA, NegGrad+, fine-tune, random labels) vs retraining, in one run.

Retraining from scratch on the retain set (the exact answer) is timed here, fresh, with the
original model's recipe; no cached model is reused, so both sides of every speed-up are measured
on the same machine under the same load. Each method runs once as a warm-up, then ``--repeats``
times; the medians are compared. The script also records each method's table row (accuracies,
MIA-efficacy, gap to the retrain oracle) from the course's ``comparison_table``, and writes
``gradient[_full]_<device type>.json`` and ``.md`` to ``--results``.

    python benchmarks/bench_gradient.py [--full] [--dataset embedded] [--device auto] [--repeats 3] [--threads N]
                                        [--results benchmarks/results]

Quick mode: the embedded Fashion-MNIST subset and the MLP. Full mode: the whole dataset and the
small CNN (``--dataset fashion-mnist`` needs the torchvision files; see ``load_dataset``); use a GPU.
"""

from __future__ import annotations

from pathlib import Path

from unlearnkit.benchmarking import (
    benchmark_parser,
    median_reported,
    parse_benchmark_args,
    record_header,
    run_summary,
    write_results,
)
from unlearnkit.device import get_device
from unlearnkit.evaluate import accuracy, comparison_table
from unlearnkit.lesson import standard_setting
from unlearnkit.methods import gradient
from unlearnkit.methods.base import UnlearningResult
from unlearnkit.train import fit

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> dict:
    parser = benchmark_parser(__doc__, repeats=3, results=RESULTS)
    parser.add_argument("--full", action="store_true", help="full-size data and the full-mode architecture")
    parser.add_argument("--dataset", default="embedded")
    parser.add_argument("--seed", type=int, default=0)
    args = parse_benchmark_args(parser, argv)

    device = get_device(args.device)
    header = record_header("gradient", device)
    setting = standard_setting(args.dataset, device, not args.full, args.seed, progress=False)
    data, split, original = setting.data, setting.split, setting.original
    config = {k: v for k, v in original.config.items() if k not in ("arch", "in_shape", "num_classes", "mean", "std")}

    def retrain() -> UnlearningResult:
        model, seconds = fit(data, split.retain, setting.recipe, arch=setting.arch, seed=args.seed, cache=False,
                             progress=False, **config)
        return UnlearningResult(model, seconds, "retrain")

    retrained = median_reported(retrain, args.repeats)
    oracle = retrained.last.model
    target = accuracy(oracle, data, split.forget)
    methods = {
        "GA (default, 1 epoch)": lambda: gradient.gradient_ascent(original, data, split, seed=args.seed),
        "GA (stopped at oracle forget acc)": lambda: gradient.gradient_ascent(
            original, data, split, epochs=10, target_forget_acc=target, check_every=1, seed=args.seed),
        "NegGrad+": lambda: gradient.neggrad_plus(original, data, split, seed=args.seed),
        "fine-tune": lambda: gradient.finetune(original, data, split, seed=args.seed),
        "random labels": lambda: gradient.random_labels(original, data, split, seed=args.seed),
    }
    rows: dict[str, object] = {"retrain": (oracle, retrained.median)}
    steps = {}
    for name, fn in methods.items():
        runs = median_reported(fn, args.repeats)
        rows[name] = (runs.last.model, runs.median)
        steps[name] = runs.last.details["steps"]
    table = comparison_table(rows, data, split, seed=args.seed)

    result = header | {
        "description": "gradient-family unlearning vs retraining (seconds of the unlearning step, medians)",
        "mode": "full" if args.full else "quick",
        "dataset": data.name, "arch": setting.arch, "seed": args.seed, "repeats": args.repeats,
        "sizes": {"forget": len(split.forget), "retain": len(split.retain), "test": len(split.test)},
        "retrain_recipe": {"epochs": setting.recipe.epochs, "batch_size": setting.recipe.batch_size},
        "steps": steps,
        "table": {name: {k: float(v) for k, v in row.items()} for name, row in table.round(4).iterrows()},
    }
    lines = [f"| {name} | {steps.get(name, '')} | {row['seconds']:.3f} | {row['speed-up']:.1f}x | "
             f"{row['forget acc']:.1f} | {row['retain acc']:.1f} | {row['test acc']:.1f} | {row['MIA']:.1f} | "
             f"{row['gap']:.2f} |" for name, row in table.iterrows()]
    text = (
        f"# Gradient family vs retrain ({result['mode']} mode: {data.name}, {setting.arch}, forget "
        f"{len(split.forget)} of {len(split.train)}, seed {args.seed})\n\n"
        f"{run_summary(result)}. Seconds: median of {args.repeats} runs after a "
        "warm-up, retrain timed fresh in the same run (no cache). Accuracies, MIA-efficacy (%) and gap "
        "(points) from the course's comparison table.\n\n"
        "| method | steps | seconds | speed-up | forget acc | retain acc | test acc | MIA | gap |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(lines) + "\n")
    write_results(result, text, "gradient_full" if args.full else "gradient", device, args.results)
    print(text)
    return result


if __name__ == "__main__":
    main()
