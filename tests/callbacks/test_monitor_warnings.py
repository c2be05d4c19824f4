"""`GradientMonitor` reads non-finite gradient norms without numpy warnings."""

import math
import warnings

import keras
import numpy as np

from keras_stability.callbacks import GradientMonitor


def test_infinite_layer_norms_give_nan_ratio_without_runtime_warning():
    # x = 1e20: the kernel's gradient (x * 2 * pred) overflows to inf, so the
    # only layer's norm is inf and min / max layer norm is inf / inf.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="only")])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    x = np.full((4, 3), 1e20, "float32")
    y = np.zeros((4, 1), "float32")
    monitor = GradientMonitor(verbose=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(
            x, y, batch_size=4, epochs=1, verbose=0, callbacks=[monitor]
        )
    numpy_warnings = [
        str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)
    ]
    assert numpy_warnings == []
    assert monitor.history["grad_norm"]["only"] == [math.inf]
    # Undefined ratio: nan (as for a nan norm), not a numpy warning.
    assert math.isnan(history.history["min_layer_grad_ratio"][0])
    assert history.history["grad_norm"][0] == math.inf
