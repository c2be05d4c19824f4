"""Imports `tensorflow_model_optimization` without switching `tf.keras` to Keras 2.

TF-MOT's package import sets `os.environ["TF_USE_LEGACY_KERAS"] = "1"`
(`tensorflow_model_optimization/python/core/keras/compat.py`). TensorFlow
resolves its lazy `tf.keras` attribute on first touch and reads that variable
then, so a process that imports TF-MOT before touching `tf.keras` gets
`tf_keras` for good. This module touches `tf.keras` first (fixing it to
Keras 3), imports TF-MOT, and puts the variable back as it was.
"""

import importlib
import os

_ENV_VAR = "TF_USE_LEGACY_KERAS"


def pin_tf_keras():
    """Resolves TensorFlow's lazy `tf.keras` now, under the current environment."""
    import tensorflow as tf

    # Any attribute access resolves the lazy loader; `__version__` is cheap.
    getattr(tf.keras, "__version__", None)


def import_tfmot():
    """Returns the `tensorflow_model_optimization` module, leaving `tf.keras` alone.

    Returns:
        The imported `tensorflow_model_optimization` module.
    """
    pin_tf_keras()
    previous = os.environ.get(_ENV_VAR)
    try:
        return importlib.import_module("tensorflow_model_optimization")
    finally:
        if previous is None:
            os.environ.pop(_ENV_VAR, None)
        else:
            os.environ[_ENV_VAR] = previous


def tfmot_schedule_class(name):
    """Returns TF-MOT's pruning schedule class `name` (e.g. `"PolynomialDecay"`)."""
    tfmot = import_tfmot()
    return getattr(tfmot.sparsity.keras, name)
