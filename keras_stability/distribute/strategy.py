"""Choosing a `tf.distribute` strategy from the environment, and who writes files.

`get_strategy()` picks, in order: a TPU when one is named (`tpu=` or the
`TPU_NAME` environment variable), `MultiWorkerMirroredStrategy` when
`TF_CONFIG` describes more than one worker, `MirroredStrategy` on several
GPUs, one GPU, or the default strategy (CPU). Only the chief writes
checkpoints, logs and plots: `is_chief()` and `chief_path()` say where.
"""

import json
import os
import tempfile

import tensorflow as tf

from keras_stability import _checks
from keras_stability import _keras_internals
from keras_stability.distribute.keras_fixes import enable_multi_worker_fixes

_TASK_TYPES = ("chief", "worker", "evaluator", "ps")
# Task types a cluster has at most one of.
_SINGLE_TASK_TYPES = ("chief", "evaluator")


def parse_tf_config(text=None):
    """Parses and validates `TF_CONFIG`.

    Checks what TensorFlow would otherwise report late or not at all: the
    task types (`chief`, `worker`, `evaluator`, `ps`), at most one `chief`
    and one `evaluator`, every address a `host:port` with a port in
    1..65535 and used once, and `task` naming a type and index present in
    `cluster`.

    Args:
        text: The JSON text, or `None` to read the `TF_CONFIG` environment
            variable. Defaults to `None`.

    Returns:
        The decoded dict, or `None` when `TF_CONFIG` is unset or empty.

    Raises:
        ValueError: Naming the field that is missing or malformed, and
            whether it came from `text` or the environment.
    """
    text = _checks.check_str("text", text, allow_none=True, allow_empty=True)
    where = "the argument `text`"
    if text is None:
        text = os.environ.get("TF_CONFIG", "")
        where = "the TF_CONFIG environment variable"

    def bad(field, problem):
        field = f" field `{field}`" if field else ""
        return ValueError(f"Invalid TF_CONFIG{field}: {problem} (read from {where}).")

    if not text.strip():
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad(None, f"not valid JSON ({e}). Received: {text!r}") from None
    if not isinstance(config, dict):
        raise bad(None, f"expected a JSON object. Received: {text!r}")
    cluster = config.get("cluster")
    if not isinstance(cluster, dict) or not cluster:
        raise bad(
            "cluster",
            "expected an object mapping task types to lists of 'host:port' "
            'addresses, e.g. {"worker": ["localhost:12345", "localhost:23456"]}. '
            f"Received: cluster={cluster!r}",
        )
    seen = {}
    for task_type, addresses in cluster.items():
        field = f"cluster.{task_type}"
        if task_type not in _TASK_TYPES:
            raise bad(
                field, f"unknown task type. Expected one of {', '.join(_TASK_TYPES)}"
            )
        if not isinstance(addresses, list) or not addresses:
            raise bad(
                field,
                f"expected a non-empty list of 'host:port' strings. Received: {addresses!r}",
            )
        if task_type in _SINGLE_TASK_TYPES and len(addresses) > 1:
            raise bad(
                field,
                f"a cluster has at most one {task_type}. Received: {addresses!r}",
            )
        for address in addresses:
            _check_address(bad, field, address)
            if address in seen:
                raise bad(
                    field,
                    f"{address!r} is also the address of a task of "
                    f"`cluster.{seen[address]}`; each task needs its own",
                )
            seen[address] = task_type
    task = config.get("task")
    if not isinstance(task, dict):
        raise bad(
            "task",
            'expected an object like {"type": "worker", "index": 0}. '
            f"Received: task={task!r}",
        )
    task_type, index = task.get("type"), task.get("index")
    if not isinstance(task_type, str) or task_type not in cluster:
        raise bad(
            "task.type",
            f"{task_type!r} is not a task type of `cluster` ({', '.join(cluster)})",
        )
    if not _checks.is_integer(index) or not 0 <= index < len(cluster[task_type]):
        raise bad(
            "task.index",
            f"expected an integer in [0, {len(cluster[task_type])}) for task type "
            f"{task_type!r}. Received: index={index!r}",
        )
    return config


def _check_address(bad, field, address):
    host, sep, port = (
        address.rpartition(":") if isinstance(address, str) else ("", "", "")
    )
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise bad(
            field,
            f"{address!r} is not a 'host:port' address with a port in 1..65535",
        )


def _num_workers(config):
    if config is None:
        return 1
    return sum(len(config["cluster"].get(t, [])) for t in ("chief", "worker"))


def get_strategy(tpu=None, timeout_seconds=300):
    """Returns the `tf.distribute` strategy the environment asks for.

    Call it first, before any TensorFlow op runs (before the dataset, the
    model or any tensor is created): a multi-worker strategy configures
    TensorFlow's collective ops, which TensorFlow allows only at program
    startup.

    Args:
        tpu: TPU name or address for `TPUClusterResolver`; `"local"` for a
            TPU VM; `None` to read the `TPU_NAME` environment variable (no
            TPU if unset). Defaults to `None`.
        timeout_seconds: Bound on each collective operation of a multi-worker
            strategy, so a dead worker makes the others fail with an error
            instead of waiting forever. Defaults to `300`.

    Returns:
        A `tf.distribute.Strategy`. For multi-worker training the Keras fixes
        of `enable_multi_worker_fixes()` are switched on.

    Raises:
        ValueError: If an argument or `TF_CONFIG` is malformed.
        RuntimeError: If `TF_CONFIG` asks for several workers but a
            TensorFlow op already ran in this process.
    """
    tpu = _checks.check_str("tpu", tpu, allow_none=True)
    timeout_seconds = _checks.check_positive("timeout_seconds", timeout_seconds)
    tpu = tpu or os.environ.get("TPU_NAME")
    if tpu:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    config = parse_tf_config()
    if _num_workers(config) > 1:
        if not _keras_internals.collective_ops_configurable():
            raise RuntimeError(
                "keras_stability.distribute.get_strategy() must be called before "
                "any TensorFlow op runs (before the dataset, the model or any "
                f"tensor is created). TF_CONFIG describes {_num_workers(config)} "
                "workers, and TensorFlow can set up MultiWorkerMirroredStrategy's "
                "collective ops only at program startup. Call get_strategy() right "
                "after the imports."
            )
        enable_multi_worker_fixes()
        return tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(
                timeout_seconds=timeout_seconds
            )
        )
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    if len(gpus) == 1:
        return tf.distribute.OneDeviceStrategy(gpus[0].name)
    return tf.distribute.get_strategy()


def _task(strategy=None):
    """`(task_type, task_id, has_chief)` of this process, or `None` if alone.

    Read from the strategy's cluster resolver, else from `TF_CONFIG` (host
    code outside a strategy scope, such as a plot after `fit`).
    """
    strategy = _check_strategy(strategy) or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is not None and resolver.cluster_spec().as_dict():
        cluster = resolver.cluster_spec().as_dict()
        return resolver.task_type, resolver.task_id, "chief" in cluster
    config = parse_tf_config()
    if _num_workers(config) <= 1:
        return None
    task = config["task"]
    return task["type"], task["index"], "chief" in config["cluster"]


def _check_strategy(strategy):
    if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
        raise _checks.invalid("strategy", strategy, "a tf.distribute.Strategy or None")
    return strategy


def is_chief(strategy=None):
    """Whether this process should write checkpoints, logs and plots.

    True outside multi-worker training; under it, true for the `chief` task,
    or for worker 0 when the cluster has no chief.

    Args:
        strategy: The strategy in use, or `None` for the current one
            (outside any scope, `TF_CONFIG` tells). Defaults to `None`.

    Returns:
        A `bool`.

    Raises:
        ValueError: If `strategy` is not a `tf.distribute.Strategy` or
            `TF_CONFIG` is malformed.
    """
    task = _task(strategy)
    if task is None:
        return True
    task_type, task_id, has_chief = task
    if task_type == "chief":
        return True
    return task_type == "worker" and task_id == 0 and not has_chief


def chief_path(path, strategy=None):
    """Where to write `path`: itself on the chief, a throw-away folder elsewhere.

    Multi-worker Keras callbacks must run on every worker (they take part in
    collectives), but only the chief's files should land in `path`; the
    others write to a temporary directory (TensorFlow's own pattern for
    `ModelCheckpoint`).

    Args:
        path: File or folder the chief writes (a `str` or `os.PathLike`), or
            `None`, returned as is.
        strategy: The strategy in use, or `None` for the current one
            (outside any scope, `TF_CONFIG` tells). Defaults to `None`.

    Returns:
        The path as a `str` (or `None`).

    Raises:
        ValueError: If `path` is not a path or `strategy` not a strategy.
    """
    path = _checks.check_path("path", path, allow_none=True)
    _check_strategy(strategy)
    if path is None or is_chief(strategy):
        return path
    task_type, task_id, _ = _task(strategy)
    return os.path.join(
        tempfile.gettempdir(),
        "keras_stability_workers",
        f"{task_type}_{task_id}",
        os.path.basename(os.path.normpath(path)),
    )
