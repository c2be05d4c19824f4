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

from keras_stability.distribute.keras_fixes import enable_multi_worker_fixes

_TASK_TYPES = ("chief", "worker", "evaluator", "ps")


def parse_tf_config(text=None):
    """Parses and validates `TF_CONFIG`.

    Args:
        text: The JSON text. Defaults to the `TF_CONFIG` environment variable.

    Returns:
        The decoded dict, or `None` when `TF_CONFIG` is unset or empty.

    Raises:
        ValueError: Naming the field that is missing or malformed.
    """
    if text is None:
        text = os.environ.get("TF_CONFIG", "")
    if not text.strip():
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"Invalid TF_CONFIG: not valid JSON ({e}). Received: {text!r}"
        ) from None
    if not isinstance(config, dict):
        raise ValueError(f"Invalid TF_CONFIG: expected a JSON object. Received: {text!r}")
    cluster = config.get("cluster")
    if not isinstance(cluster, dict) or not cluster:
        raise ValueError(
            "Invalid TF_CONFIG field `cluster`: expected an object mapping task "
            "types to lists of 'host:port' addresses, e.g. "
            '{"worker": ["localhost:12345", "localhost:23456"]}. '
            f"Received: cluster={cluster!r}"
        )
    for task_type, addresses in cluster.items():
        if task_type not in _TASK_TYPES:
            raise ValueError(
                f"Invalid TF_CONFIG field `cluster.{task_type}`: unknown task type. "
                f"Expected one of {', '.join(_TASK_TYPES)}."
            )
        if not isinstance(addresses, list) or not addresses:
            raise ValueError(
                f"Invalid TF_CONFIG field `cluster.{task_type}`: expected a non-empty "
                f"list of 'host:port' strings. Received: {addresses!r}"
            )
        for address in addresses:
            host, sep, port = str(address).rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(
                    f"Invalid TF_CONFIG field `cluster.{task_type}`: {address!r} is "
                    "not a 'host:port' address."
                )
    task = config.get("task")
    if not isinstance(task, dict):
        raise ValueError(
            "Invalid TF_CONFIG field `task`: expected an object like "
            f'{{"type": "worker", "index": 0}}. Received: task={task!r}'
        )
    task_type, index = task.get("type"), task.get("index")
    if task_type not in cluster:
        raise ValueError(
            f"Invalid TF_CONFIG field `task.type`: {task_type!r} is not a task type "
            f"of `cluster` ({', '.join(cluster)})."
        )
    if isinstance(index, bool) or not isinstance(index, int) or not (
        0 <= index < len(cluster[task_type])
    ):
        raise ValueError(
            f"Invalid TF_CONFIG field `task.index`: expected an integer in "
            f"[0, {len(cluster[task_type])}) for task type {task_type!r}. "
            f"Received: index={index!r}"
        )
    return config


def _num_workers(config):
    if config is None:
        return 1
    return sum(len(config["cluster"].get(t, [])) for t in ("chief", "worker"))


def get_strategy(tpu=None, timeout_seconds=300):
    """Returns the `tf.distribute` strategy the environment asks for.

    Args:
        tpu: TPU name or address for `TPUClusterResolver`; `"local"` for a
            TPU VM. Defaults to the `TPU_NAME` environment variable, else no TPU.
        timeout_seconds: Bound on each collective operation of a multi-worker
            strategy, so a dead worker makes the others fail with an error
            instead of waiting forever. Defaults to `300`.

    Returns:
        A `tf.distribute.Strategy`. For multi-worker training the Keras fixes
        of `enable_multi_worker_fixes()` are switched on.

    Raises:
        ValueError: If `TF_CONFIG` is malformed or `timeout_seconds` is not
            positive.
    """
    if not timeout_seconds or timeout_seconds <= 0:
        raise ValueError(
            "Invalid value for argument `timeout_seconds`. Expected a positive "
            f"number. Received: timeout_seconds={timeout_seconds!r}"
        )
    tpu = tpu or os.environ.get("TPU_NAME")
    if tpu:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    config = parse_tf_config()
    if _num_workers(config) > 1:
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
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is not None and resolver.cluster_spec().as_dict():
        cluster = resolver.cluster_spec().as_dict()
        return resolver.task_type, resolver.task_id, "chief" in cluster
    config = parse_tf_config()
    if _num_workers(config) <= 1:
        return None
    task = config["task"]
    return task["type"], task["index"], "chief" in config["cluster"]


def is_chief(strategy=None):
    """Whether this process should write checkpoints, logs and plots.

    True outside multi-worker training; under it, true for the `chief` task,
    or for worker 0 when the cluster has no chief.

    Args:
        strategy: The strategy in use. Defaults to the current one; outside
            any scope, `TF_CONFIG` tells.
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
        path: File or folder the chief writes.
        strategy: The strategy in use. Defaults to the current one; outside
            any scope, `TF_CONFIG` tells.
    """
    if path is None or is_chief(strategy):
        return path
    task_type, task_id, _ = _task(strategy)
    return os.path.join(
        tempfile.gettempdir(),
        "keras_stability_workers",
        f"{task_type}_{task_id}",
        os.path.basename(os.path.normpath(path)),
    )
