"""Every notebook in notebooks/ runs top to bottom at its reduced size.

The one switch is the environment variable `KERAS_STABILITY_NOTEBOOK_QUICK=1`,
read by each notebook's parameters cell; in Colab it is unset and the
notebook runs at full size.
"""

import glob
import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import REPO_ROOT

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO_ROOT, "notebooks", "*.ipynb")))

pytestmark = pytest.mark.slow


def test_every_notebook_has_the_install_cell_and_the_quick_switch():
    assert len(NOTEBOOKS) >= 1
    for path in NOTEBOOKS:
        with open(path) as f:
            nb = json.load(f)
        code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
        assert "pip" in code[0] and "keras_stability" in code[0], path
        assert any("KERAS_STABILITY_NOTEBOOK_QUICK" in c for c in code[:3]), path
        # Committed without outputs: Colab shows the user's own run.
        assert all(
            not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"
        ), path


@pytest.mark.parametrize(
    "path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS]
)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_STABILITY_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # The kernel imports this checkout's package (the install cell then does nothing).
    python_path = [p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(python_path))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors, errors
