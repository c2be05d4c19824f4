import functools

import pytest

from tests import prefetch
from tests.helpers import run_in_subprocess


@pytest.fixture
def two_cpu_devices():
    """Runs a module-level function in a subprocess that sees 2 logical CPU devices.

    Usage: `result = two_cpu_devices(module_level_fn, *args, **kwargs)`.
    """
    return functools.partial(run_in_subprocess, n_cpu_devices=2)


@pytest.fixture
def fresh_process():
    """Runs a module-level function in a fresh single-device subprocess."""
    return functools.partial(run_in_subprocess, n_cpu_devices=1)


def pytest_collection_finish(session):
    # The slow child processes of the selected modules start now, beside the
    # tests (see tests/prefetch.py).
    if not session.config.option.collectonly:
        prefetch.start(session.items)


def pytest_sessionfinish(session):
    prefetch.stop()
