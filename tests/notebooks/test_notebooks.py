"""Every notebook in notebooks/ runs top to bottom at its reduced size.

The one switch is the environment variable `KERAS_STABILITY_NOTEBOOK_QUICK=1`,
read by each notebook's parameters cell; in Colab it is unset and the
notebook runs at full size.
"""

import concurrent.futures
import glob
import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import REPO_ROOT

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO_ROOT, "notebooks", "*.ipynb")))
# Seconds each took in the suite at e4bb033 (two kernels side by side, 2 cores):
# the longest start first, so the two kernels finish close together (in name
# order the longest came last and ran alone). Unlisted (new) ones go first.
SECONDS = {
    "07_llm_pipeline.ipynb": 65,
    "03_pruning.ipynb": 62,
    "04_distillation.ipynb": 49,
    "06_small_language_model.ipynb": 39,
    "02_gradient_health.ipynb": 30,
    "05_tuning.ipynb": 16,
    "01_quickstart.ipynb": 14,
}

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


def _execute(path, workdir):
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()
    return nb


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Every notebook run once, two kernels at a time.

    A kernel is its own process and the test process only waits on it, so two
    run side by side on a 2-core machine in about half the time.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERAS_STABILITY_NOTEBOOK_QUICK", "1")
        patch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
        patch.setenv("MPLBACKEND", "Agg")
        # The kernel imports this checkout's package (the install cell then
        # does nothing).
        python_path = [p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p]
        patch.setenv("PYTHONPATH", os.pathsep.join(python_path))
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            futures = {
                path: pool.submit(
                    _execute, path, tmp_path_factory.mktemp(os.path.basename(path))
                )
                for path in sorted(
                    NOTEBOOKS, key=lambda p: -SECONDS.get(os.path.basename(p), 1000)
                )
            }
            # Exceptions are raised by each notebook's own test, not here.
            concurrent.futures.wait(futures.values())
    return futures


@pytest.mark.parametrize(
    "path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS]
)
def test_notebook_runs(path, executed):
    nb = executed[path].result()
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors, errors
