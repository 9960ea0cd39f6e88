"""Run the whole course headless: ``unlearnkit course [--quick|--full] [--dataset D] [--device D] [--out DIR]``.

Every lesson notebook is executed in order with papermill (its ``parameters`` cell receives
QUICK, DATASET, DEVICE and SEED), and the output folder receives the executed notebooks, an HTML
rendering of each, and ``summary.md`` / ``summary.json``. The exit status is non-zero when any
lesson fails, and the message names the notebook and the cell.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .data import DATASETS, REPO_ROOT

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"


@dataclass
class NotebookRun:
    """The outcome of executing one lesson."""

    notebook: str
    ok: bool
    seconds: float
    checks: int
    executed: str
    html: str | None = None
    failed_cell: int | None = None
    error: str | None = None

    def describe(self) -> str:
        if self.ok:
            return f"{self.notebook}: ok in {self.seconds:.0f} s ({self.checks} check cells)"
        return f"{self.notebook}: FAILED at cell {self.failed_cell}: {self.error}"


def lesson_notebooks(folder: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The lessons, in course order (files named ``NN_*.ipynb``)."""
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def _count_check_cells(notebook_path: Path) -> int:
    cells = json.loads(notebook_path.read_text())["cells"]
    return sum("check" in c.get("metadata", {}).get("tags", []) for c in cells)


def execute_notebook(path: Path, out_dir: Path, parameters: dict, *, html: bool = True,
                     cell_timeout: int = 1200) -> NotebookRun:
    """Execute one notebook with papermill into ``out_dir``; never raises for a failing cell."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / path.name
    start = time.perf_counter()
    failed_cell, error = None, None
    try:
        papermill.execute_notebook(str(path), str(executed), parameters=parameters, kernel_name="python3",
                                   progress_bar=False, cwd=str(path.parent), execution_timeout=cell_timeout)
    except PapermillExecutionError as exc:
        # papermill's 0-based index counts its injected-parameters cell, which follows the lesson's
        # parameters cell; past that point it equals the 1-based position in the lesson as the learner
        # sees it (markdown cells included).
        failed_cell = exc.cell_index
        first_line = next((line for line in exc.source.splitlines() if line.strip()), "")
        error = f"{exc.ename}: {exc.evalue.strip()[:500]} (cell starting `{first_line[:80]}`)"
    seconds = time.perf_counter() - start
    html_path = _render_html(executed) if html and executed.exists() else None
    return NotebookRun(path.name, error is None, seconds, _count_check_cells(path), str(executed),
                       html_path, failed_cell, error)


def _render_html(executed: Path) -> str:
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(executed, as_version=4))
    target = executed.with_suffix(".html")
    target.write_text(body, encoding="utf-8")
    return str(target)


def run_course(out_dir: Path, *, quick: bool = True, dataset: str = "embedded", device: str = "auto",
               seed: int = 0, only: str | None = None, notebooks_dir: Path = NOTEBOOKS_DIR,
               html: bool = True) -> list[NotebookRun]:
    """Execute every lesson (or those whose name contains ``only``) and write the summary."""
    notebooks = [p for p in lesson_notebooks(notebooks_dir) if only is None or only in p.name]
    if not notebooks:
        raise FileNotFoundError(f"no lesson notebooks (NN_*.ipynb) matching {only!r} in {notebooks_dir}")
    parameters = {"QUICK": quick, "DATASET": dataset, "DEVICE": device, "SEED": seed}
    runs = []
    for i, path in enumerate(notebooks, 1):
        print(f"[{i}/{len(notebooks)}] {path.name} ...", flush=True)
        run = execute_notebook(path, out_dir, parameters, html=html)
        print(f"    {run.describe()}", flush=True)
        runs.append(run)
    _write_summary(out_dir, runs, parameters)
    return runs


def _write_summary(out_dir: Path, runs: list[NotebookRun], parameters: dict) -> None:
    (out_dir / "summary.json").write_text(json.dumps(
        {"parameters": parameters, "runs": [asdict(r) for r in runs]}, indent=2))
    lines = [f"# Course run ({', '.join(f'{k}={v}' for k, v in parameters.items())})", "",
             "| lesson | result | seconds | check cells | failure |", "|---|---|---:|---:|---|"]
    for r in runs:
        failure = f"cell {r.failed_cell}: {r.error}".replace("|", "\\|") if not r.ok else ""
        lines.append(f"| {r.notebook} | {'ok' if r.ok else 'FAILED'} | {r.seconds:.0f} | {r.checks} | {failure} |")
    passed = sum(r.ok for r in runs)
    lines += ["", f"{passed} passed, {len(runs) - passed} failed"]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unlearnkit", description="The machine-unlearning course's command.")
    commands = parser.add_subparsers(dest="command", required=True)
    course = commands.add_parser("course", help="execute every lesson notebook headless")
    mode = course.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="quick", action="store_true", default=True,
                      help="small subsets, few epochs: minutes on a laptop CPU (default)")
    mode.add_argument("--full", dest="quick", action="store_false", help="real sizes; use a GPU")
    course.add_argument("--dataset", default="embedded", choices=DATASETS,
                        help="dataset for the MNIST-family lessons (default: the embedded offline subset)")
    course.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    course.add_argument("--seed", type=int, default=0)
    course.add_argument("--out", type=Path, default=Path("course-output"), help="output folder")
    course.add_argument("--only", default=None, help="run only lessons whose file name contains this")
    course.add_argument("--no-html", dest="html", action="store_false", help="skip the HTML renderings")
    course.add_argument("--notebooks", type=Path, default=NOTEBOOKS_DIR, help="folder of the lessons")
    args = parser.parse_args(argv)

    runs = run_course(args.out, quick=args.quick, dataset=args.dataset, device=args.device, seed=args.seed,
                      only=args.only, html=args.html, notebooks_dir=args.notebooks)
    failed = [r for r in runs if not r.ok]
    print(f"\n{len(runs) - len(failed)} passed, {len(failed)} failed; executed notebooks, HTML and summary.md "
          f"in {args.out}")
    for r in failed:
        print(f"FAILED {r.notebook}, cell {r.failed_cell}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
