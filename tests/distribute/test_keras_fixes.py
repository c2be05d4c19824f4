"""The public switch of the multi-worker fixes (the patches are pinned in
`tests/test_keras_internals.py`)."""

import keras
import numpy as np
from keras.src.backend.tensorflow import trainer as tf_trainer

from keras_stability import _keras_internals
from keras_stability.distribute import keras_fixes


def _fit_once():
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(0.1), "mse", metrics=["mae"])
    x = np.arange(24, dtype="float32").reshape(8, 3) / 10
    history = model.fit(x, np.ones((8, 2)), epochs=2, batch_size=4, verbose=0)
    return model.get_weights(), history.history


def test_fixes_are_idempotent_reversible_and_change_nothing_single_worker():
    original_build = tf_trainer.TensorFlowTrainer._maybe_symbolic_build
    original_reduce = tf_trainer.reduce_per_replica
    weights_before, history_before = _fit_once()
    try:
        assert keras_fixes.enable_multi_worker_fixes() is True
        assert keras_fixes.enable_multi_worker_fixes() is False
        assert tf_trainer.reduce_per_replica is not original_reduce
        assert (
            _keras_internals.multi_worker_patch_targets()["reduce_per_replica"]
            is original_reduce
        )
        weights_after, history_after = _fit_once()
    finally:
        assert keras_fixes.disable_multi_worker_fixes() is True
    assert tf_trainer.TensorFlowTrainer._maybe_symbolic_build is original_build
    assert tf_trainer.reduce_per_replica is original_reduce
    assert keras_fixes.disable_multi_worker_fixes() is False
    for a, b in zip(weights_before, weights_after, strict=True):
        np.testing.assert_array_equal(a, b)
    assert history_before == history_after
