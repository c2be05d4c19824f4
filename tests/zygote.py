"""Forks the children of `tests.helpers.run_in_subprocess` from a warm Python.

Usage: python -m tests.zygote   (started by `tests.helpers`, one per test process)

Each child of `run_in_subprocess` used to be a new interpreter that spent
about 4 s of CPU importing TensorFlow and Keras before its test did anything
(about 60 places in the suite start one). This process imports the two once
and then forks a child per request. Nothing else is imported here (not
`keras_stability`, not a test module) and TensorFlow's runtime is not started
(no op runs, no device is listed), so a forked child starts where a new
interpreter is after `import tensorflow, keras`: it still splits the CPU into
logical devices, imports the test module and proves that saved files load
without the objects that wrote them.

Protocol, one JSON line each way on stdin/stdout: `{"fork": {"argv":
[payload, result], "env": {...}, "cwd": ..., "log": ...}}` is answered with
`{"pid": N}` (the child's environment is replaced by `env`, its stdout and
stderr go to `log`); `{"poll": N}` with `{"returncode": None}` while child N
runs, then its exit code as `subprocess.Popen` gives it (-9 when killed). The
process ends when its stdin closes (the test process ended).
"""

import json
import os
import sys


def _child(request):
    code = 1
    try:
        os.setpgid(0, 0)  # a timeout kills the child's own children too
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = ["tests.subprocess_main", *request["argv"]]
        # A new interpreter draws fresh seeds. Python reseeds `random` in a
        # forked child itself; NumPy's global generator would be shared.
        import numpy as np

        np.random.seed()
        from tests import subprocess_main

        subprocess_main.main(*request["argv"])
        code = 0
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main():
    import keras  # noqa: F401
    import tensorflow  # noqa: F401

    print(json.dumps({"ready": True}), flush=True)
    done = {}
    for line in sys.stdin:
        request = json.loads(line)
        if "fork" in request:
            pid = os.fork()
            if pid == 0:
                _child(request["fork"])
            reply = {"pid": pid}
        else:
            pid = request["poll"]
            if pid not in done:
                waited, status = os.waitpid(pid, os.WNOHANG)
                if waited == pid:
                    done[pid] = os.waitstatus_to_exitcode(status)
            reply = {"returncode": done.get(pid)}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
