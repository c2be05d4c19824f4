"""Our values reach every callback's logs, whatever the order, and counts print as integers."""

import csv
import gc
import os
import re

import keras
import numpy as np
import pytest

from keras_stability.callbacks import ActivationMonitor
from keras_stability.callbacks import AdaptiveClipping
from keras_stability.callbacks import GradientExplosionDetector
from keras_stability.callbacks import GradientMonitor
from keras_stability.callbacks import GradualUnfreezing
from keras_stability.callbacks import WeightDecayScheduler
from keras_stability.clipping import ZClip
from keras_stability.datasets import load_dataset
from keras_stability.datasets import make_classification


def _model(optimizer=None, cls=keras.Sequential):
    keras.utils.set_random_seed(0)
    model = cls(
        [
            keras.Input((10,)),
            keras.layers.Dense(16, activation="relu", name="hidden"),
            keras.layers.Dense(10, name="head"),
        ]
    )
    model.compile(
        optimizer or keras.optimizers.SGD(0.05),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


class _BatchLogs(keras.callbacks.Callback):
    """Placed first: records the batch logs it is given."""

    def __init__(self):
        super().__init__()
        self.logs = []

    def on_train_batch_end(self, batch, logs=None):
        self.logs.append(dict(logs))


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_csv_logger_placed_first_has_our_columns_with_their_values(tmp_path):
    x, y = make_classification(n_samples=96, seed=0)  # 6 batches of 16
    x = x.copy()
    x[40] = np.nan  # batch 3 of each epoch: skipped
    model = _model()
    path = os.path.join(tmp_path, "log.csv")
    first = _BatchLogs()
    monitor = GradientMonitor(read_freq=4)
    detector = GradientExplosionDetector()
    history = model.fit(
        x,
        y,
        batch_size=16,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[
            first,
            keras.callbacks.CSVLogger(path),
            AdaptiveClipping(ZClip(warmup_steps=2)),
            monitor,
            detector,
        ],
    )
    rows = _rows(path)
    ours = (
        "raw_loss",
        "rollbacks",
        "skipped_batches",
        "grad_norm",
        "clip_threshold",
        "steps_clipped",
        "steps_skipped",
        "min_layer_grad_ratio",
    )
    for key in ours:
        assert [float(r[key]) for r in rows] == pytest.approx(history.history[key]), key
    assert [float(r["skipped_batches"]) for r in rows] == [1.0, 2.0]
    assert [float(r["steps_skipped"]) for r in rows] == [1.0, 2.0]
    assert [float(r["rollbacks"]) for r in rows] == [0.0, 0.0]
    assert float(rows[1]["raw_loss"]) == pytest.approx(detector.raw_losses[-1])
    assert float(rows[1]["grad_norm"]) == pytest.approx(
        float(model.optimizer.grad_norm)
    )
    assert float(rows[1]["min_layer_grad_ratio"]) > 0
    # The epoch loss leaves the skipped batch out, for the CSV too.
    assert [float(r["loss"]) for r in rows] == pytest.approx(history.history["loss"])
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    # Batch logs, seen first: every step's own values.
    assert len(first.logs) == 12
    np.testing.assert_array_equal(
        [b["raw_loss"] for b in first.logs], detector.raw_losses
    )
    np.testing.assert_array_equal(monitor.raw_losses, detector.raw_losses)
    assert [b["skipped_batches"] for b in first.logs] == [
        0,
        0,
        1,
        1,
        1,
        1,
        1,
        1,
        2,
        2,
        2,
        2,
    ]
    assert [b["steps_clipped"] for b in first.logs][-1] == float(
        model.optimizer.steps_clipped
    )


def _wd_schedule(epoch, weight_decay):
    return 0.01 * (epoch + 1)


def test_epoch_values_reach_a_csv_logger_placed_first(tmp_path):
    x, y = make_classification(n_samples=64, seed=1)
    backbone = keras.Sequential(
        [keras.Input((10,)), keras.layers.Dense(8, activation="relu")]
    )
    backbone.layers[0].trainable = False
    keras.utils.set_random_seed(0)
    model = keras.Sequential([backbone, keras.layers.Dense(10)])
    model.compile(
        keras.optimizers.AdamW(1e-3, weight_decay=0.0),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    path = os.path.join(tmp_path, "log.csv")
    history = model.fit(
        x,
        y,
        batch_size=16,
        epochs=2,
        verbose=0,
        callbacks=[
            keras.callbacks.CSVLogger(path),
            GradualUnfreezing(1, layers=backbone.layers),
            WeightDecayScheduler(_wd_schedule),
        ],
    )
    rows = _rows(path)
    assert [float(r["unfrozen_layers"]) for r in rows] == [0.0, 1.0]
    assert [float(r["weight_decay"]) for r in rows] == pytest.approx([0.01, 0.02])
    assert history.history["unfrozen_layers"] == [0, 1]

    functional = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(8, activation="relu", name="relu_dense"),
        ]
    )
    functional.compile("sgd", "mse")
    path = os.path.join(tmp_path, "activations.csv")
    monitor = ActivationMonitor(x[:16], log_fractions=True)
    functional.fit(
        x,
        np.zeros((64, 8)),
        batch_size=16,
        epochs=1,
        verbose=0,
        callbacks=[keras.callbacks.CSVLogger(path), monitor],
    )
    (row,) = _rows(path)
    assert (
        float(row["dead_fraction/relu_dense"])
        == monitor.report["relu_dense"]["fraction"]
    )


def test_progress_bar_prints_counts_as_integers(capsys):
    x, y = make_classification(n_samples=48, seed=0)
    x = x.copy()
    x[20] = np.nan  # one skipped step
    model = _model()
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=1,
        shuffle=False,
        verbose=1,
        callbacks=[
            AdaptiveClipping(ZClip(warmup_steps=1)),
            GradientExplosionDetector(),
        ],
    )
    out = capsys.readouterr().out
    final = out.replace("\r", "\n").splitlines()[-1]
    assert re.search(r" - rollbacks: 0( |$)", final), final
    assert re.search(r" - skipped_batches: 1( |$)", final), final
    assert re.search(r" - steps_skipped: 1( |$)", final), final
    assert re.search(r" - steps_clipped: \d+( |$)", final), final
    assert re.search(r" - raw_loss: \d+\.\d{4}", final), final  # a float stays a float
    assert "e+00" not in final


def test_hooks_are_removed_after_fit():
    x, y = make_classification(n_samples=32, seed=0)
    model = _model()
    monitor = GradientMonitor()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    assert "make_train_function" not in vars(model)  # unwrapped
    steps = len(monitor.raw_losses)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert len(monitor.raw_losses) == steps  # the monitor's hook no longer runs


def _step_parts(model):
    """(observers on the guard, owners' sets of in-graph values)."""
    sets = model.__dict__["_keras_stability_step_logs"].__dict__["_graph_sets"]
    return len(model.optimizer.observers), len(sets)


def test_a_new_fit_with_new_callbacks_drops_the_earlier_instances():
    # `callbacks=[GradientMonitor(), ...]` written in the `fit` call makes new
    # instances each time. Before, each `fit` added their observers and
    # values to the step beside the earlier ones' (computed for nobody,
    # saved with the optimizer): 8 observers after 4 fits.
    x, y = make_classification(256, seed=0)
    model = _model()
    parts = []
    for _ in range(4):
        model.fit(
            x,
            y,
            batch_size=32,
            epochs=1,
            verbose=0,
            callbacks=[
                GradientMonitor(),
                GradientExplosionDetector(),
                AdaptiveClipping(ZClip()),
            ],
        )
        parts.append((*_step_parts(model), len(model.optimizer.variables)))
    # The monitor's and the detector's observers; the detector's and the
    # clipping's sets; the optimizer's variables do not grow.
    assert parts == [parts[0]] * 4 and parts[0][:2] == (2, 2)
    # The same instances again: kept, and the step is not traced again.
    callbacks = [GradientMonitor(), GradientExplosionDetector()]
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=callbacks)
    assert _step_parts(model) == (2, 1)
    function = model.train_function
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=callbacks)
    assert model.train_function is function
    assert _step_parts(model) == (2, 1)
    # An instance dropped by a later `fit` works when given again.
    monitor = callbacks[0]
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[GradientMonitor()])
    assert _step_parts(model) == (1, 0)
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[monitor])
    assert _step_parts(model) == (1, 0)
    assert len(monitor.history["step"]) > 0 and "raw_loss" in history.history


class CountingTraces(keras.Sequential):
    """Counts the traces of its train step (Python runs only when tracing)."""

    traces = 0

    def train_step(self, data):
        type(self).traces += 1
        return super().train_step(data)


def test_a_new_instance_of_the_same_configuration_takes_over_without_a_retrace():
    # `callbacks=[GradientMonitor(), ...]` written in the `fit` call (a
    # notebook cell run again): the earlier instances are gone by the next
    # `fit`. Before, their observers and values were dropped and the new
    # ones' added, so every such `fit` traced the step again (seconds on a
    # transformer), where plain Keras does not.
    x, y = make_classification(256, seed=0)
    model = _model(cls=CountingTraces)

    def callbacks(check_freq=1):
        return [
            GradientMonitor(check_freq=check_freq),
            GradientExplosionDetector(),
            AdaptiveClipping(ZClip()),
        ]

    traces, parts, histories = [], [], []
    for _ in range(3):
        CountingTraces.traces = 0
        made = callbacks()
        history = model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=made)
        traces.append(CountingTraces.traces)
        parts.append(_step_parts(model))
        histories.append((history.history, len(made[0].history["step"])))
        del made
        gc.collect()
    assert traces[0] > 0 and traces[1:] == [0, 0]
    assert parts == [(2, 2)] * 3
    # The new instances work: the step's values reach the logs, the new
    # monitor reads its (taken over) observer.
    for logs, monitor_rows in histories:
        assert np.isfinite(logs["grad_norm"][0]) and np.isfinite(logs["raw_loss"][0])
        assert monitor_rows == 8
    # Another configuration is not taken over: the step is traced again,
    # with still one observer and one set each.
    CountingTraces.traces = 0
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=callbacks(5))
    assert CountingTraces.traces > 0 and _step_parts(model) == (2, 2)
    # An earlier instance still alive gives its state up: detaching it
    # later leaves the new instance's observer on the guard.
    first = callbacks(5)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=first)
    second = callbacks(5)
    CountingTraces.traces = 0
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=second)
    assert CountingTraces.traces == 0
    assert first[0].detach() is False and first[1].detach() is False
    assert _step_parts(model) == (2, 2)
    assert second[0].detach() is True and _step_parts(model) == (1, 2)


class _LoggedLosses(keras.callbacks.Callback):
    """Records `(epoch, batch, loss)` of every batch log."""

    def on_train_begin(self, logs=None):
        self.losses, self.raw = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append((self.epoch, batch, float(logs["loss"])))
        self.raw.append(float(logs["raw_loss"]))


@pytest.mark.parametrize("bad", ["inputs", "sample_weight"])
@pytest.mark.parametrize(
    "make", [GradientExplosionDetector, GradientMonitor], ids=["detector", "monitor"]
)
def test_a_skipped_first_batch_of_an_epoch_does_not_set_off_terminate_on_nan(make, bad):
    # The first batch of every epoch is corrupt (shuffle=False): its update
    # is skipped (non-finite gradients) and leaves the epoch's mean empty.
    # Before, the batch log's `loss` was then NaN (no applied step produced
    # it) and TerminateOnNaN stopped the run at its first batch.
    x, y = make_classification(256, seed=0)
    sample_weight = np.ones(len(x), "float32")
    if bad == "inputs":
        x[:32] = np.nan
    else:
        sample_weight[:32] = np.nan
    model = _model()
    logged = _LoggedLosses()
    history = model.fit(
        x,
        y,
        sample_weight=sample_weight,
        batch_size=32,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[make(), logged, keras.callbacks.TerminateOnNaN()],
    )
    assert len(history.history["loss"]) == 2
    assert np.isfinite(history.history["loss"]).all()
    assert len(logged.losses) == 16
    # The skipped batch's log: its own loss when finite (NaN inputs through
    # a ReLU give uniform logits, ln 10), else 0.0, Keras' mean of no value
    # (NaN sample weights give a NaN loss).
    for i in (0, 8):
        raw = logged.raw[i]
        assert logged.losses[i][1] == 0
        assert logged.losses[i][2] == pytest.approx(raw if np.isfinite(raw) else 0.0)
    assert np.isfinite(logged.raw[0]) == (bad == "inputs")
    assert all(np.isfinite(loss) for _, _, loss in logged.losses)
    # The epoch's loss is the mean over the 7 applied batches alone.
    assert history.history["loss"][0] == pytest.approx(logged.losses[7][2], rel=1e-6)


def test_a_rollback_at_an_epochs_first_batches_logs_no_nan():
    # Adam(50) diverges: the detector rolls back at batches where the
    # epoch's mean is left empty (the rewind), and skips the next updates.
    # Before, those batch logs held `loss=nan` (the raw losses were finite,
    # 265-586) and TerminateOnNaN stopped the rescue.
    (x, y), _ = load_dataset("synthetic")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        keras.optimizers.Adam(50.0),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    detector = GradientExplosionDetector()
    logged = _LoggedLosses()
    history = model.fit(
        x,
        y,
        batch_size=32,
        epochs=3,
        verbose=0,
        callbacks=[detector, logged, keras.callbacks.TerminateOnNaN()],
    )
    assert detector.rollbacks >= 1
    assert len(history.history["loss"]) == 3
    assert all(np.isfinite(loss) for _, _, loss in logged.losses)


def test_owner_keys_are_never_reused_when_an_id_is():
    # Keyed by `id`, a new callback whose `id` was a dead one's took over
    # that one's entries: under load (the cyclic garbage collector late) a
    # new detector took a dead monitor's observer list, which was then left
    # on the guard for nobody ((3, 2) parts in the test above, 1 run in 6
    # under `-n 2`).
    from keras_stability.callbacks.step_logs import _owner_key

    class Owner:
        pass

    reused = 0
    for _ in range(100):
        old = Owner()
        old_key, address = _owner_key(old), id(old)
        del old
        new = Owner()
        if id(new) == address:
            reused += 1
            assert _owner_key(new) != old_key
        assert _owner_key(new) == _owner_key(new)
    assert reused > 0  # CPython hands the freed block to the next object
