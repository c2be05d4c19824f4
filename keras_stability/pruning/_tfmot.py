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


_SCHEDULE_CLASSES = {}


def tfmot_schedule_class(name):
    """Returns TF-MOT's pruning schedule class `name` with Keras-style checks.

    The class is a subclass of TF-MOT's (`isinstance` and TF-MOT's own code
    see a TF-MOT schedule; the sparsities it returns are TF-MOT's), made once
    on first use. Its `__init__` checks every argument in Keras' error form
    first (TF-MOT's messages do not name the argument that way, and it takes
    `frequency=2.5` or `power=-1`), and accepts NumPy numbers.

    Args:
        name: `"PolynomialDecay"` or `"ConstantSparsity"`.

    Returns:
        The class.
    """
    if not _SCHEDULE_CLASSES:
        _SCHEDULE_CLASSES.update(
            _checked_schedule_classes(import_tfmot().sparsity.keras)
        )
    return _SCHEDULE_CLASSES[name]


def _checked_schedule_classes(tfmot_sparsity):
    from keras_stability._checks import check_fraction
    from keras_stability._checks import check_int
    from keras_stability._checks import check_nonnegative_int
    from keras_stability._checks import check_number
    from keras_stability._checks import check_positive_int

    def sparsity(name, value):
        return check_fraction(name, value, high_open=True)

    class PolynomialDecay(tfmot_sparsity.PolynomialDecay):
        """TF-MOT's `PolynomialDecay` schedule, with Keras-style argument checks.

        The sparsity grows from `initial_sparsity` at `begin_step` to
        `final_sparsity` at `end_step` as
        `final + (initial - final) * (1 - (step - begin) / (end - begin)) ** power`,
        and the weights are pruned every `frequency` steps in between
        (Zhu and Gupta, 2017, "To prune, or not to prune").

        Args:
            initial_sparsity: Sparsity at `begin_step`, in [0, 1).
            final_sparsity: Sparsity from `end_step` on, in [0, 1).
            begin_step: First pruning step, an integer >= 0.
            end_step: Step where `final_sparsity` is reached, an integer >
                `begin_step`.
            power: Exponent of the decay, a number > 0. Defaults to `3`.
            frequency: Steps between mask updates, a positive integer.
                Defaults to `100`.

        Raises:
            ValueError: On a bad argument, naming it.
        """

        def __init__(
            self,
            initial_sparsity,
            final_sparsity,
            begin_step,
            end_step,
            power=3,
            frequency=100,
        ):
            begin_step = check_nonnegative_int("begin_step", begin_step)
            super().__init__(
                initial_sparsity=sparsity("initial_sparsity", initial_sparsity),
                final_sparsity=sparsity("final_sparsity", final_sparsity),
                begin_step=begin_step,
                end_step=check_int(
                    "end_step",
                    end_step,
                    low=begin_step + 1,
                    what=f"an integer > begin_step={begin_step}",
                ),
                power=check_number("power", power, low=0.0, low_open=True),
                frequency=check_positive_int("frequency", frequency),
            )

    class ConstantSparsity(tfmot_sparsity.ConstantSparsity):
        """TF-MOT's `ConstantSparsity` schedule, with Keras-style argument checks.

        Prunes to `target_sparsity` every `frequency` steps from
        `begin_step` to `end_step` (or for ever with `end_step=-1`).

        Args:
            target_sparsity: Sparsity, in [0, 1).
            begin_step: First pruning step, an integer >= 0.
            end_step: Last pruning step, an integer >= `begin_step`, or `-1`
                to prune until the end of training. Defaults to `-1`.
            frequency: Steps between mask updates, a positive integer.
                Defaults to `100`.

        Raises:
            ValueError: On a bad argument, naming it.
        """

        def __init__(self, target_sparsity, begin_step, end_step=-1, frequency=100):
            begin_step = check_nonnegative_int("begin_step", begin_step)
            end_step = check_int("end_step", end_step)
            if end_step != -1 and end_step < begin_step:
                check_int(
                    "end_step",
                    end_step,
                    low=begin_step,
                    what=f"-1 or an integer >= begin_step={begin_step}",
                )
            super().__init__(
                target_sparsity=sparsity("target_sparsity", target_sparsity),
                begin_step=begin_step,
                end_step=end_step,
                frequency=check_positive_int("frequency", frequency),
            )

    classes = {"PolynomialDecay": PolynomialDecay, "ConstantSparsity": ConstantSparsity}
    for name, cls in classes.items():
        cls.__module__ = "keras_stability.pruning"
        cls.__qualname__ = name
    return classes
