"""The gradient-health callbacks at their defaults on patterns users write
with Keras' own parts (optimizer options, Keras callbacks, fit arguments).

A healthy run with the callbacks must end where plain `fit` ends, bit for bit.
"""

import keras
import numpy as np
import pytest

from keras_stability.callbacks import AdaptiveClipping
from keras_stability.callbacks import GradientExplosionDetector
from keras_stability.callbacks import GradientMonitor
from keras_stability.clipping import GlobalNorm


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 10)).astype("float32")
    y = (x[:, :3].sum(1) > 0).astype("int32") + (x[:, 3] > 0).astype("int32")
    return x, y


def _model(optimizer):
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(3),
        ]
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _fit(model, callbacks, epochs=2, **kwargs):
    x, y = _data()
    return model.fit(
        x,
        y,
        batch_size=16,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
        **kwargs,
    )


@pytest.mark.parametrize(
    "clip", [{"global_clipnorm": 0.05}, {"clipnorm": 0.05}, {"clipvalue": 0.01}]
)
def test_monitor_and_detector_keep_the_optimizers_own_clipping(clip):
    # Adam(global_clipnorm=1.0) is the usual transformer recipe: adding the
    # monitoring callbacks must not refuse it, nor change what it does.
    plain = _model(keras.optimizers.Adam(1e-2, **clip))
    _fit(plain, [])
    model = _model(keras.optimizers.Adam(1e-2, **clip))
    monitor = GradientMonitor()
    history = _fit(model, [monitor, GradientExplosionDetector()])
    assert model.optimizer.clipping is None
    for ours, theirs in zip(model.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    # The logged norm is the pre-clip one, well above what the optimizer clips to.
    assert min(history.history["grad_norm"]) > 0.1


def test_adaptive_clipping_after_the_monitor_refuses_an_optimizer_that_clips():
    model = _model(keras.optimizers.Adam(1e-2, global_clipnorm=1.0))
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `clipping`. Expected no clipping policy "
        r"for this GuardedOptimizer: its inner optimizer clips by itself "
        r"\(global_clipnorm=1.0\)",
    ):
        _fit(model, [GradientMonitor(), AdaptiveClipping(GlobalNorm(1.0))])
