"""Test helpers: a subprocess runner with several logical CPU devices, and a
layer test that does what Keras' private `run_layer_test` does."""

import concurrent.futures
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Per thread: the environment children start from instead of `os.environ`
# (`tests.prefetch` sets the session's initial one on its thread).
CHILD_BASE_ENV = threading.local()


def _base_env():
    env = getattr(CHILD_BASE_ENV, "env", None)
    return dict(os.environ if env is None else env)


def run_in_subprocess(func, *args, n_cpu_devices=2, timeout=600, env=None, **kwargs):
    """Runs `func(*args, **kwargs)` in a fresh Python and returns its result.

    tf.distribute tests need the CPU split into logical devices before
    TensorFlow initialises, which a running test process cannot undo; a fresh
    process also proves that saved files load without the objects that wrote
    them. `func` must be a module-level function of an importable module
    (a test module is fine), and its arguments and result must pickle.

    The child is forked from a process that has imported TensorFlow and Keras
    and nothing else (`tests/zygote.py`), which saves each child about 4 s of
    CPU; it starts as a new interpreter when `env` (or a test's monkeypatched
    environment) changes a variable that may act at import time, and always
    with `KERAS_STABILITY_TEST_NO_FORK=1`.

    Args:
        func: Module-level function to call in the child.
        *args: Positional arguments for `func`.
        n_cpu_devices: Logical CPU devices the child sees. Defaults to `2`.
        timeout: Seconds before the child is killed. Defaults to `600`.
        env: Extra environment variables for the child. Defaults to `None`.
        **kwargs: Keyword arguments for `func`.

    Returns:
        What `func` returned.

    Raises:
        AssertionError: With the child's traceback if `func` raised or the
            child died.
    """
    with tempfile.TemporaryDirectory() as tmp:
        child = _Child(func, args, kwargs, n_cpu_devices, env, tmp)
        return child.result(timeout)


def run_side_by_side(*calls, max_workers=None):
    """Runs independent zero-argument `calls` in threads and returns their results.

    Each call is expected to spend its time waiting on a child process (e.g.
    `functools.partial(run_in_subprocess, ...)` or `run_workers`), so the
    children run at the same time instead of one after another: the machine
    has 2 cores and a test process alone mostly uses one. Every call keeps its
    own environment and temporary folder; the callers must not give two calls
    the same folder or port.

    Args:
        *calls: Zero-argument callables.
        max_workers: Calls running at once. Defaults to `None` (all of them).

    Returns:
        The list of the calls' results, in the order of `calls`.

    Raises:
        The first (in the order of `calls`) exception a call raised, after
        every call has finished.
    """
    env = getattr(CHILD_BASE_ENV, "env", None)

    def run(call):
        CHILD_BASE_ENV.env = env  # the caller's, in this worker thread
        return call()

    with concurrent.futures.ThreadPoolExecutor(
        max_workers=max_workers or len(calls)
    ) as pool:
        futures = [pool.submit(run, call) for call in calls]
        concurrent.futures.wait(futures)
    return [future.result() for future in futures]


class Started:
    """A command started now, in the background, and checked later by a test.

    A module-scoped fixture starts a slow child (a whole demo) when the module
    begins, so it runs on the second core beside the module's other tests; the
    test that checks it comes last in the module and only waits. stdout and
    stderr go to temporary files (a full pipe would block the child).

    Args:
        argv: The command.
        env: The child's whole environment. Defaults to `None` (this one's).
        cwd: The child's working folder. Defaults to `REPO_ROOT`.
    """

    def __init__(self, argv, env=None, cwd=REPO_ROOT):
        self.argv = list(argv)
        self._out = tempfile.TemporaryFile("w+")
        self._err = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            self.argv, cwd=cwd, env=env, stdout=self._out, stderr=self._err, text=True
        )

    def finish(self, timeout):
        """Waits for the child; returns a `subprocess.CompletedProcess`."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._out.seek(0)
        self._err.seek(0)
        return subprocess.CompletedProcess(
            self.argv, self.proc.returncode, self._out.read(), self._err.read()
        )

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def is_selected(request, test_name):
    """Whether `test_name` of the requesting module will run in this session."""
    return any(
        getattr(item, "module", None) is request.module
        and getattr(item, "originalname", item.name) == test_name
        for item in request.session.items
    )


def run_workers(func, *args, n_workers=2, timeout=600, env=None, **kwargs):
    """Runs `func(*args, **kwargs)` in `n_workers` processes forming a cluster.

    Each process gets a `TF_CONFIG` naming every worker on a loopback port
    chosen free at run time and its own `task.index`, so
    `tf.distribute.MultiWorkerMirroredStrategy()` inside `func` connects them.
    The worker's index is also in the `KERAS_STABILITY_WORKER_INDEX`
    environment variable.

    Returns:
        The list of the workers' results, by index.
    """
    ports = free_ports(n_workers)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    with tempfile.TemporaryDirectory() as tmp:
        children = []
        for index in range(n_workers):
            tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            child_env = {
                **(env or {}),
                "TF_CONFIG": json.dumps(tf_config),
                "KERAS_STABILITY_WORKER_INDEX": str(index),
            }
            work_dir = os.path.join(tmp, f"worker{index}")
            os.makedirs(work_dir)
            children.append(_Child(func, args, kwargs, 1, child_env, work_dir))
        try:
            return [child.result(timeout) for child in children]
        finally:
            for child in children:
                child.kill()


def free_ports(n):
    """`n` distinct TCP ports on the loopback interface that are free now."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("localhost", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _child_env(extra=None):
    env = _base_env()
    env.update(extra or {})
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p
    )
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


class _Forked:
    """A child forked by `tests.zygote`: `wait`, `poll`, `kill` and
    `returncode` as in `subprocess.Popen` (the zygote reaps it and tells)."""

    def __init__(self, zygote, pid):
        self._zygote = zygote
        self.pid = pid
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            self.returncode = self._zygote.request({"poll": self.pid})["returncode"]
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.01
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("tests.zygote child", timeout)
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        return self.returncode

    def kill(self):
        for target in (-self.pid, self.pid):  # its process group, then itself
            try:
                os.kill(target, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class _Zygote:
    """The warm process of this test process (`tests.zygote`), started lazily.

    `fork` returns `None` (the caller starts a new interpreter) when the
    child's environment differs from the zygote's in a variable other than
    the ones TensorFlow and the tests read after import (`_RUNTIME_ENV`), when
    the platform has no `fork`, or with `KERAS_STABILITY_TEST_NO_FORK=1`.
    """

    # Read when used (or never), not when TensorFlow or Keras is imported;
    # pytest sets the last one to the running test's id.
    _RUNTIME_ENV = ("TF_CONFIG", "KERAS_STABILITY_WORKER_INDEX", "PYTEST_CURRENT_TEST")

    def __init__(self):
        self._lock = threading.Lock()
        self._proc = None
        self._env = None
        self._broken = False

    def _start(self):
        self._env = _child_env()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.zygote"],
            cwd=REPO_ROOT,
            env=self._env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        if json.loads(self._proc.stdout.readline() or "{}").get("ready") is not True:
            raise RuntimeError("tests.zygote did not start")

    def fork(self, argv, env, log_path):
        if (
            not hasattr(os, "fork")
            or os.environ.get("KERAS_STABILITY_TEST_NO_FORK") == "1"
            or self._broken
        ):
            return None
        with self._lock:
            try:
                if self._proc is None or self._proc.poll() is not None:
                    self._start()
                keys = set(env) | set(self._env)
                if any(
                    env.get(k) != self._env.get(k)
                    for k in keys
                    if k not in self._RUNTIME_ENV
                ):
                    return None
                request = {"argv": argv, "env": env, "cwd": REPO_ROOT, "log": log_path}
                pid = self._ask({"fork": request})["pid"]
            except (OSError, ValueError, KeyError, RuntimeError):
                self._broken = True  # from now on, new interpreters
                return None
        return _Forked(self, pid)

    def _ask(self, request):
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        return json.loads(self._proc.stdout.readline())

    def request(self, request):
        with self._lock:
            return self._ask(request)


_ZYGOTE = _Zygote()


class _Child:
    """One child Python running `tests.subprocess_main` on a pickled payload.

    Forked from `tests.zygote` (TensorFlow and Keras already imported) when
    the environment allows, else a new interpreter.
    """

    def __init__(self, func, args, kwargs, n_cpu_devices, env, tmp):
        if func.__qualname__ != func.__name__ or func.__module__ == "__main__":
            raise ValueError(
                "Invalid value for argument `func`. Expected a module-level function "
                f"of an importable module. Received: func={func.__qualname__!r} from "
                f"{func.__module__!r}"
            )
        self.name = f"{func.__module__}.{func.__name__}"
        payload_path = os.path.join(tmp, "payload.pkl")
        self.result_path = os.path.join(tmp, "result.pkl")
        payload = {
            "module": func.__module__,
            "name": func.__name__,
            "args": args,
            "kwargs": kwargs,
            "n_cpu_devices": n_cpu_devices,
            "env": dict(env or {}),
        }
        with open(payload_path, "wb") as f:
            pickle.dump(payload, f)
        child_env = _child_env(payload["env"])
        self.log_path = os.path.join(tmp, "output.log")
        self._log = open(self.log_path, "w+")
        argv = [payload_path, self.result_path]
        self.proc = _ZYGOTE.fork(argv, child_env, self.log_path)
        if self.proc is None:  # an environment the warm process was not started in
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.subprocess_main", *argv],
                cwd=REPO_ROOT,
                env=child_env,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                text=True,
            )

    def result(self, timeout):
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"Subprocess running {self.name} did not finish in {timeout} s.\n"
                f"output:\n{self.output()}"
            ) from None
        if not os.path.exists(self.result_path):
            raise AssertionError(
                f"Subprocess running {self.name} died with exit code "
                f"{self.proc.returncode}.\noutput:\n{self.output()}"
            )
        with open(self.result_path, "rb") as f:
            outcome = pickle.load(f)
        self._log.close()
        if not outcome["ok"]:
            raise AssertionError(
                f"{self.name} raised in the subprocess:\n" + outcome["traceback"]
            )
        return outcome["value"]

    def output(self):
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path) as f:
            return f.read()[-6000:]

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self._log.closed:
            self._log.close()


def predict_saved_model(path, x):
    """Loads a `.keras` file and predicts on `x`; meant for `run_in_subprocess`.

    The child imports `keras_stability` (as a user would) so its registered
    classes are known, and nothing else of the parent's state.
    """
    import keras

    import keras_stability  # noqa: F401  (registers serializable classes)

    model = keras.saving.load_model(path)
    return np.asarray(model.predict(x, verbose=0))


def run_layer_test(
    layer_cls,
    init_kwargs,
    input_shape,
    expected_output_shape=None,
    expected_num_trainable_weights=None,
    expected_num_non_trainable_weights=None,
    expected_num_losses=None,
    input_dtype="float32",
    run_training=True,
    fresh_process=False,
    tmp_dir=None,
    seed=0,
):
    """Checks a layer the way Keras' own `run_layer_test` does.

    1. builds the layer on `input_shape` (batch included) and calls it;
    2. checks the output shape and the trainable / non-trainable weight counts;
    3. `get_config()` round trip: `from_config(config).get_config() == config`;
    4. saves a model wrapping the layer to `.keras`, loads it (in a fresh
       process if `fresh_process`) and checks equal predictions;
    5. fits the model for one epoch on random targets; the loss must be finite.

    Returns:
        Dict with `"layer"`, `"model"`, `"output"` and `"history"` for further
        assertions.
    """
    import keras

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    if np.dtype(input_dtype).kind in "iu":
        x = rng.integers(0, 10, size=input_shape).astype(input_dtype)
    else:
        x = rng.normal(size=input_shape).astype(input_dtype)

    layer = layer_cls(**init_kwargs)
    inputs = keras.Input(shape=input_shape[1:], batch_size=None, dtype=input_dtype)
    outputs = layer(inputs)
    model = keras.Model(inputs, outputs)
    y = np.asarray(model(x, training=False))

    if expected_output_shape is not None:
        assert tuple(y.shape) == tuple(expected_output_shape), (
            f"output shape {tuple(y.shape)} != expected {tuple(expected_output_shape)}"
        )
    if expected_num_trainable_weights is not None:
        assert len(layer.trainable_weights) == expected_num_trainable_weights, (
            f"{len(layer.trainable_weights)} trainable weights, expected "
            f"{expected_num_trainable_weights}"
        )
    if expected_num_non_trainable_weights is not None:
        assert len(layer.non_trainable_weights) == expected_num_non_trainable_weights, (
            f"{len(layer.non_trainable_weights)} non-trainable weights, expected "
            f"{expected_num_non_trainable_weights}"
        )
    if expected_num_losses is not None:
        assert len(layer.losses) == expected_num_losses, (
            f"{len(layer.losses)} losses, expected {expected_num_losses}"
        )

    config = layer.get_config()
    revived = layer_cls.from_config(config)
    assert revived.get_config() == config, "get_config() does not round-trip"

    own_tmp = None
    if tmp_dir is None:
        own_tmp = tempfile.TemporaryDirectory()
        tmp_dir = own_tmp.name
    try:
        path = os.path.join(str(tmp_dir), f"{layer.name}.keras")
        model.save(path)
        if fresh_process:
            y_loaded = run_in_subprocess(predict_saved_model, path, x, n_cpu_devices=1)
        else:
            y_loaded = np.asarray(keras.saving.load_model(path).predict(x, verbose=0))
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()
    np.testing.assert_allclose(
        y_loaded,
        y,
        rtol=1e-5,
        atol=1e-6,
        err_msg="predictions differ after .keras load",
    )

    history = None
    if run_training:
        model.compile(optimizer="adam", loss="mse")
        target = rng.normal(size=y.shape).astype("float32")
        history = model.fit(x, target, epochs=1, batch_size=len(x), verbose=0)
        loss = history.history["loss"][-1]
        assert np.isfinite(loss), f"loss after one epoch is not finite: {loss}"
    return {"layer": layer, "model": model, "output": y, "history": history}
