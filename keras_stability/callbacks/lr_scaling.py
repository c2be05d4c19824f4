"""Scaling an optimizer's learning rate, also when it is a schedule.

`GradientExplosionDetector` lowers the learning rate after a rollback. A
constant learning rate is a variable and is simply assigned. A
`LearningRateSchedule` is wrapped once in `ScaledSchedule`, whose factor is a
variable, so later scalings reach the compiled step without retracing and the
schedule's shape (warm-up, decay) is kept.
"""

import keras

from keras_stability import _keras_internals
from keras_stability._checks import check_positive
from keras_stability._checks import invalid
from keras_stability.optimizers.guarded_optimizer import optimizer_chain

__all__ = [
    "LoweredRate",
    "ScaledSchedule",
    "innermost_optimizer",
    "learning_rate_variable",
    "scale_learning_rate",
    "wrap_schedule",
]


@keras.saving.register_keras_serializable(package="keras_stability")
class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A learning-rate schedule multiplied by a factor held in a variable.

    Args:
        schedule: The `LearningRateSchedule` to scale.
        factor: The multiplier. Defaults to `1.0`.

    Raises:
        ValueError: If `schedule` is not a `LearningRateSchedule` or `factor`
            is not positive.

    Example:

    >>> base = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    >>> scaled = ScaledSchedule(base, factor=0.5)
    >>> round(float(scaled(0)), 6)
    0.05
    """

    def __init__(self, schedule, factor=1.0):
        given = schedule
        if isinstance(schedule, dict):
            try:
                schedule = keras.saving.deserialize_keras_object(schedule)
            except (TypeError, ValueError, KeyError):
                schedule = None
        if not isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
            raise invalid(
                "schedule", given, "a `keras.optimizers.schedules.LearningRateSchedule`"
            )
        factor = check_positive("factor", factor)
        self.schedule = schedule
        self.factor = keras.Variable(
            factor, dtype="float32", trainable=False, name="lr_scale_factor"
        )

    def __call__(self, step):
        lr = self.schedule(step)
        return lr * keras.ops.cast(self.factor, keras.ops.dtype(lr))

    def set_model(self, model):
        """Refuses `fit(callbacks=[...])`: this is a schedule, not a callback."""
        raise ValueError(
            "Invalid value for argument `callbacks`. `ScaledSchedule` is a "
            "learning-rate schedule, not a callback: pass it as the optimizer's "
            "`learning_rate`. Received: "
            f"callbacks=[{self!r}, ...]"
        )

    def get_config(self):
        return {
            "schedule": keras.saving.serialize_keras_object(self.schedule),
            "factor": float(_keras_internals.to_numpy(self.factor)),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["schedule"] = keras.saving.deserialize_keras_object(config["schedule"])
        return cls(**config)


# Keras' own schedules are linear in these config entries: the schedule
# scaled by a factor is the same schedule with them multiplied by it.
_RATE_KEYS = {
    "ExponentialDecay": ("initial_learning_rate",),
    "InverseTimeDecay": ("initial_learning_rate",),
    "PolynomialDecay": ("initial_learning_rate", "end_learning_rate"),
    "PiecewiseConstantDecay": ("values",),
    "CosineDecay": ("initial_learning_rate", "warmup_target"),
    "CosineDecayRestarts": ("initial_learning_rate",),
}


def keras_equivalent(schedule):
    """A schedule of Keras' own equal to `schedule`, or `None` if there is none.

    A `ScaledSchedule` of one of Keras' built-in schedules (the detector's
    lowering of the rate) is that schedule with its rates multiplied by the
    factor's current value, so a model holding it can be saved for a
    process without `keras_stability`; a schedule that is not a
    `ScaledSchedule` is returned as it is. `None` for a `ScaledSchedule` of
    any other schedule.
    """
    if not isinstance(schedule, ScaledSchedule):
        return schedule
    inner = keras_equivalent(schedule.schedule)
    keys = _RATE_KEYS.get(type(inner).__name__) if inner is not None else None
    if keys is None or type(inner).__module__.split(".")[0] != "keras":
        return None
    factor = float(_keras_internals.to_numpy(schedule.factor))
    config = inner.get_config()
    for key in keys:
        value = config.get(key)
        if isinstance(value, (list, tuple)):
            config[key] = [v * factor for v in value]
        elif value is not None:
            config[key] = value * factor
    return type(inner).from_config(config)


def innermost_optimizer(optimizer):
    """Follows `inner_optimizer` (GuardedOptimizer, LossScaleOptimizer) down."""
    chain = optimizer_chain(optimizer)
    return chain[-1] if chain else optimizer


def wrap_schedule(optimizer):
    """Wraps a schedule learning rate in `ScaledSchedule` (once).

    Call it before the train step is traced (or retrace after it).

    Returns:
        True if the optimizer's learning rate object was replaced.
    """
    opt = innermost_optimizer(optimizer)
    lr = _keras_internals.learning_rate_object(opt)
    if isinstance(lr, ScaledSchedule) or not isinstance(
        lr, keras.optimizers.schedules.LearningRateSchedule
    ):
        return False
    _keras_internals.set_learning_rate_object(opt, ScaledSchedule(lr))
    return True


def scale_learning_rate(optimizer, factor):
    """Multiplies the learning rate by `factor`.

    Args:
        optimizer: A Keras optimizer (wrappers are followed to the inner one).
        factor: Positive multiplier.

    Returns:
        The new learning rate at the current step, as a float, or `None` if
        the learning rate is a plain callable that cannot be scaled.
    """
    variable = learning_rate_variable(optimizer)
    if variable is None:
        return None
    variable.assign(_keras_internals.to_numpy(variable) * factor)
    return float(
        _keras_internals.to_numpy(innermost_optimizer(optimizer).learning_rate)
    )


def learning_rate_variable(optimizer):
    """The variable `scale_learning_rate` scales.

    Saving its value and assigning it back undoes scalings exactly.

    Args:
        optimizer: A Keras optimizer (wrappers are followed to the inner one).

    Returns:
        The learning-rate variable of a constant learning rate, the factor
        variable of a `ScaledSchedule`, or `None` (a plain callable or an
        unwrapped schedule, which cannot be scaled).
    """
    lr = _keras_internals.learning_rate_object(innermost_optimizer(optimizer))
    if isinstance(lr, ScaledSchedule):
        return lr.factor
    if isinstance(lr, keras.Variable):
        return lr
    return None


class LoweredRate:
    """Keeps a detector's lowering of a constant rate that another callback sets.

    Keras' `LearningRateScheduler` assigns `schedule(epoch)` at each epoch
    start, whatever the rate is: a rate the detector lowered after an
    explosion goes back up, and the same explosion comes again. This holds
    the detector's scale (the rate it left over the rate it was given) and
    applies it again to a rate set higher from outside; a rate set lower
    (`ReduceLROnPlateau`, or a schedule of `(epoch, lr)` that decays the rate
    it reads) is taken as already lowered, and the scale is kept for later.

    Pure state, no Keras: `value` is the rate as the detector last saw or
    left it.
    """

    def __init__(self, value):
        self.base = float(value)  # the rate set from outside, unscaled
        self.value = float(value)  # the rate as the detector last left it

    @property
    def scale(self):
        return self.value / self.base if self.base > 0 else 1.0

    def wrote(self, value):
        """The detector set the rate to `value`."""
        self.value = float(value)

    def seen(self, value):
        """The rate is `value` now; returns the rate to set instead, or `None`."""
        value = float(value)
        if value == self.value:
            return None
        scale = self.scale
        if value > self.value and scale < 1.0:
            self.base = value
            self.value = value * scale
            return self.value
        self.base = value / scale if scale > 0 else value
        self.value = value
        return None
