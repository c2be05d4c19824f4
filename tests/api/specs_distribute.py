"""Argument cases for distribute (see `tests/api/arguments.py`)."""

import json

import tensorflow as tf

from keras_stability import distribute
from tests.api.arguments import Case

_TF_CONFIG = {
    "cluster": {"chief": ["host0:2222"], "worker": ["host1:2222", "host2:2222"]},
    "task": {"type": "worker", "index": 1},
}


def _tf_config(**overrides):
    return json.dumps({**_TF_CONFIG, **overrides})


CASES = [
    Case(
        distribute.BackupAndRestore,
        kwargs={"backup_dir": "/tmp/keras_stability_api_case_backup"},
        bad={
            "backup_dir": ["", 123, None, ["a"]],
            "save_freq": [0, -1, 2.5, True, False, None, "batch", "Epoch"],
            "on_corrupt": ["ignore", None, True],
        },
        good={"save_freq": [123]},
        config=True,
    ),
    Case(
        distribute.parse_tf_config,
        kwargs={"text": _tf_config()},
        bad={
            "text": [
                123,
                b"{}",
                ["a"],
                "{nope",
                "[1]",
                _tf_config(cluster={"chief": ["a:1", "b:2"]}),
                _tf_config(cluster={"worker": ["localhost:99999999"]}),
                _tf_config(cluster={"worker": ["localhost:0"]}),
                _tf_config(cluster={"worker": ["localhost"]}),
                _tf_config(cluster={"boss": ["a:1"]}),
                _tf_config(cluster={"worker": ["a:1", "a:1"]}),
                _tf_config(task={"type": "ps", "index": 0}),
                _tf_config(task={"type": "worker", "index": 2}),
                _tf_config(task={"type": "worker", "index": True}),
                _tf_config(task=None),
            ]
        },
        good={"text": [None, "", "  "]},
    ),
    Case(
        distribute.get_strategy,
        bad={
            "tpu": [123, "", ["a"], True],
            "timeout_seconds": [0, -1, None, "300", 1e400, float("-inf")],
        },
        good={"timeout_seconds": [2.5]},
    ),
    Case(
        distribute.is_chief,
        bad={"strategy": [123, "mirrored", tf.distribute.MirroredStrategy]},
    ),
    Case(
        distribute.chief_path,
        kwargs={"path": "/tmp/keras_stability_api_case/logs"},
        bad={
            "path": [123, "", ["a"], True],
            "strategy": [123, "mirrored"],
        },
    ),
]
EXEMPT = {
    "distribute.CorruptBackupError": "an exception class: raised, not called",
    "distribute.enable_multi_worker_fixes": "takes no argument",
    "distribute.disable_multi_worker_fixes": "takes no argument",
    "distribute.multi_worker_fixes_enabled": "takes no argument",
}
