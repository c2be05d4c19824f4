"""The notebooks' first cell: install keras-stability from what the user has.

The package is on no index, so the cell pip-installs a wheel made by
`make dist` or a copy of the repository found next to the notebook, one folder
up or in /content (Colab), does nothing when the package is importable, and
otherwise prints how to get it. Here the cell runs in a child interpreter
whose `subprocess.check_call` only records the command (nothing is
installed), with the package importable or hidden.
"""

import glob
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO_ROOT, "notebooks", "*.ipynb")))

# Loaded first in the child: records pip calls, hides the package if asked.
SITECUSTOMIZE = """
import json, os, subprocess, sys

def _record(cmd, **kwargs):
    print("PIP " + json.dumps(cmd))
    return 0

subprocess.check_call = _record
if os.environ.get("HIDE_KERAS_STABILITY"):
    sys.modules["keras_stability"] = None  # find_spec() -> None, as when not installed
"""


def _install_cell(path):
    with open(path) as f:
        nb = json.load(f)
    return "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])


CELL = _install_cell(NOTEBOOKS[0])


def test_every_notebook_has_the_same_install_cell_and_no_repository_url():
    for path in NOTEBOOKS:
        assert _install_cell(path) == CELL, path
        with open(path) as f:
            text = f.read()
        # No address is published for the repository yet: none may be invented.
        assert "github.com" not in text and "git+" not in text, path


def _run_cell(tmp_path, cwd, hide=True):
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), REPO_ROOT])
    env.pop("HIDE_KERAS_STABILITY", None)
    if hide:
        env["HIDE_KERAS_STABILITY"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", CELL],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    calls = [
        json.loads(line[4:])
        for line in proc.stdout.splitlines()
        if line.startswith("PIP ")
    ]
    messages = [
        line for line in proc.stdout.splitlines() if not line.startswith("PIP ")
    ]
    return calls, messages


def _fake_repo(path):
    (path / "keras_stability").mkdir(parents=True)
    (path / "keras_stability" / "__init__.py").write_text("")
    (path / "setup.cfg").write_text("[metadata]\nname = keras-stability\n")
    return path


def test_does_nothing_when_the_package_is_importable(tmp_path):
    (tmp_path / "keras_stability-0.1.0-py3-none-any.whl").write_text("")
    assert _run_cell(tmp_path, tmp_path, hide=False) == ([], [])


def test_installs_a_wheel_next_to_the_notebook(tmp_path):
    for version in ("0.1.0", "0.2.0"):
        (tmp_path / f"keras_stability-{version}-py3-none-any.whl").write_text("")
    _fake_repo(tmp_path / "keras-stability")  # a wheel is preferred to a clone
    calls, messages = _run_cell(tmp_path, tmp_path)
    wheel = str(tmp_path / "keras_stability-0.2.0-py3-none-any.whl")
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", wheel]]
    assert messages == []


def test_installs_the_repository_the_notebook_sits_in(tmp_path):
    # Jupyter started in the repository's notebooks/ folder: the repository is one up.
    repo = _fake_repo(tmp_path / "checkout")
    (repo / "notebooks").mkdir()
    calls, _ = _run_cell(tmp_path, repo / "notebooks")
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", str(repo)]]


def test_installs_the_wheel_made_by_make_dist_in_the_repository(tmp_path):
    repo = _fake_repo(tmp_path / "checkout")
    (repo / "notebooks").mkdir()
    (repo / "dist").mkdir()
    (repo / "dist" / "keras_stability-0.1.0-py3-none-any.whl").write_text("")
    calls, _ = _run_cell(tmp_path, repo / "notebooks")
    wheel = str(repo / "dist" / "keras_stability-0.1.0-py3-none-any.whl")
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", wheel]]


def test_installs_a_clone_next_to_the_notebook(tmp_path):
    work = tmp_path / "content"
    work.mkdir()
    (work / "sample_data").mkdir()  # Colab's own folder, not a copy of the package
    clone = _fake_repo(work / "keras-stability")
    calls, _ = _run_cell(tmp_path, work)
    assert calls == [
        [sys.executable, "-m", "pip", "install", "-q", os.path.join(str(clone), "")]
    ]


@pytest.mark.skipif(
    os.path.exists("/content"), reason="/content exists on this machine"
)
def test_says_how_to_get_it_when_nothing_is_found(tmp_path):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    calls, messages = _run_cell(tmp_path, work)
    assert calls == []
    assert len(messages) == 1, messages
    assert "make dist" in messages[0] and "clone the repository" in messages[0]
