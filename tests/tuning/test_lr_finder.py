"""find_learning_rate: the range test restores the model and reads a sensible rate."""

import keras
import matplotlib

matplotlib.use("Agg")
import numpy as np
import pytest
import tensorflow as tf

from keras_stability.datasets import load_dataset
from keras_stability.optimizers import GuardedOptimizer
from keras_stability.tuning.lr_finder import find_learning_rate
from keras_stability.tuning.lr_finder import running_median
from keras_stability.tuning.lr_finder import suggest_learning_rate


def _data(n=1600, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 10)).astype("float32")
    w = np.random.default_rng(0).normal(size=(10, 10))
    y = np.argmax(x @ w + 0.5 * rng.normal(size=(n, 10)), axis=1)
    return x, y


def _example(optimizer=None):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer or keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _state(model):
    return [v.numpy().copy() for v in model.variables] + [
        v.numpy().copy() for v in model.optimizer.variables
    ]


def test_weights_and_optimizer_state_are_restored_and_later_fit_is_unchanged():
    x, y = _data(256)
    plain = _example()
    plain.fit(x, y, epochs=1, batch_size=32, shuffle=False, verbose=0)  # builds slots
    tested = _example()
    tested.fit(x, y, epochs=1, batch_size=32, shuffle=False, verbose=0)
    before = _state(tested)
    result = find_learning_rate(tested, x, y, num_steps=30)
    assert len(result.losses) >= 10
    for a, b in zip(before, _state(tested), strict=True):
        np.testing.assert_array_equal(a, b)
    # Training afterwards is exactly what it would have been.
    plain.fit(x, y, epochs=1, batch_size=32, shuffle=False, verbose=0)
    tested.fit(x, y, epochs=1, batch_size=32, shuffle=False, verbose=0)
    for a, b in zip(plain.get_weights(), tested.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_schedule_learning_rate_is_put_back():
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-3, 100, 0.5)
    model = _example(keras.optimizers.Adam(schedule))
    x, y = _data(256)
    result = find_learning_rate(model, x, y, num_steps=20)
    assert model.optimizer._learning_rate is schedule
    assert result.learning_rates[0] == pytest.approx(1e-7)
    model.fit(x, y, epochs=1, verbose=0)
    assert float(model.optimizer.learning_rate) == pytest.approx(
        float(schedule(model.optimizer.iterations)), rel=1e-6
    )


def test_suggestion_on_the_keras_example_is_within_3x_of_the_grid_best():
    # Adam on the demo's data, 10 epochs, mean held-out loss of 3 seeds by rate:
    # 5e-4 0.537, 1e-3 0.461 (best), 2e-3 0.489, 3e-3 0.532, 5e-3 0.638,
    # 1e-2 0.813, 3e-2 1.02.
    (x, y), _ = load_dataset("synthetic")
    result = find_learning_rate(_example(), x, y)
    assert 1e-3 / 3 <= result.suggestion <= 1e-3 * 3, result.suggestion
    assert result.losses.shape == result.learning_rates.shape
    assert np.all(np.diff(result.learning_rates) > 0)


def test_default_is_a_tenth_of_the_rate_at_the_lowest_median_loss():
    (x, y), _ = load_dataset("synthetic")
    model = _example()
    result = find_learning_rate(model, x, y, num_steps=60, end_lr=1.0)
    assert result.method == "minimum"
    np.testing.assert_array_equal(
        result.median_losses, running_median(result.learning_rates, result.losses)
    )
    rates, median = result.learning_rates[6:], result.median_losses[6:]
    assert result.suggestion == pytest.approx(rates[np.argmin(median)] / 10)
    # `valley` still reads the exponential average, as fastai does.
    valley = find_learning_rate(model, x, y, num_steps=60, end_lr=1.0, method="valley")
    assert valley.suggestion == suggest_learning_rate(
        valley.learning_rates[6:], valley.smoothed_losses[6:], "valley"
    )


def _lm_like_curve(seed):
    # The shape of the battery's char LM range test: Adam shaves the initial
    # logits' excess from about 1e-5, the loss falls steeply around 5e-3, is
    # lowest near 3e-2 and blows up past a few tenths. Returns the rates and
    # losses the test records (it stops as `find_learning_rate` does) and the
    # exponential average it used to smooth them (beta 0.98, bias-corrected).
    lrs = np.geomspace(1e-7, 10.0, 100)
    log = np.log10(lrs)
    losses = (
        4.62
        - 0.15 / (1 + np.exp(-(log + 4.5) * 3))
        - 3.55 / (1 + np.exp(-(log + 2.3) * 3.5))
        + np.where(log > -1.5, 10 ** ((log + 1.5) * 1.2) - 1, 0)
        + np.random.default_rng(seed).normal(0, 0.05, log.size)
    )
    average, best, ema = 0.0, np.inf, []
    for i, loss in enumerate(losses):
        average = 0.98 * average + 0.02 * loss
        ema.append(average / (1 - 0.98 ** (i + 1)))
        if ema[-1] > 4 * best:
            break
        best = min(best, ema[-1])
    n = len(ema)
    return lrs[:n], losses[:n], np.asarray(ema)


@pytest.mark.parametrize("seed", range(3))
def test_lm_like_curve_is_read_a_decade_below_its_lowest_loss(seed):
    lrs, losses, ema = _lm_like_curve(seed)
    lowest = lrs[np.argmin(losses)]
    assert 2e-2 <= lowest <= 4e-2
    median = running_median(lrs, losses)
    suggestion = suggest_learning_rate(lrs[10:], median[10:], "minimum")
    assert lowest / 15 <= suggestion <= lowest / 7, (suggestion, lowest)
    # The previous reading (fastai's valley on the exponential average) lands
    # more than 3x lower: the valley starts where Adam first shaves the
    # initial loss, five decades below the lowest loss.
    assert suggest_learning_rate(lrs[10:], ema[10:], "valley") < suggestion / 3
    # And the exponential average's lowest point lags the loss's by a decade
    # or more, which is why `minimum` reads the running median.
    assert lrs[np.argmin(ema)] >= 2 * lowest


def test_running_median_has_no_lag_and_drops_spikes():
    lrs = np.geomspace(1e-6, 1.0, 61)  # 10 steps per decade: a 5-step window
    log = np.log10(lrs)
    losses = 1.0 + (log + 2) ** 2  # lowest at 1e-2
    losses[20] = 50.0  # a lone spike
    losses[-1] = np.nan  # a diverged last step
    smoothed = running_median(lrs, losses)
    assert smoothed.shape == losses.shape
    # Lowest within a step of 1e-2 (the median flattens the bottom into ties).
    assert abs(int(np.argmin(smoothed)) - 40) <= 1
    assert smoothed[20] <= max(losses[18], losses[22])  # the spike is gone
    assert np.isinf(smoothed[-1])  # a NaN counts as a diverged (infinite) loss
    assert np.isfinite(smoothed[:-1]).all()
    with pytest.raises(ValueError, match="Invalid value for argument `decades`"):
        running_median(lrs, losses, decades=0.0)


def test_divergence_stops_the_test_early():
    # Least squares with SGD diverges once lr > 2 / (largest Hessian eigenvalue).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 4)).astype("float32") * 3.0
    y = x @ np.ones((4, 1), "float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    result = find_learning_rate(model, x, y, start_lr=1e-4, end_lr=10.0, num_steps=60)
    assert result.stopped_early
    assert len(result.losses) < 60
    stable_limit = 2.0 / np.linalg.eigvalsh(2 * x.T @ x / len(x)).max()
    assert result.suggestion < stable_limit
    assert np.isfinite(model.get_weights()[0]).all()


def test_guarded_optimizer_and_dataset_input():
    x, y = _data(256)
    model = _example(GuardedOptimizer(keras.optimizers.Adam(1e-3)))
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    model.fit(data, epochs=1, verbose=0)
    before = _state(model)
    result = find_learning_rate(model, data, end_lr=1e-2, num_steps=20)
    assert len(result.losses) == 20  # the 8-batch dataset was repeated
    for a, b in zip(before, _state(model), strict=True):
        np.testing.assert_array_equal(a, b)
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-3)


def test_train_step_without_loss_is_a_clear_error():
    class NoLoss(keras.Model):
        def train_step(self, data):
            return {"something": 1.0}

    inputs = keras.Input((10,))
    model = NoLoss(inputs, keras.layers.Dense(10)(inputs))
    model.compile("adam", "mse")
    x, y = _data(64)
    with pytest.raises(ValueError, match="logs include `loss`"):
        find_learning_rate(model, x, np.eye(10)[y], num_steps=10)


def _unbuilt(optimizer=None):
    """`_example` without `keras.Input`: built by the first `fit`."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer or keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


@pytest.mark.parametrize("data", ["arrays", "dataset", "generator"])
def test_unbuilt_model_is_built_as_fit_builds_it_and_left_untouched(data):
    x, y = _data(256)

    def inputs():
        """`fit`'s data arguments: 8 batches of 32 an epoch."""
        if data == "arrays":
            return (x, y), {"batch_size": 32}
        if data == "dataset":
            return (tf.data.Dataset.from_tensor_slices((x, y)).batch(32),), {}

        def batches():
            while True:
                for i in range(0, len(x), 32):
                    yield x[i : i + 32], y[i : i + 32]

        return (batches(),), {"steps_per_epoch": 8}

    def fit(model):
        keras.utils.set_random_seed(1)
        args, kwargs = inputs()
        model.fit(*args, epochs=2, shuffle=data == "arrays", verbose=0, **kwargs)

    plain = _unbuilt()
    fit(plain)
    tested = _unbuilt()
    args, kwargs = inputs()
    kwargs.pop("steps_per_epoch", None)
    result = find_learning_rate(tested, *args, num_steps=20, **kwargs)
    assert len(result.losses) == 20
    # Built as `fit` builds it (the input shape its traced step sees), with
    # the initial weights and a fresh optimizer.
    assert tested.inputs[0].shape == plain.inputs[0].shape
    assert int(tested.optimizer.iterations) == 0
    fresh = _unbuilt()
    fresh.build(plain.inputs[0].shape)
    for a, b in zip(fresh.get_weights(), tested.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # Training afterwards (shuffled, with dropout) is what it would have been.
    fit(tested)
    for a, b in zip(plain.get_weights(), tested.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(plain.optimizer.variables, tested.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_uncompiled_model_is_a_clear_error():
    x, y = _data(64)
    with pytest.raises(
        ValueError, match="Invalid value for argument `model`.*a compiled model"
    ):
        find_learning_rate(keras.Sequential([keras.layers.Dense(1)]), x, y)
    with pytest.raises(ValueError, match="Invalid value for argument `end_lr`"):
        find_learning_rate(_example(), x, y, start_lr=1.0, end_lr=0.1)


def test_suggestion_methods_on_a_known_curve():
    lrs = np.geomspace(1e-5, 1.0, 50)
    # Flat, then falling fastest near 1e-2, lowest at 1e-1, then rising.
    log = np.log10(lrs)
    losses = (
        2.0 - 1.5 / (1 + np.exp(-(log + 2) * 4)) + np.where(log > -1, (log + 1) * 5, 0)
    )
    assert suggest_learning_rate(lrs, losses, "steepest") == pytest.approx(
        1e-2, rel=0.3
    )
    minimum = lrs[np.argmin(losses)]
    assert suggest_learning_rate(lrs, losses, "minimum") == pytest.approx(minimum / 10)
    valley = suggest_learning_rate(lrs, losses, "valley")
    assert 1e-5 < valley < minimum
    assert np.isnan(suggest_learning_rate(lrs[:3], losses[:3]))


def test_plot_draws_the_curve_on_a_log_axis():
    x, y = _data(256)
    result = find_learning_rate(_example(), x, y, num_steps=20)
    ax = result.plot()
    assert ax.get_xscale() == "log"
    # loss, exponential average, running median, suggestion
    assert len(ax.lines) == 4


def test_one_optimizer_step_per_rate_with_steps_per_execution():
    counter = tf.Variable(0)  # outside the model, so the restore leaves it

    class Counting(keras.Sequential):
        def train_step(self, data):
            counter.assign_add(1)
            return super().train_step(data)

    keras.utils.set_random_seed(0)
    model = Counting([keras.Input((10,)), keras.layers.Dense(10)])
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=4,
    )
    x, y = _data(256)
    result = find_learning_rate(model, x, y, num_steps=12, end_lr=1e-2)
    assert len(result.losses) == 12
    assert int(counter.numpy()) == 12  # one step per rate, not 4
    assert model.steps_per_execution == 4
    assert int(model.optimizer.iterations) == 0  # restored
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    assert int(counter.numpy()) == 12 + 8


@pytest.mark.parametrize("guarded", [False, True])
def test_gradient_accumulation_gives_each_rate_one_update(guarded):
    # With gradient_accumulation_steps=2 each rate had one micro-batch, so
    # only every other rate updated the weights (and the suggestion moved,
    # 0.0117 against 0.0062). Now each rate is one update on 2 batches of
    # 16: the curve of one update on each batch of 32 of the same data.
    x, y = _data(512)

    def curve(batch, accumulation):
        optimizer = keras.optimizers.Adam(
            1e-3, gradient_accumulation_steps=accumulation
        )
        model = _example(GuardedOptimizer(optimizer) if guarded else optimizer)
        if accumulation:  # an odd micro-batch: the test starts a new window
            model.fit(x[:16], y[:16], batch_size=16, epochs=1, verbose=0)
        model.optimizer.build(model.trainable_variables)
        before = _state(model)
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
        result = find_learning_rate(model, data, end_lr=1e-1, num_steps=20)
        for a, b in zip(before, _state(model), strict=True):
            np.testing.assert_array_equal(a, b)
        return result

    accumulated, whole = curve(16, 2), curve(32, None)
    assert len(accumulated.losses) == len(whole.losses) == 20
    np.testing.assert_allclose(accumulated.losses, whole.losses, rtol=2e-4)
    assert accumulated.suggestion == pytest.approx(whole.suggestion)
