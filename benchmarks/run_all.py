"""Run every benchmark script in turn on one device, e.g. in a session that has a GPU for a limited time.

    python benchmarks/run_all.py [--device auto] [--results benchmarks/results] [--only cifar sisa]
                                 [--threads N] [--archive results.tar.gz]

Each script runs with its default sizes; the runner prints which one runs and its wall time, and
carries on past a script that fails. The exit code is 1 if any failed. ``--only`` picks scripts by
name (``cifar`` for ``bench_cifar.py``), so that a machine lent for a few minutes at a time can run
them in several calls; ``--archive`` packs the results folder into one ``.tar.gz`` after each
script, so that a run cut off by a time limit still leaves what it measured in one file to fetch.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent


def select_scripts(only: list[str] | None) -> list[Path]:
    """The ``bench_*.py`` scripts, all of them or those named in ``only`` (``cifar`` or ``bench_cifar.py``)."""
    scripts = sorted(BENCHMARKS.glob("bench_*.py"))
    if not only:
        return scripts
    by_name = {script.stem.removeprefix("bench_"): script for script in scripts}
    wanted = [name.removesuffix(".py").removeprefix("bench_") for name in only]
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        raise SystemExit(f"no benchmark called {', '.join(unknown)}; choose from {', '.join(by_name)}")
    return [by_name[name] for name in wanted]


def archive_results(results: Path, archive: Path) -> None:
    """Pack the files of ``results`` into the ``.tar.gz`` ``archive`` (replaced whole, never half-written)."""
    partial = archive.with_name(archive.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        for path in sorted(results.glob("*")) if results.is_dir() else []:
            tar.add(path, arcname=path.name)
    partial.replace(archive)


def run_scripts(scripts: list[Path], options: list[str], after_each=None) -> list[str]:
    """Run each script with ``options`` in a fresh Python, one after another; the names of those that failed.

    ``after_each()``, if given, is called after every script, whether it failed or not.
    """
    failed = []
    for script in scripts:
        print(f"=== {script.name} {' '.join(options)}", flush=True)
        start = time.perf_counter()
        code = subprocess.run([sys.executable, str(script), *options]).returncode
        outcome = "ok" if code == 0 else f"FAILED (exit code {code})"
        print(f"=== {script.name}: {outcome} after {time.perf_counter() - start:.0f} s", flush=True)
        if code != 0:
            failed.append(script.name)
        if after_each is not None:
            after_each()
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--results", type=Path, default=BENCHMARKS / "results",
                        help="folder for every script's JSON and Markdown (default: benchmarks/results)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these scripts only (e.g. cifar sisa)")
    parser.add_argument("--archive", type=Path, help="after each script, pack the results folder into this .tar.gz")
    parser.add_argument("--threads", type=int, help="passed to every script: torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    scripts = select_scripts(args.only)
    options = ["--device", args.device, "--results", str(args.results)]
    if args.threads is not None:
        options += ["--threads", str(args.threads)]
    after_each = (lambda: archive_results(args.results, args.archive)) if args.archive else None
    failed = run_scripts(scripts, options, after_each)
    print(f"failed: {', '.join(failed)}" if failed else "all benchmarks ran")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
