"""`make lint` as a test, so CI enforces it: ruff check and ruff format --check."""

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

PATHS = ["keras_stability", "tests", "benchmarks"]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=" ".join)
def test_ruff_is_clean(command):
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, *PATHS],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
