"""Tests of the test helpers themselves."""

import os
import signal
import sys
import time

import keras
import numpy as np
import pytest

from tests import helpers
from tests.helpers import run_in_subprocess
from tests.helpers import run_layer_test


def _count_devices():
    import tensorflow as tf

    return len(tf.config.list_logical_devices("CPU"))


def _mirrored_sum():
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy()
    value = strategy.run(
        lambda: (
            tf.cast(
                tf.distribute.get_replica_context().replica_id_in_sync_group, tf.float32
            )
            + 1.0
        )
    )
    return strategy.num_replicas_in_sync, float(
        strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
    )


def _raise():
    raise RuntimeError("boom in child")


def _echo(a, b=0):
    return {"sum": a + b, "devices": _count_devices()}


def _child_state():
    return {
        "ppid": os.getppid(),
        "draw": float(np.random.random_sample()),
        "tf_config": os.environ.get("TF_CONFIG"),
        "marker": os.environ.get("KERAS_STABILITY_TEST_MARKER"),
        "keras_stability_imported": "keras_stability" in sys.modules,
        "cwd": os.getcwd(),
    }


def _sleep(seconds):
    time.sleep(seconds)


def _kill_myself():
    os.kill(os.getpid(), signal.SIGKILL)


def _devices_and_mirrored_sum():
    return _count_devices(), _mirrored_sum()


@pytest.mark.distributed
def test_two_cpu_devices_fixture(two_cpu_devices):
    # One child for both (each child costs a TensorFlow start-up).
    assert two_cpu_devices(_devices_and_mirrored_sum) == (2, (2, 3.0))


def test_subprocess_passes_arguments_and_reports_errors():
    assert run_in_subprocess(_echo, 2, b=3, n_cpu_devices=1) == {"sum": 5, "devices": 1}
    with pytest.raises(AssertionError, match="boom in child"):
        run_in_subprocess(_raise, n_cpu_devices=1)
    with pytest.raises(ValueError, match="module-level function"):
        run_in_subprocess(lambda: 1)


def test_children_fork_from_the_warm_process_as_a_new_interpreter_would_start():
    if os.environ.get("KERAS_STABILITY_TEST_NO_FORK") == "1":
        pytest.skip("forking is switched off for this run")
    first = run_in_subprocess(_child_state, n_cpu_devices=1)
    second = run_in_subprocess(
        _child_state, n_cpu_devices=1, env={"TF_CONFIG": '{"cluster": {}}'}
    )
    # Both forked from the zygote (TensorFlow and Keras imported, nothing of
    # ours), each with its own seeds and the environment it was given.
    zygote = helpers._ZYGOTE._proc.pid
    assert first["ppid"] == second["ppid"] == zygote != os.getpid()
    assert first["draw"] != second["draw"]
    assert first["tf_config"] is None and second["tf_config"] == '{"cluster": {}}'
    assert not first["keras_stability_imported"]
    assert first["cwd"] == helpers.REPO_ROOT
    # A variable read at import time may change what the import did: such a
    # child starts as a new interpreter.
    fresh = run_in_subprocess(
        _child_state, n_cpu_devices=1, env={"KERAS_STABILITY_TEST_MARKER": "x"}
    )
    assert fresh["ppid"] == os.getpid() and fresh["marker"] == "x"


def test_a_forked_child_killed_or_too_slow_is_reported():
    with pytest.raises(AssertionError, match="died with exit code -9"):
        run_in_subprocess(_kill_myself, n_cpu_devices=1)
    start = time.monotonic()
    with pytest.raises(AssertionError, match="did not finish in 1 s"):
        run_in_subprocess(_sleep, 60, n_cpu_devices=1, timeout=1)
    assert time.monotonic() - start < 30


def test_run_layer_test_passes_a_correct_layer(tmp_path):
    out = run_layer_test(
        keras.layers.Dense,
        {"units": 3, "kernel_regularizer": "l2"},
        input_shape=(4, 5),
        expected_output_shape=(4, 3),
        expected_num_trainable_weights=2,
        expected_num_non_trainable_weights=0,
        expected_num_losses=1,
        fresh_process=True,
        tmp_dir=tmp_path,
    )
    assert np.isfinite(out["history"].history["loss"][0])


def test_run_layer_test_catches_wrong_counts_and_shapes():
    with pytest.raises(AssertionError, match="trainable weights"):
        run_layer_test(
            keras.layers.Dense, {"units": 3}, (4, 5), expected_num_trainable_weights=1
        )
    with pytest.raises(AssertionError, match="output shape"):
        run_layer_test(
            keras.layers.Dense, {"units": 3}, (4, 5), expected_output_shape=(4, 2)
        )


@keras.saving.register_keras_serializable(package="keras_stability_tests")
class _ForgetfulScale(keras.layers.Layer):
    """Its config omits `factor`: loading gives another layer."""

    def __init__(self, factor=1.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor

    def get_config(self):
        return super().get_config()


@keras.saving.register_keras_serializable(package="keras_stability_tests")
class _DriftingScale(keras.layers.Layer):
    """Each `from_config` doubles `factor`: the config does not round-trip."""

    def __init__(self, factor=1.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor * 2}


class _UnregisteredScale(keras.layers.Layer):
    """Round-trips its config but is not registered: loading must fail."""

    def __init__(self, factor=1.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


def test_run_layer_test_catches_broken_config():
    with pytest.raises(AssertionError, match="round-trip"):
        run_layer_test(_DriftingScale, {"factor": 2.0}, (2, 3), run_training=False)
    with pytest.raises(AssertionError, match="predictions differ"):
        run_layer_test(_ForgetfulScale, {"factor": 2.0}, (2, 3), run_training=False)


def test_run_layer_test_catches_unloadable_layer():
    with pytest.raises(Exception, match="_UnregisteredScale"):
        run_layer_test(_UnregisteredScale, {"factor": 2.0}, (2, 3), run_training=False)
