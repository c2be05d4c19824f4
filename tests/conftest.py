import functools

import pytest
import xdist

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
    # Under pytest-xdist (`make test` runs 2 workers) each worker collects every
    # test but runs only its share: the children then run when their fixture
    # asks, and the other worker keeps the second core busy meanwhile.
    if not session.config.option.collectonly and not xdist.is_xdist_worker(session):
        prefetch.start(session.items)


def pytest_sessionfinish(session):
    prefetch.stop()
