"""Slow child processes started when the session begins, on the second core.

Only in a run in one pytest process (`pytest ...`, `make test
TEST_WORKERS=0`), which leaves the second core idle. `make test` runs 2
pytest-xdist workers, and there nothing is prefetched (`tests/conftest.py`):
each call runs when its fixture asks. A few
module fixtures only wait on child processes (`run_in_subprocess`) whose
result depends on nothing but the code under test. Such a fixture registers
its call here when its module is imported (collection):

    prefetch.register(__name__, "runs", functools.partial(run_in_subprocess, ...))

    @pytest.fixture(scope="module")
    def runs():
        return prefetch.result(__name__, "runs")

When collection ends (`tests/conftest.py`), the calls of the selected modules
start in test order, one at a time on a background thread, while the tests
run; the fixture then only takes the result (or waits for it). A call whose
module is not selected never runs; `result` runs a call that was not started.
Each child gets the environment of the session's start (a test's monkeypatched
variables do not leak into it), its own temporary folder, and its own timeout.
"""

import concurrent.futures
import os

from tests import helpers

_CALLS = {}  # (module, name) -> zero-argument callable
_FUTURES = {}
_POOL = []


def register(module, name, call):
    """Registers `call` (no arguments) as the result `name` of `module`."""
    _CALLS[(module, name)] = call


def result(module, name):
    """The result of the registered call: waits for it, or runs it now."""
    future = _FUTURES.get((module, name))
    if future is None:
        return _CALLS[(module, name)]()
    return future.result()


def _run(env, call):
    helpers.CHILD_BASE_ENV.env = env
    return call()


def start(items):
    """Starts the registered calls of the modules of `items`, in their order."""
    keys = []
    for item in items:
        module = getattr(getattr(item, "module", None), "__name__", None)
        for key in _CALLS:
            if key[0] == module and key not in keys and key not in _FUTURES:
                keys.append(key)
    if not keys:
        return
    if not _POOL:
        _POOL.append(
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        )
    env = dict(os.environ)
    for key in keys:
        _FUTURES[key] = _POOL[0].submit(_run, env, _CALLS[key])


def stop():
    """Drops the calls not started yet (the session ends early, e.g. `-x`)."""
    for pool in _POOL:
        pool.shutdown(wait=False, cancel_futures=True)
