import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_stability.callbacks.paired_trial import ShadowWeights
from keras_stability.callbacks.paired_trial import can_compare
from keras_stability.callbacks.paired_trial import paired_ratio
from keras_stability.callbacks.snapshots import Snapshot


@pytest.mark.parametrize(
    "pairs, expected",
    [
        ([(1.0, 2.0), (2.0, 2.0), (4.0, 2.0)], 1.0),  # the median of 2, 1, 0.5
        ([(1.0, 3.0)], 3.0),
        ([(math.nan, 1.0), (1.0, 0.5), (1.0, 0.5)], 0.5),  # current non-finite: 0
        ([(1.0, math.inf), (1.0, math.inf), (1.0, 0.5)], math.inf),
        ([(0.0, 0.0)], 1.0),
        ([(0.0, 1.0)], math.inf),
        ([], None),
    ],
)
def test_paired_ratio(pairs, expected):
    assert paired_ratio(pairs) == expected


def _model(loss="mse", dropout=0.0):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((4,)), keras.layers.Dense(8, activation="relu")]
    if dropout:
        layers.append(keras.layers.Dropout(dropout))
    layers += [keras.layers.BatchNormalization(), keras.layers.Dense(1)]
    model = keras.Sequential(layers)
    model.compile(keras.optimizers.SGD(0.1), loss, metrics=["mae"])
    return model


def test_can_compare_needs_a_compiled_loss():
    assert can_compare(_model())
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.1))  # a custom train_step's own loss
    assert not can_compare(model)
    assert not can_compare(keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)]))


def test_the_step_scores_the_snapshot_on_its_batch_and_changes_nothing():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.normal(size=(32, 1)).astype("float32")
    w = rng.uniform(0.5, 2.0, size=(32,)).astype("float32")
    model = _model()
    model.fit(x, y, epochs=1, verbose=0)  # builds the optimizer and metrics
    snapshot = Snapshot(model, step=1)
    # The snapshot's loss on the batch, as `train_step` computes it
    # (batch statistics: `training=True`; sample weights).
    expected = float(
        model.compute_loss(x, y, model(x, training=True), w, training=True)
    )
    model.fit(x, y, epochs=3, verbose=0)  # the current weights move on
    shadow = ShadowWeights(model)

    @tf.function
    def step(data):
        return shadow.evaluate(data)

    assert np.isnan(step((x, y, w)).numpy()).all()  # the flag is down
    current = float(model.compute_loss(x, y, model(x, training=True), w))
    shadow.load(snapshot)
    before = [v.numpy().copy() for v in model.variables]
    metrics = [v.numpy().copy() for v in model.metrics_variables]
    current_loss, got = step((x, y, w)).numpy()
    assert current_loss == pytest.approx(current, rel=1e-5)
    assert got == pytest.approx(expected, rel=1e-5)
    assert abs(current - got) > 1e-3  # not the current weights' loss
    for a, b in zip(before, model.variables, strict=True):
        np.testing.assert_array_equal(a, b.numpy())  # BN statistics included
    for a, b in zip(metrics, model.metrics_variables, strict=True):
        np.testing.assert_array_equal(a, b.numpy())
    shadow.stop()
    assert np.isnan(step((x, y, w)).numpy()).all()


def test_a_shadow_covers_the_weights_it_was_made_for():
    model = _model(dropout=0.5)
    shadow = ShadowWeights(model)
    assert shadow.covers(model)
    assert not shadow.covers(_model())


def test_a_model_with_a_seed_generator_is_scored():
    # `Dropout` (and `LSTM`) hold a `SeedGenerator` state: a variable of the
    # model that is no weight, so not in a snapshot. The step scores the
    # snapshot with its current value, and leaves it as it was.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.normal(size=(32, 1)).astype("float32")
    model = _model(dropout=0.5)
    assert len(model.non_trainable_variables) > len(model.non_trainable_weights)
    model.fit(x, y, epochs=1, verbose=0)
    shadow = ShadowWeights(model)
    shadow.load(Snapshot(model, step=1))

    @tf.function
    def step(data):
        return shadow.evaluate(data)

    before = [v.numpy().copy() for v in model.non_trainable_variables]
    current_loss, got = step((x, y)).numpy()
    assert math.isfinite(current_loss) and math.isfinite(got) and got > 0
    for a, b in zip(before, model.non_trainable_variables, strict=True):
        np.testing.assert_array_equal(a, b.numpy())
