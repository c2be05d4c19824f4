"""Fixes for `model.fit` under `tf.distribute.MultiWorkerMirroredStrategy` in Keras 3.

Keras 3.15's TensorFlow trainer fails under `MultiWorkerMirroredStrategy`
(keras-team/keras#20585) with "Attempt to convert a value (PerReplica...) with
an unsupported type". `enable_multi_worker_fixes()` patches the two Keras
functions at fault; the patches themselves, what each works around and the
tests that pin Keras' code live in `keras_stability._keras_internals`.
`keras_stability.distribute.get_strategy()` enables them when it returns a
multi-worker strategy.
"""

import warnings

import keras

from keras_stability import _keras_internals


def enable_multi_worker_fixes():
    """Patches Keras' TensorFlow trainer so `fit` works under multi-worker.

    The patched functions defer to Keras' own code for every other strategy,
    so enabling the fixes changes nothing for single-worker training.
    Idempotent.

    Returns:
        `True` if the fixes were applied by this call, `False` if they
        already were.
    """
    if _keras_internals.multi_worker_patches_enabled():
        return False
    if not _keras_internals.keras_version_tested():
        warnings.warn(
            f"keras_stability's multi-worker fixes were written for Keras "
            f"{', '.join(_keras_internals.TESTED_KERAS_VERSIONS)}; this is Keras "
            f"{keras.__version__}. They are applied anyway; check "
            "keras-team/keras#20585 for whether they are still needed.",
            stacklevel=2,
        )
    return _keras_internals.enable_multi_worker_patches()


def multi_worker_fixes_enabled():
    """Whether `enable_multi_worker_fixes()` has been applied in this process."""
    return _keras_internals.multi_worker_patches_enabled()


def disable_multi_worker_fixes():
    """Restores Keras' own functions. Returns whether anything was restored."""
    return _keras_internals.disable_multi_worker_patches()
