"""Strip outputs and execution counts from notebooks, so that diffs stay readable.

    python scripts/strip_notebooks.py [notebooks/*.ipynb]
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat


def strip(path: Path) -> bool:
    """Remove outputs, execution counts and volatile metadata; return whether the file changed."""
    original = path.read_text(encoding="utf-8")
    notebook = nbformat.reads(original, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        for key in ("execution", "papermill", "collapsed", "scrolled"):
            cell.metadata.pop(key, None)
    for key in ("papermill", "widgets"):
        notebook.metadata.pop(key, None)
    text = nbformat.writes(notebook) + "\n"
    if text != original:
        path.write_text(text, encoding="utf-8")
        return True
    return False


if __name__ == "__main__":
    paths = [Path(p) for p in sys.argv[1:]] or sorted(Path(__file__).resolve().parents[1].glob("notebooks/*.ipynb"))
    for p in paths:
        if strip(p):
            print(f"stripped {p}")
