"""Recording benchmark runs: timing helpers, the header every record starts with, and the files it goes to.

The scripts in the repository's ``benchmarks/`` use these, so that every record names its machine,
versions and date the same way, every median is taken the same way (one warm-up call first) and
every script takes the same ``--device``, ``--repeats``, ``--threads`` and ``--results`` options::

    parser = benchmark_parser(__doc__, repeats=3, results=RESULTS)
    args = parse_benchmark_args(parser, argv)
    ...
    record = record_header("gradient", device) | {"rows": rows}
    markdown = f"# Gradient methods\n\n{run_summary(record)}\n\n{table}"
    write_results(record, markdown, "gradient", device, results_dir)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import torch

from .device import synchronize


class ReportsSeconds(Protocol):
    """Anything that carries its own measured seconds: an ``UnlearningResult``, a ``TrainLog``, a SISA report."""

    seconds: float


Result = TypeVar("Result", bound="float | ReportsSeconds")


def benchmark_parser(doc: str, repeats: int | None, results: Path,
                     repeats_help: str = "timed runs after the warm-up") -> argparse.ArgumentParser:
    """A parser with the options every benchmark script shares; the script adds its own.

    Args:
        doc: the script's docstring, shown whole by ``--help`` with its line breaks kept, so that
            its usage lines read as written.
        repeats: the default of ``--repeats`` (``None`` when the script picks one per device).
        results: the default folder of the JSON and Markdown (``--results``).
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    default = f" (default {repeats})" if repeats is not None else ""
    parser.add_argument("--repeats", type=int, default=repeats, help=repeats_help + default)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 avoids thread contention on a busy machine")
    parser.add_argument("--results", type=Path, default=results,
                        help=f"folder for the JSON and Markdown (default: {results})")
    return parser


def parse_benchmark_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (the command line when ``None``), refuse a ``--repeats`` or ``--threads`` below 1,
    and apply ``--threads`` before anything is timed."""
    args = parser.parse_args(argv)
    for option in ("repeats", "threads"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option} must be at least 1, got {value}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


def describe_device(device: torch.device) -> str:
    """A name for benchmark records: the GPU's model, or the CPU's (the thread count is a field of its own)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def median_seconds(work: Callable[[], object], device: torch.device, repeats: int, warm_up: bool = True) -> float:
    """Median wall-clock seconds of ``work()`` over ``repeats`` runs, device synchronised; after one warm-up run
    unless the caller has just run ``work`` itself (``warm_up=False``)."""
    if warm_up:
        work()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        work()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class ReportedRuns(Generic[Result]):
    """The timed calls of :func:`median_reported` (the warm-up call is not among them).

    Attributes:
        median: the median of ``seconds``.
        seconds: the seconds each call reported, in call order.
        results: what each call returned, in call order.
    """

    median: float
    seconds: list[float]
    results: list[Result]

    @property
    def last(self) -> Result:
        """The last call's result, e.g. the model of the last unlearning run, to evaluate."""
        return self.results[-1]


def median_reported(run: Callable[[], Result], repeats: int) -> ReportedRuns[Result]:
    """Call ``run()`` once to warm up, then ``repeats`` times, and take the median of the seconds it reports.

    For work that times itself, such as an unlearning method (whose ``result.seconds`` covers the
    unlearning step only, not the set-up around it) or a training run. ``run`` returns either the
    seconds as a number or an object with a ``seconds`` attribute; the objects are kept in
    ``results``, so a caller can evaluate the last model or read more of what the calls reported.

    Raises:
        ValueError: if ``repeats`` is less than 1.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    run()
    results = [run() for _ in range(repeats)]
    seconds = [float(r) if isinstance(r, int | float) else r.seconds for r in results]
    return ReportedRuns(statistics.median(seconds), seconds, results)


def record_header(benchmark: str, device: torch.device) -> dict:
    """The fields every benchmark record starts with: what ran, where, with which versions, and when.

    Call it before measuring: the 1-minute load average then says how busy the machine already was
    with other work, which inflates wall-clock seconds on a shared machine (``None`` where the
    operating system has no load average). ``cuda`` is the CUDA version torch was built with
    (``None`` for a CPU-only build), whatever ``device`` is.
    """
    return {
        "benchmark": benchmark,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": describe_device(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def run_summary(record: dict) -> str:
    """One line naming where and when a record was measured, for the Markdown beside its JSON::

        NVIDIA H100 80GB HBM3, torch 2.x (CUDA 12.x), 16 threads, 1-min load average 0.4 before the run, <date>
    """
    cuda = f" (CUDA {record['cuda']})" if record.get("cuda") and record["device_type"] == "cuda" else ""
    load = record["load_average_1min"]
    load_text = f"{load:.1f}" if load is not None else "unknown"
    return (f"{record['device']}, torch {record['torch']}{cuda}, {record['threads']} threads, "
            f"1-min load average {load_text} before the run, {record['date']}")


def write_results(record: dict, markdown: str, name: str, device: torch.device,
                  results_dir: str | Path = "benchmarks/results") -> Path:
    """Write ``record`` to ``<results_dir>/<name>_<device type>.json`` and ``markdown`` to the ``.md`` beside it.

    Each file is written under a temporary name and then renamed, so an interrupted run leaves the
    previous result whole rather than half a file. ``results_dir`` is created if needed.

    Returns:
        The path without its suffix, e.g. ``benchmarks/results/gradient_cpu``.
    """
    stem = Path(results_dir) / f"{name}_{device.type}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    markdown = markdown if markdown.endswith("\n") else markdown + "\n"
    for suffix, text in ((".json", json.dumps(record, indent=2) + "\n"), (".md", markdown)):
        path = stem.with_suffix(suffix)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text)
        partial.replace(path)
    return stem
