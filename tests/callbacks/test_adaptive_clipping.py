"""AdaptiveClipping: wraps the compiled optimizer and logs the statistics."""

import csv
import os
import re

import keras
import numpy as np
import pytest

from keras_stability.callbacks import AdaptiveClipping
from keras_stability.clipping import GlobalNorm
from keras_stability.clipping import SpikeSkipping
from keras_stability.clipping import ZClip
from keras_stability.optimizers import GuardedOptimizer


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = (10 * rng.normal(size=(32, 1))).astype("float32")
    return x, y


def _model(optimizer="adam"):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(4, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer, "mse")
    return model


def test_wraps_logs_and_reports(tmp_path, capsys):
    x, y = _data()
    model = _model()
    adam = model.optimizer
    csv_path = os.path.join(tmp_path, "log.csv")
    history = model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        verbose=0,
        callbacks=[
            AdaptiveClipping(GlobalNorm(0.05), verbose=1),
            keras.callbacks.CSVLogger(csv_path),
        ],
    )
    out = capsys.readouterr().out
    assert re.search(
        r"AdaptiveClipping: wrapped optimizer 'adam(_\d+)?' in Guarded", out
    )
    assert "GlobalNorm(max_norm=0.05)" in out
    optimizer = model.optimizer
    assert isinstance(optimizer, GuardedOptimizer) and optimizer.inner_optimizer is adam
    assert history.history["clip_threshold"] == pytest.approx([0.05, 0.05])
    # The epoch's logged value is the last step's pre-clip norm.
    assert history.history["grad_norm"][-1] == pytest.approx(float(optimizer.grad_norm))
    assert all(n > 0.05 for n in history.history["grad_norm"])
    assert optimizer.statistics()["steps_clipped"] == 8
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["grad_norm"]) == pytest.approx(
        history.history["grad_norm"][-1]
    )


def test_reused_across_fits_and_after_a_plain_fit(capsys):
    x, y = _data()
    model = _model()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # train_function traced
    callback = AdaptiveClipping(ZClip(warmup_steps=2), verbose=1)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])
    guarded = model.optimizer
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])
    assert capsys.readouterr().out.count("wrapped optimizer") == 1
    assert model.optimizer is guarded is callback.guard
    assert guarded.statistics()["step"] == 8
    assert int(guarded.iterations) == 12  # 4 plain steps + 8 guarded, none skipped
    assert "grad_norm" in history.history


def test_refuses_an_optimizer_that_clips():
    x, y = _data()
    model = _model(keras.optimizers.Adam(global_clipnorm=1.0))
    with pytest.raises(ValueError, match="global_clipnorm=1.0"):
        model.fit(
            x, y, epochs=1, verbose=0, callbacks=[AdaptiveClipping(GlobalNorm(1.0))]
        )


def test_mixed_precision_wraps_inside_loss_scale_optimizer():
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        x, y = _data()
        model = _model()
        model.fit(
            x,
            y,
            batch_size=8,
            epochs=1,
            verbose=0,
            callbacks=[AdaptiveClipping(GlobalNorm(1e6), verbose=0)],
        )
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    guarded = model.optimizer.inner_optimizer
    assert isinstance(guarded, GuardedOptimizer)
    # Unscaled: a loss scale of 32768 would put the norm far above 1e4.
    assert 0 < float(guarded.grad_norm) < 1e4
    # LossScaleOptimizer skips (and halves its scale) while float16 overflows;
    # every step it lets through reaches the guard, which applies it.
    stats = guarded.statistics()
    assert 1 <= stats["step"] == int(guarded.iterations) <= 4
    assert stats["steps_skipped_nonfinite"] == 0


def test_saved_model_reloads_with_the_wrapper(tmp_path):
    x, y = _data()
    model = _model()
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=1,
        verbose=0,
        callbacks=[AdaptiveClipping(ZClip(warmup_steps=2), verbose=0)],
    )
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.optimizer, GuardedOptimizer)
    assert loaded.optimizer.statistics() == model.optimizer.statistics()
    np.testing.assert_allclose(
        loaded.optimizer.clipping.mean.numpy(), model.optimizer.clipping.mean.numpy()
    )


def test_config_round_trip_and_bad_arguments():
    callback = AdaptiveClipping(
        ZClip(alpha=0.9),
        skip_spikes=SpikeSkipping(window=32),
        log_statistics=False,
        verbose=0,
    )
    config = callback.get_config()
    clone = AdaptiveClipping.from_config(config)
    assert clone.get_config() == config
    assert clone.clipping.alpha == 0.9 and clone.skip_spikes.window == 32
    with pytest.raises(ValueError, match="Invalid value for argument `clipping`"):
        AdaptiveClipping("zclip")
    with pytest.raises(ValueError, match="Invalid value for argument `verbose`"):
        AdaptiveClipping(GlobalNorm(1.0), verbose=3)
    with pytest.raises(ValueError, match="Invalid value for argument `log_statistics`"):
        AdaptiveClipping(GlobalNorm(1.0), log_statistics="False")
    with pytest.raises(ValueError, match="Invalid value for argument `clipping`"):
        AdaptiveClipping(clipping=-1.0)
    assert "policy" not in AdaptiveClipping(1.0).get_config()


def test_recompiled_with_a_plain_optimizer_logs_no_stale_statistics():
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    y = x.sum(1, keepdims=True)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    history = model.fit(
        x, y, epochs=1, verbose=0, callbacks=[AdaptiveClipping(ZClip())]
    )
    assert "grad_norm" in history.history
    model.compile(keras.optimizers.Adam(1e-2), "mse")  # no guard any more
    history = model.fit(x, y, epochs=1, verbose=0)
    assert set(history.history) == {"loss"}


def test_epoch_loss_is_the_mean_over_applied_steps():
    # A NaN batch (the 2nd of 4) is skipped; Keras' epoch loss used to be NaN
    # (setting off TerminateOnNaN). It is now the mean of the 3 applied
    # steps' losses, which SGD(0) keeps at the initial weights' batch losses.
    x, y = _data()
    y = y.copy()
    y[8:16] = np.nan
    model = _model(keras.optimizers.SGD(0.0))
    kernel = [w.numpy() for w in model.weights]
    history = model.fit(
        x,
        y,
        batch_size=8,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[AdaptiveClipping(None), keras.callbacks.TerminateOnNaN()],
    )
    assert not model.stop_training
    for a, b in zip(kernel, model.weights, strict=True):
        np.testing.assert_array_equal(a, b.numpy())
    pred = model.predict(x, verbose=0)
    applied = [0, 2, 3]
    expected = np.mean(
        [
            np.mean((pred[i * 8 : i * 8 + 8] - y[i * 8 : i * 8 + 8]) ** 2)
            for i in applied
        ]
    )
    assert history.history["loss"][0] == pytest.approx(expected, rel=1e-5)
    assert history.history["steps_skipped"] == [1.0]


def test_epoch_loss_is_nan_when_every_step_is_skipped():
    # All-NaN data: no step applied. Not 0.0 (a tuner minimising the loss
    # would pick that trial).
    x, y = _data()
    y = np.full_like(y, np.nan)
    model = _model()
    history = model.fit(
        x, y, batch_size=8, epochs=2, verbose=0, callbacks=[AdaptiveClipping(None)]
    )
    assert np.isnan(history.history["loss"]).all()
    assert history.history["steps_skipped"] == [4.0, 8.0]
