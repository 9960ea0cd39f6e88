"""The course runner, and the conventions every committed lesson keeps."""

import argparse
import ast
import json
import os
import sys

import nbformat
import pytest
from papermill.translators import PythonTranslator

from unlearnkit import REPOSITORY_URL, course
from unlearnkit.course import _see_base_jupyter_data, lesson_notebooks, main
from unlearnkit.data import REPO_ROOT


def _notebook(path, *sources, check_cells=()):
    cells = [nbformat.v4.new_code_cell("QUICK = False", metadata={"tags": ["parameters"]})]
    cells += [nbformat.v4.new_code_cell(src, metadata={"tags": ["check"] if i in check_cells else []})
              for i, src in enumerate(sources)]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_course_command_runs_lessons_in_order_and_names_the_failing_cell(tmp_path, capsys):
    lessons = tmp_path / "notebooks"
    lessons.mkdir()
    _notebook(lessons / "00_ok.ipynb", "assert QUICK is True", check_cells=(0,))
    _notebook(lessons / "01_broken.ipynb", "x = 1", "raise RuntimeError('boom')")
    _notebook(lessons / "notes.ipynb", "raise SystemExit")  # not a numbered lesson: not run
    out = tmp_path / "out"

    status = main(["course", "--quick", "--device", "cpu", "--out", str(out), "--notebooks", str(lessons)])

    assert status == 1
    printed = capsys.readouterr()
    assert "FAILED 01_broken.ipynb, cell" in printed.err and "RuntimeError: boom" in printed.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parameters"] == {"QUICK": True, "DATASET": "embedded", "DEVICE": "cpu", "SEED": 0}
    runs = {r["notebook"]: r for r in summary["runs"]}
    assert list(runs) == ["00_ok.ipynb", "01_broken.ipynb"]
    assert runs["00_ok.ipynb"]["ok"] and runs["00_ok.ipynb"]["checks"] == 1
    assert not runs["01_broken.ipynb"]["ok"] and runs["01_broken.ipynb"]["failed_cell"] is not None
    assert (out / "00_ok.html").exists() and (out / "01_broken.ipynb").exists()
    assert "1 passed, 1 failed" in (out / "summary.md").read_text()


def test_course_across_seeds_tables_what_passed_for_each_seed(tmp_path, capsys):
    lessons = tmp_path / "notebooks"
    lessons.mkdir()
    _notebook(lessons / "00_seeded.ipynb", "assert SEED != 2, f'seed {SEED} fails'", check_cells=(0,))
    out = tmp_path / "out"

    status = main(["course", "--device", "cpu", "--seeds", "0-2", "--no-html", "--out", str(out),
                   "--notebooks", str(lessons)])

    assert status == 1
    table = (out / "seeds.md").read_text()
    assert "| 00_seeded.ipynb | ok | ok | cell " in table and "2 of 3 runs passed" in table
    assert "seed 2, 00_seeded.ipynb" in table and "seed 2 fails" in table
    assert json.loads((out / "seed-1" / "summary.json").read_text())["parameters"]["SEED"] == 1
    assert course.parse_seeds("0-2,7") == [0, 1, 2, 7]
    for bad in ("3-1", "a", "1-", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="write a range like 0-11"):
            course.parse_seeds(bad)


def test_solutions_code_runs_after_its_lesson_and_a_broken_solution_fails_the_run(tmp_path, capsys):
    lessons = tmp_path / "notebooks"
    lessons.mkdir()
    _notebook(lessons / "00_exercises.ipynb", "answer = 41", check_cells=(0,))
    nb = nbformat.read(lessons / "00_exercises.ipynb", as_version=4)
    nb.cells += [
        nbformat.v4.new_markdown_cell("An example, not a solution:\n```python\nraise SystemExit\n```"),
        nbformat.v4.new_markdown_cell("1. Add one.\n<details><summary>Solution 1</summary>\n\n```python\n"
                                      "answer += 1\n```\n</details>\n\n2. Check it.\n<details><summary>Solution"
                                      "</summary>\n\n```python\nassert answer == 42, answer\n```\nProse.\n</details>"),
    ]
    nbformat.write(nb, lessons / "00_exercises.ipynb")

    assert course.solution_code(lessons / "00_exercises.ipynb") == ["answer += 1\n", "assert answer == 42, answer\n"]
    copy = course.with_solutions(lessons / "00_exercises.ipynb", tmp_path / "copies")
    appended = nbformat.read(copy, as_version=4).cells[-2:]
    assert [c.source for c in appended] == ["answer += 1", "assert answer == 42, answer"]
    assert all(c.cell_type == "code" and c.metadata.tags == ["solution"] for c in appended)
    options = ["course", "--device", "cpu", "--no-html", "--notebooks", str(lessons)]
    assert main([*options, "--out", str(tmp_path / "plain")]) == 0  # without --solutions they do not run
    assert main([*options, "--solutions", "--out", str(tmp_path / "with")]) == 0

    _notebook(lessons / "00_exercises.ipynb", "answer = 40", check_cells=(0,))
    nb = nbformat.read(lessons / "00_exercises.ipynb", as_version=4)
    nb.cells += [nbformat.v4.new_markdown_cell(
        "<details><summary>Solution</summary>\n\n```python\nassert answer == 42, answer\n```\n</details>")]
    nbformat.write(nb, lessons / "00_exercises.ipynb")
    assert main([*options, "--solutions", "--out", str(tmp_path / "broken")]) == 1
    assert "AssertionError: 40" in capsys.readouterr().err


def test_every_lesson_keeps_the_conventions():
    for path in lesson_notebooks():
        nb = nbformat.read(path, as_version=4)
        tags = [set(c.metadata.get("tags", [])) for c in nb.cells]
        assert sum("parameters" in t for t in tags) == 1, f"{path.name}: needs exactly one 'parameters' cell"
        parameters = next(c for c, t in zip(nb.cells, tags) if "parameters" in t)
        # papermill overrides only what it can parse; an unparsed line would still run, but silently ignore
        # the value `unlearnkit course` passes in
        parsed = [p.name for p in PythonTranslator.inspect(parameters)]
        assert parsed == ["QUICK", "DATASET", "DEVICE", "SEED"], f"{path.name}: papermill parses only {parsed}"
        assert any("check" in t for t in tags), f"{path.name}: no Check cell"
        assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path.name}: strip outputs"
        colab = [c.source for c in nb.cells if "google.colab" in c.source and "git clone" in c.source]
        assert colab and REPOSITORY_URL in colab[0], f"{path.name}: the Colab cell must clone {REPOSITORY_URL}"
        text = "".join(c.source for c in nb.cells if c.cell_type == "markdown")
        assert "<details>" in text, f"{path.name}: exercises need revealable solutions"
        for code in course.solution_code(path):  # run by test_notebooks; held to the code's style here
            compile(code, f"{path.name}, a solution", "exec")
            long = [line for line in code.splitlines() if len(line) > 120]
            assert not long, f"{path.name}: a solution's lines run past 120 characters: {long}"


def test_a_lessons_widget_cells_only_draw():
    """A widget cell gets a minute in either mode (WIDGET_CELL_TIMEOUT), so the work behind a widget belongs in the
    cells before it: lesson 03's grid of 24 GA runs, computed in its widget cell, took longer than that in full
    mode on a CPU and failed the lesson there (quick mode's runs were fast enough to hide it)."""
    allowed = (ast.FunctionDef, ast.Import, ast.ImportFrom)
    for path in lesson_notebooks():
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type != "code" or course._cell_timeout(cell.source, 10**6) != course.WIDGET_CELL_TIMEOUT:
                continue
            for statement in ast.parse(cell.source).body:
                is_interact = (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call)
                               and ast.unparse(statement.value.func).split(".")[-1] == "interact")
                assert isinstance(statement, allowed) or is_interact, (
                    f"{path.name}: a widget cell computes `{ast.unparse(statement)[:60]}`; move it to the cell before")


def test_readme_links_every_lesson_to_colab_at_the_one_repository_url():
    readme = (REPO_ROOT / "README.md").read_text()
    for path in lesson_notebooks():
        assert f"{REPOSITORY_URL.removeprefix('https://github.com/')}/blob/main/notebooks/{path.name}" in readme, \
            f"README has no Colab link for {path.name}"


def test_a_hung_cell_is_run_again_in_a_fresh_kernel_and_reported(tmp_path, monkeypatch):
    from nbclient.exceptions import CellTimeoutError


    _notebook(tmp_path / "00_sleeps.ipynb", "x = 1", "import time\ntime.sleep(60)")
    run = course.execute_notebook(tmp_path / "00_sleeps.ipynb", tmp_path / "out", {"QUICK": True}, html=False,
                                  cell_timeout=2)
    assert not run.ok and run.error == "hung or died in each of 2 attempts"
    assert len(run.hangs) == 2 and run.seconds < 30
    assert all(h.startswith("CellTimeoutError: A cell timed out") and "(cell starting `import time`)" in h
               for h in run.hangs), run.hangs

    calls = []

    def hangs_once(path, executed, parameters, cell_timeout):
        calls.append(cell_timeout)
        if len(calls) == 1:
            raise CellTimeoutError("A cell timed out while it was being executed, after 300 seconds.")
        return None, None

    monkeypatch.setattr(course, "_papermill", hangs_once)
    run = course.execute_notebook(tmp_path / "00_sleeps.ipynb", tmp_path / "again", {"QUICK": True}, html=False)
    assert run.ok and len(run.hangs) == 1 and "ran again after" in run.describe()
    assert calls == [course.CELL_TIMEOUT["quick"]] * 2
    run = course.execute_notebook(tmp_path / "00_sleeps.ipynb", tmp_path / "full", {"QUICK": False}, html=False)
    assert calls[-1] == course.CELL_TIMEOUT["full"]


def test_a_widget_cell_gets_a_short_timeout_in_either_mode(tmp_path, monkeypatch):

    assert course._cell_timeout("x = 1", 4 * 3600) == 4 * 3600
    assert course._cell_timeout("interact(show, S=slider)", 4 * 3600) == course.WIDGET_CELL_TIMEOUT
    assert course._cell_timeout("widgets.interact(show)", 10) == 10
    monkeypatch.setattr(course, "WIDGET_CELL_TIMEOUT", 2)
    _notebook(tmp_path / "00_widget.ipynb", "x = 1", "import time\ntime.sleep(60)\ninteract(print)")
    run = course.execute_notebook(tmp_path / "00_widget.ipynb", tmp_path / "out", {"QUICK": False}, html=False)
    assert not run.ok and len(run.hangs) == 2 and run.seconds < 30, (run.hangs, run.seconds)


def test_html_rendering_finds_the_base_pythons_templates_from_a_system_site_packages_venv(tmp_path, monkeypatch):
    base, venv = tmp_path / "base", tmp_path / "venv"
    (base / "share" / "jupyter").mkdir(parents=True)
    monkeypatch.setattr(sys, "base_prefix", str(base))
    monkeypatch.setattr(sys, "prefix", str(venv))
    monkeypatch.setenv("JUPYTER_PATH", "/elsewhere")

    _see_base_jupyter_data()
    _see_base_jupyter_data()  # idempotent: one entry however many lessons are rendered

    assert os.environ["JUPYTER_PATH"].split(os.pathsep) == ["/elsewhere", str(base / "share" / "jupyter")]
