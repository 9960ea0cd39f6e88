"""Execute every lesson in quick mode: a lesson's Check cells are its tests, and its solutions must run."""

import pytest

from unlearnkit.course import execute_notebook, lesson_notebooks, solution_code, with_solutions

LESSONS = lesson_notebooks()
WITH_SOLUTION_CODE = [p for p in LESSONS if solution_code(p)]
QUICK_CPU = {"QUICK": True, "DATASET": "embedded", "DEVICE": "cpu", "SEED": 0}


def test_there_are_lessons():
    assert len(LESSONS) >= 2


@pytest.mark.notebook
@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_executes_in_quick_mode(path, tmp_path):
    run = execute_notebook(path, tmp_path, QUICK_CPU, html=False)
    assert run.ok, run.describe()
    assert run.checks >= 1, f"{path.name} has no cell tagged 'check'"


@pytest.mark.notebook
@pytest.mark.parametrize("path", WITH_SOLUTION_CODE, ids=[p.stem for p in WITH_SOLUTION_CODE])
def test_lesson_solutions_run_after_the_lesson(path, tmp_path):
    run = execute_notebook(with_solutions(path, tmp_path / "lessons"), tmp_path / "executed", QUICK_CPU, html=False)
    assert run.ok, f"a solution's code no longer runs: {run.describe()}"
