"""Run every benchmark script in turn on one device, e.g. in a session that has a GPU for a limited time.

    python benchmarks/run_all.py [--device auto] [--results benchmarks/results]

Each script runs with its default sizes; the runner prints which one runs and its wall time, and
carries on past a script that fails. The exit code is 1 if any failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent


def run_scripts(scripts: list[Path], options: list[str]) -> list[str]:
    """Run each script with ``options`` in a fresh Python, one after another; the names of those that failed."""
    failed = []
    for script in scripts:
        print(f"=== {script.name} {' '.join(options)}", flush=True)
        start = time.perf_counter()
        code = subprocess.run([sys.executable, str(script), *options]).returncode
        outcome = "ok" if code == 0 else f"FAILED (exit code {code})"
        print(f"=== {script.name}: {outcome} after {time.perf_counter() - start:.0f} s", flush=True)
        if code != 0:
            failed.append(script.name)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--results", type=Path, default=BENCHMARKS / "results",
                        help="folder for every script's JSON and Markdown (default: benchmarks/results)")
    args = parser.parse_args(argv)
    options = ["--device", args.device, "--results", str(args.results)]
    failed = run_scripts(sorted(BENCHMARKS.glob("bench_*.py")), options)
    print(f"failed: {', '.join(failed)}" if failed else "all benchmarks ran")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
