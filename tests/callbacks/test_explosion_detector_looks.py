"""The detector's in-graph record, its looks every `check_every` steps and the trip flag."""

import math
import warnings

import keras
import numpy as np
import pytest

from keras_stability.callbacks import GradientExplosionDetector
from keras_stability.callbacks import explosion_detector
from keras_stability.callbacks import raw_loss
from keras_stability.callbacks import step_record
from keras_stability.datasets import make_classification


def _model(optimizer, seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


def _fit(model, x, y, callbacks, epochs=1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(
            x,
            y,
            batch_size=16,
            epochs=epochs,
            shuffle=False,
            verbose=0,
            callbacks=callbacks,
        )


def test_steady_state_reads_nothing_between_looks(monkeypatch):
    x, y = make_classification(n_samples=640, seed=0)  # 40 batches of 16
    model = _model(keras.optimizers.Adam(1e-3))
    detector = GradientExplosionDetector(check_every=10)
    _fit(model, x, y, [detector])  # traces and attaches

    takes, scalars, raw_updates = [], [], []
    take = step_record.StepRecord.take
    read_scalar = step_record.read_scalar
    update = raw_loss.RawLossTracker.update

    def counted_take(record):
        takes.append(detector.step)
        return take(record)

    def counted_read(variable):
        scalars.append(variable.name)
        return read_scalar(variable)

    def counted_update(tracker, *args, **kwargs):
        raw_updates.append(1)
        return update(tracker, *args, **kwargs)

    monkeypatch.setattr(step_record.StepRecord, "take", counted_take)
    # Every host read of a scalar, the detector's and the record's.
    monkeypatch.setattr(explosion_detector, "read_scalar", counted_read)
    monkeypatch.setattr(step_record, "read_scalar", counted_read)
    monkeypatch.setattr(raw_loss.RawLossTracker, "update", counted_update)
    history = _fit(model, x, y, [detector])
    # The first step is looked at alone (the loss source is decided there),
    # then every 10 steps: 1 + 4 looks for 40 steps, each one read of the
    # buffer (and its counter); no other host read, no raw-loss update but
    # the first step's.
    assert takes == [0, 1, 10, 20, 30]
    assert scalars == ["detector_written"] * 5
    assert len(raw_updates) == 1
    assert detector.step == 40 and len(detector.raw_losses) == 40
    assert history.history["rollbacks"] == [0] and detector.events == []


def test_looks_every_ten_steps_judge_the_same_steps_as_every_step():
    x, y = make_classification(n_samples=480, seed=1)  # 30 batches of 16
    runs = []
    for check_every in (1, 10):
        model = _model(keras.optimizers.SGD(0.1))
        detector = GradientExplosionDetector(check_every=check_every, snapshot_freq=10)
        history = _fit(model, x, y, [detector], epochs=2)
        runs.append((model, detector, history))
    (m1, d1, h1), (m10, d10, h10) = runs
    # Same raw losses and norms, step by step, in the same order.
    assert len(d1.raw_losses) == len(d10.raw_losses) == 60
    np.testing.assert_allclose(d10.raw_losses, d1.raw_losses, rtol=1e-6)
    np.testing.assert_allclose(d10.grad_norms, d1.grad_norms, rtol=1e-6)
    np.testing.assert_allclose(h10.history["loss"], h1.history["loss"], rtol=1e-6)
    for a, b in zip(m10.get_weights(), m1.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert d10.events == d1.events == []
    # Snapshot steps are multiples of 10 either way (the looks are aligned).
    assert d10.snapshot.step == d1.snapshot.step and d10.snapshot.step % 10 == 0
    assert d10.snapshot.score == pytest.approx(d1.snapshot.score, rel=1e-6)


def test_a_nan_burst_between_two_looks_never_reaches_the_weights():
    # Batches 3-7 (steps 4-8) are NaN; the look after step 10 is the first
    # to see them. The 4th non-finite step in a row (step 7) raises the
    # guard's trip flag in-graph: steps 8-10 are held back (step 9, finite,
    # too), so the weights stay those of step 3 until the host has looked.
    # (Without the trip, steps 9 and 10 would be applied.)
    x, y = make_classification(n_samples=320, seed=0)  # 20 batches of 16
    x = x.copy()
    x[3 * 16 : 8 * 16] = np.nan
    model = _model(keras.optimizers.SGD(0.1))

    class Weights(keras.callbacks.Callback):
        seen = []

        def on_train_batch_end(self, batch, logs=None):
            self.seen.append([np.array(w) for w in self.model.get_weights()])

    weights = Weights()
    detector = GradientExplosionDetector(check_every=10, snapshot_freq=10)
    # Weights first: it sees the weights before the detector's look.
    _fit(model, x, y, [weights, detector])
    for step in range(3, 9):  # after steps 4..9 (0-based batches 3..8)
        for a, b in zip(weights.seen[step], weights.seen[2], strict=True):
            np.testing.assert_array_equal(a, b)
    # At the look, the problem (step 7) is compared: the snapshot and the
    # held weights score the next 5 batches (steps 11-15) alike, so the
    # NaNs were the data's and nothing is rolled back.
    assert detector.rollbacks == 0 and detector.rollbacks_declined == 1
    (event,) = [e for e in detector.events if e["kind"] == "problem"]
    assert event["step"] == 7 and "4 non-finite steps in a row" in event["detail"]
    assert event["action"] == "compare"
    # Steps 4-8 non-finite, 9-10 held by the trip.
    assert detector.step == 20
    guard = model.optimizer
    assert int(guard.steps_skipped_nonfinite.numpy()) == 5
    assert int(guard.steps_skipped_requested.numpy()) == 2
    assert detector.skipped_nonfinite == 5 and detector.skipped_requested == 2
    assert detector.skipped_batches == 7
    # The trip is cleared by the look and off after `fit`.
    assert int(guard.tripped.numpy()) == 0
    assert int(guard._loss_record.trip_limit.numpy()) == -1
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


def test_check_every_in_config():
    detector = GradientExplosionDetector(check_every=7)
    assert detector.get_config()["check_every"] == 7
    assert GradientExplosionDetector.from_config(detector.get_config()).check_every == 7
    with pytest.raises(ValueError) as info:
        GradientExplosionDetector(check_every=0)
    assert str(info.value) == (
        "Invalid value for argument `check_every`. Expected a positive integer. "
        "Received: check_every=0"
    )


def test_epoch_loss_leaves_out_skipped_steps_in_graph():
    x, y = make_classification(n_samples=160, seed=0)  # 10 batches
    x = x.copy()
    x[2 * 16 + 1] = np.nan  # batch 2: NaN gradients, skipped
    model = _model(keras.optimizers.SGD(0.05))
    detector = GradientExplosionDetector(check_every=10)
    history = _fit(model, x, y, [detector])
    assert detector.skipped_batches == 1
    assert [e["step"] for e in detector.events] == [3]
    assert math.isnan(detector.grad_norms[2])
    # (Its loss may be finite in the compiled step: ReLU maps NaN to 0.)
    losses = [v for i, v in enumerate(detector.raw_losses) if i != 2]
    assert all(math.isfinite(v) for v in losses)
    assert history.history["loss"][0] == pytest.approx(np.mean(losses), rel=1e-5)


def test_a_lone_nan_batch_between_looks_holds_back_no_healthy_batch():
    # One batch of NaN inputs per epoch: its loss and gradients are NaN, the
    # guard skips it in-graph, and nothing else needs the host. The trip
    # used to rise at any non-finite loss and hold back the healthy batches
    # after it until the next look (21 of 57 updates lost here).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(640, 10)).astype("float32")
    y = np.argmax(x @ rng.normal(size=(10, 5)), axis=1)
    bad = np.zeros(len(x), bool)
    bad[64:96] = True  # batch 2 of each epoch
    x_nan = np.where(bad[:, None], np.nan, x).astype("float32")

    def fit(xs, ys, callbacks=()):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((10,)),
                keras.layers.Dense(32, activation="tanh"),
                keras.layers.Dense(5),
            ]
        )
        model.compile(
            "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        model.fit(xs, ys, epochs=3, shuffle=False, verbose=0, callbacks=callbacks)
        return model

    plain = fit(x[~bad], y[~bad])  # the good batches alone
    detector = GradientExplosionDetector(check_every=10)
    model = fit(x_nan, y, [detector])
    assert detector.skipped_nonfinite == 3 and detector.skipped_requested == 0
    assert detector.rollbacks == 0 and detector.stopped_reason is None
    assert int(model.optimizer.inner_optimizer.iterations.numpy()) == 57
    for a, b in zip(model.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
