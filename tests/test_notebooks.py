"""Execute every lesson in quick mode: a lesson's Check cells are its tests."""

import pytest

from unlearnkit.course import execute_notebook, lesson_notebooks

LESSONS = lesson_notebooks()


def test_there_are_lessons():
    assert len(LESSONS) >= 2


@pytest.mark.notebook
@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_executes_in_quick_mode(path, tmp_path):
    run = execute_notebook(path, tmp_path, {"QUICK": True, "DATASET": "embedded", "DEVICE": "cpu", "SEED": 0},
                           html=False)
    assert run.ok, run.describe()
    assert run.checks >= 1, f"{path.name} has no cell tagged 'check'"
