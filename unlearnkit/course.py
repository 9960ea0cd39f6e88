"""Run the whole course headless: ``unlearnkit course [--quick|--full] [--dataset D] [--device D] [--out DIR]``.

Every lesson notebook is executed in order with papermill (its ``parameters`` cell receives
QUICK, DATASET, DEVICE and SEED), and the output folder receives the executed notebooks, an HTML
rendering of each, and ``summary.md`` / ``summary.json``. The exit status is non-zero when any
lesson fails, and the message names the notebook and the cell.

``--seeds 0-11`` runs the course once per seed (into ``OUT/seed-N``) and writes ``seeds.md``, a lesson-by-seed
table of what passed: a Check cell's margin should hold across seeds, not only for the one CI runs.

``--solutions`` runs each lesson with the code of its exercises' revealable solutions appended, so that a
solution that no longer runs (a renamed variable, a changed kit API) fails like a Check cell.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .data import DATASETS, REPO_ROOT

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
#: Seconds a cell may run: a quick-mode lesson runs in about 90 s in all, so a quick cell that takes
#: minutes has hung; a full-mode cell on a GPU can legitimately train for an hour.
CELL_TIMEOUT = {"quick": 300, "full": 4 * 3600}
#: Seconds a widget cell (one that calls ``interact(``) may take, in either mode. Such a cell only builds a
#: slider over results computed in the cells before it (a test holds every lesson to that), so a minute is
#: ample, and it bounds the stall of jupyter/nbclient#312, where the reply to a widget cell is sometimes read
#: only when the cell's timeout runs out.
WIDGET_CELL_TIMEOUT = 60
#: A revealable solution in a lesson's markdown, and a Python code block inside one.
_SOLUTION = re.compile(r"<details>\s*<summary>\s*Solution.*?</summary>(.*?)</details>", re.S)
_PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


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
    hangs: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line for the summary: passed in how long with how many checks, or which cell failed."""
        rerun = f"; ran again after: {'; '.join(self.hangs)}" if self.hangs else ""
        if self.ok:
            return f"{self.notebook}: ok in {self.seconds:.0f} s ({self.checks} check cells){rerun}"
        return f"{self.notebook}: FAILED at cell {self.failed_cell}: {self.error}{rerun}"


def lesson_notebooks(folder: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The lessons, in course order (files named ``NN_*.ipynb``)."""
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def _count_check_cells(notebook_path: Path) -> int:
    cells = json.loads(notebook_path.read_text())["cells"]
    return sum("check" in c.get("metadata", {}).get("tags", []) for c in cells)


def solution_code(notebook_path: Path) -> list[str]:
    """The Python code blocks of a lesson's revealable solutions (``<details><summary>Solution``), in order."""
    cells = json.loads(notebook_path.read_text())["cells"]
    markdown = ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]
    return [block for text in markdown for solution in _SOLUTION.findall(text)
            for block in _PYTHON_BLOCK.findall(solution)]


def with_solutions(path: Path, out_dir: Path) -> Path:
    """Write ``out_dir/<lesson>``: the lesson with each solution's code appended as a code cell tagged ``solution``.

    The solutions are written to run after the whole lesson (they use its variables), so they go at the
    end, in the order the exercises ask them.
    """
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    notebook.cells += [nbformat.v4.new_code_cell(code.rstrip(), metadata={"tags": ["solution"]})
                       for code in solution_code(path)]
    out_dir.mkdir(parents=True, exist_ok=True)
    copy = out_dir / path.name
    nbformat.write(notebook, copy)
    return copy


def execute_notebook(path: Path, out_dir: Path, parameters: dict, *, html: bool = True,
                     cell_timeout: int | None = None, attempts: int = 2) -> NotebookRun:
    """Execute one notebook with papermill into ``out_dir``; never raises for a failing cell.

    A cell that errors (a failed Check included) fails the run at once. A cell that hangs past
    ``cell_timeout`` seconds (default :data:`CELL_TIMEOUT` for the mode), or a kernel that dies, is
    different: headless execution of ipywidgets cells occasionally never returns (jupyter/nbclient#312,
    jupyter/nbconvert#1921; seen here about once in sixty runs), so the notebook is run again in a
    fresh kernel, up to ``attempts`` times in all, and the run records each hang in ``hangs``. The same
    bug sometimes only delays a widget cell's reply until its timeout, which is why widget cells get
    :data:`WIDGET_CELL_TIMEOUT` rather than the mode's (up to four hours in full mode).
    """
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    if cell_timeout is None:
        cell_timeout = CELL_TIMEOUT["quick" if parameters.get("QUICK", True) else "full"]
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / path.name
    start = time.perf_counter()
    hangs: list[str] = []
    while True:
        try:
            failed_cell, error = _papermill(path, executed, parameters, cell_timeout)
            break
        except (CellTimeoutError, DeadKernelError) as exc:
            hangs.append(_describe_hang(exc))
            if len(hangs) >= attempts:
                failed_cell, error = None, f"hung or died in each of {attempts} attempts"
                break
    seconds = time.perf_counter() - start
    html_path = _render_html(executed) if html and executed.exists() else None
    return NotebookRun(path.name, error is None, seconds, _count_check_cells(path), str(executed),
                       html_path, failed_cell, error, hangs)


def _papermill(path: Path, executed: Path, parameters: dict, cell_timeout: int) -> tuple[int | None, str | None]:
    """Run papermill once; ``(failed cell, error)`` for a cell that raised, ``(None, None)`` when all passed."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    try:
        papermill.execute_notebook(str(path), str(executed), parameters=parameters, kernel_name="python3",
                                   progress_bar=False, cwd=str(path.parent), execution_timeout=cell_timeout,
                                   timeout_func=lambda cell: _cell_timeout(cell.source, cell_timeout))
    except PapermillExecutionError as exc:
        # papermill's 0-based index counts its injected-parameters cell, which follows the lesson's
        # parameters cell; past that point it equals the 1-based position in the lesson as the learner
        # sees it (markdown cells included).
        first_line = next((line for line in exc.source.splitlines() if line.strip()), "")
        return exc.cell_index, f"{exc.ename}: {exc.evalue.strip()[:500]} (cell starting `{first_line[:80]}`)"
    return None, None


def _cell_timeout(source: str, cell_timeout: int) -> int:
    """The seconds one cell may take: :data:`WIDGET_CELL_TIMEOUT` at most for a widget cell."""
    return min(cell_timeout, WIDGET_CELL_TIMEOUT) if "interact(" in source else cell_timeout


def _describe_hang(exc: Exception) -> str:
    """``CellTimeoutError: <first line> (cell starting `<source>`)``; nbclient quotes the cell between dashes."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"
    quoted = next((i for i, line in enumerate(lines) if line.startswith("-----")), None)
    if quoted is not None and quoted + 1 < len(lines):
        text += f" (cell starting `{lines[quoted + 1][:80]}`)"
    return text


def _render_html(executed: Path) -> str:
    import nbformat
    from nbconvert import HTMLExporter

    _see_base_jupyter_data()
    body, _ = HTMLExporter().from_notebook_node(nbformat.read(executed, as_version=4))
    target = executed.with_suffix(".html")
    target.write_text(body, encoding="utf-8")
    return str(target)


def _see_base_jupyter_data() -> None:
    """Let Jupyter find the base Python's data files (nbconvert's HTML templates among them) from a venv made
    with ``--system-site-packages``: such a venv imports the base's nbconvert, but Jupyter only searches the
    venv's own ``share/jupyter``, so rendering fails with "No template sub-directory with name 'lab'"."""
    base_data = Path(sys.base_prefix, "share", "jupyter")
    search_path = os.environ.get("JUPYTER_PATH", "").split(os.pathsep)
    if sys.prefix != sys.base_prefix and base_data.is_dir() and str(base_data) not in search_path:
        os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [*search_path, str(base_data)]))


def run_course(out_dir: Path, *, quick: bool = True, dataset: str = "embedded", device: str = "auto",
               seed: int = 0, only: str | None = None, notebooks_dir: Path = NOTEBOOKS_DIR,
               html: bool = True, solutions: bool = False) -> list[NotebookRun]:
    """Execute every lesson (or those whose name contains ``only``) and write the summary.

    With ``solutions``, each lesson runs with its solutions' code appended (:func:`with_solutions`).
    """
    notebooks = [p for p in lesson_notebooks(notebooks_dir) if only is None or only in p.name]
    if not notebooks:
        raise FileNotFoundError(f"no lesson notebooks (NN_*.ipynb) matching {only!r} in {notebooks_dir}")
    if solutions:
        notebooks = [with_solutions(p, out_dir / "lessons-with-solutions") for p in notebooks]
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
             "| lesson | result | seconds | check cells | failure, or hangs run again |", "|---|---|---:|---:|---|"]
    for r in runs:
        failure = f"cell {r.failed_cell}: {r.error}" if not r.ok else ""
        if r.hangs:
            failure += f" (ran again after: {'; '.join(r.hangs)})"
        failure = failure.replace("|", "\\|")
        lines.append(f"| {r.notebook} | {'ok' if r.ok else 'FAILED'} | {r.seconds:.0f} | {r.checks} | {failure} |")
    passed = sum(r.ok for r in runs)
    lines += ["", f"{passed} passed, {len(runs) - passed} failed"]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")


def parse_seeds(text: str) -> list[int]:
    """``"0-11"``, ``"3,5,8"`` or a mix (``"0-2,7"``) as a list of seeds."""
    seeds = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not (last.isdigit() and int(last) >= int(first))):
            raise argparse.ArgumentTypeError(f"seeds {text!r}: write a range like 0-11, a list like 3,5,8, or both")
        seeds += range(int(first), int(last or first) + 1)
    return seeds


def write_seed_table(out_dir: Path, runs_by_seed: dict[int, list[NotebookRun]]) -> str:
    """Write ``seeds.md``: one row per lesson, one column per seed, ``ok`` or the failing cell; return it."""
    seeds = list(runs_by_seed)
    lessons = {r.notebook: {} for runs in runs_by_seed.values() for r in runs}
    for seed, runs in runs_by_seed.items():
        for r in runs:
            lessons[r.notebook][seed] = "ok" if r.ok else f"cell {r.failed_cell}"
    lines = ["| lesson | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    lines += [f"| {name} | " + " | ".join(cells.get(s, "") for s in seeds) + " |" for name, cells in lessons.items()]
    failures = [f"- seed {seed}, {r.notebook}, cell {r.failed_cell}: {r.error}".replace("|", "\\|")
                for seed, runs in runs_by_seed.items() for r in runs if not r.ok]
    passed = sum(r.ok for runs in runs_by_seed.values() for r in runs)
    total = sum(len(runs) for runs in runs_by_seed.values())
    text = "\n".join(["# Lessons across seeds", "", *lines, "", f"{passed} of {total} runs passed", "", *failures])
    (out_dir / "seeds.md").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    """The ``unlearnkit`` command (``unlearnkit course --help``); returns the exit status."""
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
    seeds = course.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0)
    seeds.add_argument("--seeds", type=parse_seeds, help="run once per seed, e.g. 0-11 or 0,3,5 (into OUT/seed-N), "
                       "and write OUT/seeds.md, a lesson-by-seed table of what passed")
    course.add_argument("--out", type=Path, default=Path("course-output"), help="output folder")
    course.add_argument("--only", default=None, help="run only lessons whose file name contains this")
    course.add_argument("--no-html", dest="html", action="store_false", help="skip the HTML renderings")
    course.add_argument("--notebooks", type=Path, default=NOTEBOOKS_DIR, help="folder of the lessons")
    course.add_argument("--solutions", action="store_true",
                        help="append the code of each exercise's solution to its lesson and run it too")
    args = parser.parse_args(argv)

    options = dict(quick=args.quick, dataset=args.dataset, device=args.device, only=args.only, html=args.html,
                   notebooks_dir=args.notebooks, solutions=args.solutions)
    if args.seeds:
        runs_by_seed = {}
        for seed in args.seeds:
            print(f"== seed {seed}", flush=True)
            runs_by_seed[seed] = run_course(args.out / f"seed-{seed}", seed=seed, **options)
        print("\n" + write_seed_table(args.out, runs_by_seed))
        return 0 if all(r.ok for runs in runs_by_seed.values() for r in runs) else 1
    runs = run_course(args.out, seed=args.seed, **options)
    failed = [r for r in runs if not r.ok]
    print(f"\n{len(runs) - len(failed)} passed, {len(failed)} failed; executed notebooks, HTML and summary.md "
          f"in {args.out}")
    for r in failed:
        print(f"FAILED {r.notebook}, cell {r.failed_cell}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
