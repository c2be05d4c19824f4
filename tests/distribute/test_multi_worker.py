"""`model.fit` under MultiWorkerMirroredStrategy: 2 worker processes on loopback."""

import functools
import os
import time
import traceback

import numpy as np
import pytest

from tests.helpers import run_in_subprocess
from tests.helpers import run_side_by_side
from tests.helpers import run_workers

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

GLOBAL_BATCH = 16


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 10)).astype("float32")
    y = (np.arange(64) % 10).astype("int32")
    return x, y


def _build(strategy):
    import keras

    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((10,)),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dense(10),
            ]
        )
        model.compile(
            keras.optimizers.SGD(0.1),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    return model


def _dataset():
    import tensorflow as tf

    x, y = _data()
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .batch(GLOBAL_BATCH)
        .with_options(options)
    )


class _DieAtEpoch:
    """Kills this worker process at the start of `epoch` (a simulated crash)."""

    def __new__(cls, epoch):
        import keras

        class Die(keras.callbacks.Callback):
            def on_epoch_begin(self, e, logs=None):
                if e == epoch:
                    os._exit(3)

        return Die()


def _diverging_fit(strategy):
    """A run the detector must act on: a 6-layer ReLU MLP at SGD(10).

    The same model, data and detector as the one-machine check of
    `tests/callbacks/distributed_cases.py` (rollback case), under `strategy`.
    """
    import warnings

    import keras
    import tensorflow as tf

    from keras_stability.callbacks import GradientExplosionDetector
    from keras_stability.datasets import make_classification

    x, y = make_classification(n_samples=256, seed=0)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((10,))]
            + [keras.layers.Dense(32, activation="relu") for _ in range(6)]
            + [keras.layers.Dense(10)]
        )
        model.compile(
            keras.optimizers.SGD(10.0),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).with_options(options)
    detector = GradientExplosionDetector(
        snapshot_freq=5, lr_factor=0.05, skip_batches=2, verbose=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(data, epochs=1, verbose=0, callbacks=[detector])
    weights = [np.asarray(w) for w in model.get_weights()]
    return {
        "events": [(e["step"], e["kind"], e.get("action")) for e in detector.events],
        "rollbacks": detector.rollbacks,
        "skipped": detector.skipped_batches,
        "learning_rate": float(np.asarray(model.optimizer.learning_rate)),
        "weights": weights,
        "finite": all(np.all(np.isfinite(w)) for w in weights),
    }


def fit_worker(
    epochs=3,
    backup_dir=None,
    die_at_epoch=None,
    timeout_seconds=300,
    log_dir=None,
    diverging=False,
):
    import tensorflow as tf

    import keras_stability.distribute as ksd
    from keras_stability import callbacks as ks_callbacks
    from keras_stability import clipping

    strategy = ksd.get_strategy(timeout_seconds=timeout_seconds)
    model = _build(strategy)
    callbacks = []
    if log_dir:
        monitor = ks_callbacks.GradientMonitor(check_freq=2, log_dir=log_dir, verbose=0)
        callbacks += [
            ks_callbacks.AdaptiveClipping(clipping.ZClip(warmup_steps=2), verbose=0),
            monitor,
            ks_callbacks.GradientExplosionDetector(
                action="rollback", snapshot_freq=2, verbose=0
            ),
        ]
    if backup_dir:
        callbacks.append(ksd.BackupAndRestore(backup_dir))
    if (
        die_at_epoch is not None
        and os.environ.get("KERAS_STABILITY_WORKER_INDEX") == "1"
    ):
        callbacks.append(_DieAtEpoch(die_at_epoch))
    start = time.time()
    try:
        history = model.fit(_dataset(), epochs=epochs, verbose=0, callbacks=callbacks)
    except Exception as e:  # reported to the test: the surviving worker's error
        return {
            "error": f"{type(e).__name__}: {e}"[:500],
            "traceback": traceback.format_exc()[-3000:],
            "seconds": time.time() - start,
        }
    if log_dir:
        monitor.plot(os.path.join(log_dir, "heatmap.png"))
    extra = {"diverging": _diverging_fit(strategy)} if diverging else {}
    return {
        **extra,
        "strategy": type(strategy).__name__,
        "replicas": strategy.num_replicas_in_sync,
        "fixes": ksd.multi_worker_fixes_enabled(),
        "chief": ksd.is_chief(strategy),
        "weights": [np.asarray(w) for w in model.get_weights()],
        "loss": history.history["loss"],
        "epochs_run": len(history.history["loss"]),
        "evaluate": model.evaluate(_dataset(), verbose=0),
        "tf_keras_is_keras3": tf.keras.__version__.startswith("3."),
    }


@pytest.fixture(scope="module")
def cluster_and_single(tmp_path_factory):
    """2 workers and a single one fit alike; the workers then fit a diverging run."""
    tmp_path = tmp_path_factory.mktemp("multi_worker")
    log_dir = str(tmp_path / "logs")
    # The cluster and the single worker are independent: run side by side.
    workers, single = run_side_by_side(
        functools.partial(
            run_workers,
            fit_worker,
            n_workers=2,
            timeout=300,
            log_dir=log_dir,
            diverging=True,
        ),
        functools.partial(
            run_in_subprocess,
            fit_worker,
            n_cpu_devices=1,
            timeout=300,
            log_dir=str(tmp_path / "single"),
        ),
    )
    for w in workers:
        assert "error" not in w, w.get("traceback", w)
    return workers, single, log_dir


def test_two_workers_match_each_other_and_a_single_worker(cluster_and_single):
    # With the library's callbacks: clipping, gradient monitor with TensorBoard
    # logs and a plot, and the explosion detector.
    workers, single, log_dir = cluster_and_single
    assert single["strategy"] != "CollectiveAllReduceStrategy"
    for w in workers:
        assert "error" not in w, w.get("traceback", w)
        assert (
            w["strategy"] == "CollectiveAllReduceStrategy"
        )  # tf.distribute.MultiWorkerMirroredStrategy
        assert w["replicas"] == 2 and w["fixes"] and w["tf_keras_is_keras3"]
    assert [w["chief"] for w in workers] == [True, False]
    for a, b in zip(workers[0]["weights"], workers[1]["weights"], strict=True):
        np.testing.assert_array_equal(a, b)
    # Same global batches of 16: 8 per worker, gradients all-reduced.
    for a, b in zip(workers[0]["weights"], single["weights"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(workers[0]["weights"][0], _initial_kernel())
    np.testing.assert_allclose(workers[0]["loss"], single["loss"], rtol=1e-5)
    np.testing.assert_allclose(workers[0]["evaluate"], single["evaluate"], rtol=1e-5)
    # Only the chief wrote into the shared folder: one event file, one plot.
    written = sorted(
        os.path.relpath(os.path.join(d, f), log_dir)
        for d, _, files in os.walk(log_dir)
        for f in files
    )
    assert "heatmap.png" in written
    assert len([f for f in written if "tfevents" in f]) == 1, written


def test_two_workers_take_the_same_detector_decisions_on_a_diverging_run(
    cluster_and_single,
):
    # Each worker's detector reads the step's record on its own host and
    # acts on it there (rollback, lower rate, skipped batches): the record
    # keeps the first replica's values on every worker, so both take the
    # same decisions at the same steps and their weights stay identical.
    workers, _, _ = cluster_and_single
    first, second = (w["diverging"] for w in workers)
    assert first["rollbacks"] >= 1 and first["finite"]
    assert first["events"] == second["events"]
    assert (first["rollbacks"], first["skipped"], first["learning_rate"]) == (
        second["rollbacks"],
        second["skipped"],
        second["learning_rate"],
    )
    assert first["learning_rate"] < 10.0  # the rollback lowered it
    for a, b in zip(first["weights"], second["weights"], strict=True):
        np.testing.assert_array_equal(a, b)


def _initial_kernel():
    import tensorflow as tf

    return _build(tf.distribute.get_strategy()).get_weights()[0]


def test_dead_worker_fails_the_others_and_backup_resumes(tmp_path):
    backup = str(tmp_path / "backup")
    timeout_seconds = 20
    start = time.time()

    def crashed_cluster():
        with pytest.raises(AssertionError, match="died with exit code 3"):
            run_workers(
                fit_worker,
                n_workers=2,
                timeout=240,
                epochs=3,
                backup_dir=backup,
                die_at_epoch=2,
                timeout_seconds=timeout_seconds,
            )
        return time.time() - start

    # The uninterrupted reference needs no backup: it runs beside the crash.
    crash_seconds, uninterrupted = run_side_by_side(
        crashed_cluster,
        functools.partial(run_in_subprocess, fit_worker, n_cpu_devices=1, epochs=3),
    )
    assert crash_seconds < 200, "the surviving worker hung"
    assert os.path.isdir(backup)
    resumed = run_workers(
        fit_worker, n_workers=2, timeout=300, epochs=3, backup_dir=backup
    )
    for w in resumed:
        assert "error" not in w, w.get("traceback", w)
    # BackupAndRestore resumed after the 2 finished epochs: only epoch 3 ran.
    assert [w["epochs_run"] for w in resumed] == [1, 1]
    for a, b in zip(resumed[0]["weights"], uninterrupted["weights"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
