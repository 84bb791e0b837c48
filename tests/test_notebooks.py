"""Every notebook in notebooks/ runs top to bottom (outputs are stripped in the repository)."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        f"{path.name} has stored outputs; strip them before committing"
    monkeypatch.setenv("LANDSCAPE_ROOT", str(ROOT))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


def test_there_is_a_notebook():
    assert NOTEBOOKS, "notebooks/ is empty"
    assert os.path.exists(ROOT / "data" / "cnn_digits_sgd.pt")
