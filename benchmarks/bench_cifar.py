"""CIFAR-10-sized training speed: epoch seconds, images per second and the share of the device's bf16
peak, for ResNet-18 and the fast airbench-style net; then the retrain oracle's seconds and each
unlearning method's seconds on the same split.

    python benchmarks/bench_cifar.py                         # CPU: 256 images, 1 epoch (about 3 minutes)
    python benchmarks/bench_cifar.py --device cuda           # GPU: 50,000 images, full recipes
    python benchmarks/bench_cifar.py --device cuda --compile # the same with torch.compile
    python benchmarks/bench_cifar.py --results /tmp/try      # anywhere but the recorded results
    python benchmarks/bench_cifar.py --device cuda --skip-oracle --batch-size 512 --profile  # where the time goes
    python benchmarks/bench_cifar.py --device cuda --real --download  # real CIFAR-10, with test accuracy

By default the images are **random uint8 tensors of CIFAR-10's shape** (3x32x32, 10 classes), not
CIFAR-10: the machines this was written on cannot download it, and speed does not depend on the
pixels, so no accuracy is measured. With ``--real`` it trains on CIFAR-10 itself (from the cache
under ``data/``, or downloaded with ``--download``, e.g. on Colab) and also records the original
model's and the oracle's test accuracy, plain and with airbench's test-time flips (each image
classified by its logits plus its mirror image's), written to ``cifar_real_<device type>``.

FLOPs per image (forward + backward, one training step) are counted with
``torch.utils.flop_counter.FlopCounterMode``; the peak comes from a table of known GPUs (dense
bf16 tensor-core FLOP/s) and is null on a CPU or an unknown device. On CUDA one more epoch runs under
``torch.cuda.set_sync_debug_mode`` to count the operations that made the CPU wait for the GPU: a few
per epoch is the aim, one per step would leave the GPU idle while the CPU queues the next step.
Each unlearning method runs once on the oracle's split; one-off work (SISA's ensemble, MIMU's control
unit) is timed apart. The epochs are timed with cuDNN's autotuning on (:func:`cudnn_autotuning`); the
original, the oracle and the methods run without it, as in the lessons.
Writes ``cifar_<device type>.json`` and ``.md`` (``cifar_compile_...`` with ``--compile``, ``cifar_bs512_...``
with ``--batch-size 512``, ``cifar_..._epochs_...`` with ``--skip-oracle``) to
``--results``: medians of ``--repeats`` timed epochs after one warm-up epoch, with the device,
versions and date.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from unlearnkit.benchmarking import (
    ReportedRuns,
    benchmark_parser,
    median_reported,
    parse_benchmark_args,
    record_header,
    run_summary,
    write_results,
)
from unlearnkit.data import ImageDataset, Split, load_dataset, random_split
from unlearnkit.device import get_device
from unlearnkit.evaluate import accuracy
from unlearnkit.methods import METHODS, mimu, unlearn
from unlearnkit.models import Classifier, build_model
from unlearnkit.train import Recipe, batches, default_recipe, fit, train_model

RESULTS = Path(__file__).resolve().parent / "results"
ARCHS = ("resnet18", "fastnet")
CIFAR_SHAPE = (3, 32, 32)
#: Every registered unlearning method but retrain: the retrain oracle is timed anyway, as the reference.
UNLEARNING_METHODS = [name for name in METHODS if name != "retrain"]

#: What a tiny (CPU) run's numbers can and cannot say.
TINY_NOTE = ("Tiny CPU sizes; the targets are GPU numbers. The oracle trains for 1 epoch here, while fine-tune, "
             "NegGrad+ and random labels make their default 2 or 3 passes and SISA's slice steps take at least one "
             "epoch each, so their speed-ups fall below 1x; on a GPU run every model gets its full recipe.")

#: Dense bf16 tensor-core peak in FLOP/s, by a substring of ``torch.cuda.get_device_name`` (first match
#: wins, so the more specific names come first). Fp16 for the T4, which has no bf16.
PEAK_BF16 = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12),
    ("A10", 125e12), ("T4", 65e12),
)


#: What the cuDNN autotuning of a record (absent: the records before 2026-11-23, tuned everywhere) did to its seconds.
AUTOTUNING_NOTES = {
    "off": "",
    "epochs": " The epochs above were timed with cuDNN autotuning; the models and methods ran without it.",
    "everywhere": (" cuDNN autotuning was on for every run of this record, so each request's seconds include tuning "
                   "kernels for its new shapes, up to seconds (a fast-net GA request: 5.7 s the first time, 0.17 s "
                   "after); the original's and oracle's seconds include it too, once per shape."),
}


def autotuning(report: dict) -> str:
    """Where a record's runs used cuDNN autotuning: a key of :data:`AUTOTUNING_NOTES`."""
    if "cudnn_autotuning" in report:
        return report["cudnn_autotuning"]
    return "everywhere" if report["device_type"] == "cuda" else "off"


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or ``None`` when it is a CPU or not in :data:`PEAK_BF16`."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def cifar_shaped(n_train: int, n_test: int, device: torch.device, seed: int = 0) -> ImageDataset:
    """Random uint8 images of CIFAR-10's shape with random labels: a stand-in for timing only."""
    if n_train < 2 or n_test < 1:
        raise ValueError(f"need at least 2 training and 1 test image, got n_train={n_train}, n_test={n_test}")
    generator = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    images = torch.randint(0, 256, (n, *CIFAR_SHAPE), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    return ImageDataset("cifar10-shaped-random", images, labels, n_train, tuple(f"class {i}" for i in range(10)),
                        (0.5,) * 3, (0.25,) * 3).to(device)


def train_flops_per_image(arch: str, batch: int = 4) -> int:
    """FLOPs of one training step (forward, loss, backward) per image, counted on the CPU in fp32."""
    model = build_model(arch, CIFAR_SHAPE, 10, (0.5,) * 3, (0.25,) * 3, seed=0).train()
    x = torch.randint(0, 256, (batch, *CIFAR_SHAPE), dtype=torch.uint8)
    y = torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() // batch


def bench_recipe(arch: str, data: ImageDataset, full: bool, epochs: int | None, compile_: bool,
                 batch_size: int | None = None) -> Recipe:
    """The course's recipe for ``arch`` on CIFAR-10 (flips and crops on), optionally with fewer epochs or
    another batch size."""
    recipe = default_recipe(data, arch, quick=not full).with_(augment="flip-crop", compile=compile_)
    if batch_size is not None:
        recipe = recipe.with_(batch_size=batch_size)
    return recipe if epochs is None else recipe.with_(epochs=epochs)


def epoch_runner(arch: str, data: ImageDataset, recipe: Recipe):
    """A function training one fresh ``arch`` model (built once) for one more epoch over the training pool."""
    model = build_model(arch, CIFAR_SHAPE, 10, data.mean, data.std, seed=0).to(data.device)
    one_epoch = recipe.with_(epochs=1)
    return lambda: train_model(model, data, data.train_pool, one_epoch, progress=False)


def time_epochs(arch: str, data: ImageDataset, recipe: Recipe, repeats: int) -> tuple[ReportedRuns, int | None]:
    """Seconds of single training epochs over the whole training pool, after one warm-up epoch; and, on CUDA,
    how often one more epoch made the CPU wait for the GPU (:func:`count_gpu_waits`)."""
    epoch = epoch_runner(arch, data, recipe)
    with cudnn_autotuning(data.device):
        runs = median_reported(epoch, repeats)
        return runs, count_gpu_waits(epoch) if data.device.type == "cuda" else None


@contextmanager
def cudnn_autotuning(device: torch.device) -> Iterator[None]:
    """On CUDA, let cuDNN time its kernels for each new input shape and keep the fastest (``cudnn.benchmark``).

    Only the epoch timing uses it: it repeats one shape, and the warm-up epoch pays the tuning. A one-off run
    meets new shapes (last batches, forget sets) and pays seconds of tuning for each: on an H100 a fast-net
    GA request took 5.7 s the first time and 0.17 s after, and 0.18 s every time without autotuning
    (2026-11-23). So the models and the methods run at the kit's default, without it, like the lessons.
    """
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == "cuda"
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def profile_epoch(arch: str, data: ImageDataset, recipe: Recipe, rows: int = 30) -> str:
    """A table of the operations that took the most device time (CPU time on a CPU) in one training epoch,
    after a warm-up epoch, from ``torch.profiler``: where an epoch's seconds go, to decide what to speed up."""
    epoch = epoch_runner(arch, data, recipe)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if data.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with cudnn_autotuning(data.device):
        epoch()
        with torch.profiler.profile(activities=activities) as profiler:
            epoch()
    sort_by = "cuda_time_total" if data.device.type == "cuda" else "cpu_time_total"
    return (f"{arch}, one epoch of {data.n_train_pool} images, batch {recipe.batch_size}, compile={recipe.compile}, "
            f"{data.device.type}\n\n{profiler.key_averages().table(sort_by=sort_by, row_limit=rows)}\n")


def count_gpu_waits(run) -> int:
    """How many operations of ``run()`` made the CPU wait for the GPU, as ``torch.cuda.set_sync_debug_mode``
    reports them. A loop that keeps the GPU busy waits a few times per epoch (the loss it reports, the
    timer), not once per step: while the CPU waits it cannot queue the next step's kernels."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(warning.message) for warning in caught)


def time_method(name: str, original: Classifier, data: ImageDataset, split: Split, recipe: Recipe) -> dict:
    """Seconds of one request to the registered unlearning method ``name``, its hyper-parameters at their defaults.

    Work done once per model rather than per request is timed apart as ``one_off_seconds``: SISA's
    ensemble training (its request is the deletion alone) and MIMU's control unit, trained here and
    passed in, as lesson 07 does.
    """
    if name == "sisa":
        result = unlearn(name, original, data, split, recipe=recipe, progress=False)
        return {"seconds": result.seconds, "one_off_seconds": result.details["train_seconds"]}
    if name == "mimu":
        controller = mimu.train_controller(original, data, split.train, seed=0, progress=False)
        result = unlearn(name, original, data, split, controller=controller, progress=False)
        return {"seconds": result.seconds, "one_off_seconds": controller.seconds}
    return {"seconds": unlearn(name, original, data, split).seconds}


def time_methods(original: Classifier, data: ImageDataset, split: Split, recipe: Recipe, names: list[str],
                 oracle_seconds: float) -> dict[str, dict]:
    """:func:`time_method` for each name and its speed-up over the retrain oracle; a failure is recorded, not raised."""
    out = {}
    for name in names:
        print(f"  {name} ...", flush=True)
        try:
            entry = time_method(name, original, data, split, recipe)
        except Exception as error:  # one method failing on a new device should not cost the other measurements
            out[name] = {"seconds": None, "error": f"{type(error).__name__}: {error}"[:300]}
            continue
        entry["speedup_vs_oracle"] = oracle_seconds / entry["seconds"]
        out[name] = entry
    return out


def bench_arch(arch: str, data: ImageDataset, args: argparse.Namespace, peak: float | None) -> dict:
    full = data.device.type == "cuda" and not args.tiny
    recipe = bench_recipe(arch, data, full, args.epochs, args.compile, args.batch_size)
    print(f"{arch}: timing epochs ...", flush=True)
    epochs, gpu_waits = time_epochs(arch, data, recipe, args.repeats)
    if args.profile:
        path = args.results / f"cifar_profile_{arch}_{data.device.type}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(profile_epoch(arch, data, recipe))
        print(f"{arch}: profile of one epoch in {path}", flush=True)
    flops = train_flops_per_image(arch)
    images_per_s = data.n_train_pool / epochs.median
    record = {"arch": arch, "recipe": recipe.__dict__, "n_train": data.n_train_pool,
              "epoch_s": epochs.seconds, "epoch_s_median": epochs.median, "images_per_s": images_per_s,
              "train_gflop_per_image": flops / 1e9, "achieved_tflops": flops * images_per_s / 1e12,
              "fraction_of_bf16_peak": None if peak is None else flops * images_per_s / peak,
              "gpu_waits_per_epoch": gpu_waits,
              "steps_per_epoch": sum(1 for _ in batches(data.train_pool, recipe.batch_size, shuffle=False))}
    if not args.skip_oracle:
        print(f"{arch}: original model and retrain oracle ...", flush=True)
        split = random_split(data, 0.1, seed=0)
        original, record["original_s"] = fit(data, split.train, recipe, arch=arch, seed=0, cache=False,
                                             progress=False)
        oracle, record["oracle_s"] = fit(data, split.retain, recipe, arch=arch, seed=0, cache=False, progress=False)
        record["oracle_epochs"] = recipe.epochs
        if data.name == "cifar10":  # real images: accuracy means something
            for name, model in (("original", original), ("oracle", oracle)):
                record[f"{name}_test_acc"] = accuracy(model, data, split.test)
                record[f"{name}_test_acc_flip_tta"] = accuracy(model, data, split.test, flip_tta=True)
        if args.methods:
            print(f"{arch}: unlearning methods ...", flush=True)
            record["methods"] = time_methods(original, data, split, recipe, args.methods, record["oracle_s"])
    return record


def markdown(report: dict) -> str:
    data = "CIFAR-10" if report["real"] else "CIFAR-10-shaped"
    compiled = ", models through torch.compile" if report.get("compile") else ""
    lines = [f"# {data} training speed{compiled}", "", run_summary(report), "", report["note"], "",
             "| arch | images | epoch s (median) | images/s | GFLOP/image (train) | TFLOP/s | share of bf16 peak "
             "| CPU waits / steps per epoch | oracle s (epochs) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        share = "n/a (CPU)" if r["fraction_of_bf16_peak"] is None else f"{r['fraction_of_bf16_peak']:.1%}"
        oracle = f"{r['oracle_s']:.2f} ({r['oracle_epochs']})" if "oracle_s" in r else "skipped"
        if "oracle_test_acc" in r:
            oracle += (f", test acc {r['oracle_test_acc']:.1%}, {r['oracle_test_acc_flip_tta']:.1%} with flips "
                       f"(original {r['original_test_acc']:.1%}, {r['original_test_acc_flip_tta']:.1%})")
        waits = "n/a (CPU)" if r["gpu_waits_per_epoch"] is None else r["gpu_waits_per_epoch"]
        lines.append(f"| {r['arch']} | {r['n_train']} | {r['epoch_s_median']:.3f} | {r['images_per_s']:,.0f} | "
                     f"{r['train_gflop_per_image']:.2f} | {r['achieved_tflops']:.2f} | {share} | "
                     f"{waits} / {r['steps_per_epoch']} | {oracle} |")
    methods = [(r["arch"], name, m) for r in report["results"] for name, m in r.get("methods", {}).items()]
    if methods:
        lines += ["", "Unlearning methods on the oracle's split (10% forgotten), one request each, hyper-parameters at "
                  "their defaults. One-off: SISA's ensemble training, MIMU's control unit; not in the request's "
                  f"seconds.{AUTOTUNING_NOTES[autotuning(report)]}", "",
                  "| arch | method | request s | speed-up vs oracle | one-off s |",
                  "|---|---|---:|---:|---:|"]
        for arch, name, m in methods:
            if m["seconds"] is None:
                lines.append(f"| {arch} | {name} | failed: {m['error'][:80]} | | |")
            else:
                one_off = f"{m['one_off_seconds']:.2f}" if "one_off_seconds" in m else ""
                lines.append(f"| {arch} | {name} | {m['seconds']:.3f} | {m['speedup_vs_oracle']:.1f}x | {one_off} |")
    return "\n".join(lines) + "\n"


def record_name(args: argparse.Namespace) -> str:
    """The record's file name before ``_<device type>``: each option that changes what is measured adds a part,
    and an epochs-only run (``--skip-oracle``) never replaces a record that holds the methods' seconds."""
    return ("cifar" + ("_real" if args.real else "") + ("_compile" if args.compile else "")
            + (f"_bs{args.batch_size}" if args.batch_size else "") + ("_epochs" if args.skip_oracle else ""))


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, repeats=None, results=RESULTS,
                              repeats_help="timed epochs after the warm-up (default 3 on CUDA, 1 elsewhere)")
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--n-train", type=int, help="random training images (default 50,000 on CUDA, 256 elsewhere; "
                        "--real uses all of CIFAR-10)")
    parser.add_argument("--epochs", type=int, help="epochs of the oracle (default: the recipe's; 1 on the CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA only)")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized run on any device")
    parser.add_argument("--skip-oracle", action="store_true", help="time the epochs only")
    parser.add_argument("--batch-size", type=int, help="batch size of every model (default: the recipe's); "
                        "the record is written as cifar_bs<N>_...")
    parser.add_argument("--profile", action="store_true", help="also write cifar_profile_<arch>_<device>.txt: the "
                        "operations that take an epoch's time")
    parser.add_argument("--real", action="store_true", help="train on real CIFAR-10 and record test accuracy")
    parser.add_argument("--download", action="store_true", help="with --real: download CIFAR-10 if not cached")
    parser.add_argument("--methods", nargs="*", default=UNLEARNING_METHODS, choices=UNLEARNING_METHODS,
                        metavar="METHOD", help="unlearning methods to time on the oracle's split (default: "
                        f"{' '.join(UNLEARNING_METHODS)}; none: --methods)")
    args = parse_benchmark_args(parser, argv)

    device = get_device(args.device)
    header = record_header("cifar", device)
    small = device.type != "cuda" or args.tiny
    args.tiny = small
    n_train = args.n_train or (256 if small else 50_000)
    args.repeats = args.repeats or (1 if small else 3)
    if small and args.epochs is None:
        args.epochs = 1
    if args.real:
        data = load_dataset("cifar10", device, download=args.download)
        note = ("Real CIFAR-10; test accuracy of single models, plain and with test-time flips (logits of each "
                "image plus its mirror image's).")
    else:
        data = cifar_shaped(n_train, max(n_train // 5, 1), device)
        note = ("Random uint8 tensors of CIFAR-10's shape (3x32x32, 10 classes), not CIFAR-10 itself "
                "(no download possible here): speed only, no accuracy.")
    peak = peak_flops(device)
    report = header | {
        "peak_bf16_flops": peak,
        "note": f"{note} {TINY_NOTE if small and not args.real else ''}".strip(),
        "real": args.real, "compile": args.compile, "repeats": args.repeats,
        "cudnn_autotuning": "epochs" if device.type == "cuda" else "off", "results": [],
    }
    name = record_name(args)
    for arch in args.archs:  # written after each architecture, so a run cut off by a time limit keeps the first
        report["results"].append(bench_arch(arch, data, args, peak))
        text = markdown(report)
        write_results(report, text, name, device, args.results)
    print(text)


if __name__ == "__main__":
    main()
