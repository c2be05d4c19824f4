"""`WeightDecayScheduler`: schedule the optimizer's decoupled weight decay."""

import math

import keras

from keras_stability import _keras_internals
from keras_stability._checks import check_verbose
from keras_stability._checks import invalid
from keras_stability.callbacks.step_logs import StepLogs

__all__ = ["WeightDecayScheduler"]

# The optimizer's attribute holding the variable its traced step reads.
_SHARED = "_keras_stability_weight_decay_variable"


class WeightDecayScheduler(keras.callbacks.Callback):
    """Sets the optimizer's decoupled weight decay at the start of every epoch.

    `LearningRateScheduler` for `weight_decay`. Keras optimizers hold
    `weight_decay` as a Python float that a traced train step bakes in as a
    constant; for the duration of `fit` this callback swaps it for a
    non-trainable variable (read by the compiled step, assigned between
    epochs, so no retracing) and puts the last value back as a float in
    `on_train_end`. A later scheduler on the same optimizer (a new instance
    in each `fit` call) uses the same variable, so that `fit` does not
    retrace either. While it is swapped, the optimizer's `get_config` still
    reports a float, so checkpoints written during `fit` stay loadable. The
    value is added to the epoch logs as `weight_decay` (for every callback,
    whatever the order, when the steps per epoch are known).

    Keras applies decoupled decay as `w -= learning_rate * weight_decay * w`,
    so the decay already follows the learning-rate schedule; a schedule here
    changes `weight_decay` itself, e.g. to warm it up, decay it with a
    cosine, or keep `learning_rate * weight_decay` constant.

    Args:
        schedule: Either a function `(epoch, weight_decay) -> new weight_decay`
            (`epoch` counts from 0, `weight_decay` is the current value), or
            a `keras.optimizers.schedules.LearningRateSchedule` (any
            function of the optimizer step), evaluated at the first step of
            each epoch.
        verbose: `0` quiet, `1` prints a line when the value changes.
            Defaults to `0`.

    Raises:
        ValueError: If `schedule` is not callable, or (at `fit` start) if the
            optimizer has no decoupled weight decay, or a scheduled value is
            negative or not finite.

    Example:

    >>> cosine = keras.optimizers.schedules.CosineDecay(1e-2, decay_steps=1000)
    >>> callback = WeightDecayScheduler(cosine)
    >>> halve = WeightDecayScheduler(lambda epoch, wd: wd * 0.5)

    Reference:
        Loshchilov and Hutter, "Decoupled Weight Decay Regularization", 2019.
    """

    def __init__(self, schedule, verbose=0):
        super().__init__()
        if not callable(schedule):
            raise invalid(
                "schedule",
                schedule,
                "a function `(epoch, weight_decay) -> weight_decay` or a "
                "`LearningRateSchedule`",
            )
        self.schedule = schedule
        self.verbose = check_verbose("verbose", verbose)
        self._variable = None
        self._optimizer = None

    def _value(self, epoch, current):
        if isinstance(self.schedule, keras.optimizers.schedules.LearningRateSchedule):
            value = self.schedule(self._optimizer.iterations)
        else:
            value = self.schedule(epoch, current)
        value = float(_keras_internals.to_numpy(value))
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                "Invalid value returned by `schedule`. Expected a finite number "
                f">= 0. Received: weight_decay={value!r} at epoch {epoch}"
            )
        return value

    def on_train_begin(self, logs=None):
        optimizer = getattr(
            self.model.optimizer, "inner_optimizer", self.model.optimizer
        )
        current = getattr(optimizer, "weight_decay", None)
        if current is None:
            raise ValueError(
                "Invalid optimizer for `WeightDecayScheduler`. Expected an "
                "optimizer with decoupled weight decay (e.g. "
                "`keras.optimizers.AdamW`, or `weight_decay=` of any Keras "
                f"optimizer). Received: {type(optimizer).__name__} with "
                "weight_decay=None"
            )
        self._optimizer = optimizer
        # One variable per optimizer, whichever scheduler made it (a new
        # instance in each `fit` call): the traced step reads it already.
        self._variable = optimizer.__dict__.get(_SHARED)
        if self._variable is None:
            with self.model.distribute_strategy.scope():
                self._variable = keras.Variable(
                    float(current),
                    trainable=False,
                    dtype="float32",
                    name="weight_decay",
                )
            object.__setattr__(optimizer, _SHARED, self._variable)
            # A step traced before (e.g. by `train_on_batch`) holds the float.
            self.model.make_train_function(force=True)
        elif not isinstance(current, keras.Variable):
            self._variable.assign(float(current))
        # Bypass the optimizer's variable tracker: the variable is schedule
        # state, not optimizer state, and must not change `optimizer.variables`.
        object.__setattr__(optimizer, "weight_decay", self._variable)
        original_get_config = type(optimizer).get_config
        variable = self._variable

        def get_config():
            config = original_get_config(optimizer)
            config["weight_decay"] = float(variable.numpy())
            return config

        object.__setattr__(optimizer, "get_config", get_config)
        self._step_logs = StepLogs.of(self.model)
        self._step_logs.attach(self, self._after_step, self.params)

    def on_epoch_begin(self, epoch, logs=None):
        self._step_logs.start_epoch(epoch)
        old = float(self._variable.numpy())
        new = self._value(epoch, old)
        self._variable.assign(new)
        if self.verbose and new != old:
            _keras_internals.print_msg(
                f"\nEpoch {epoch + 1}: WeightDecayScheduler setting weight decay to {new:g}."
            )

    def _after_step(self, logs):
        if self._step_logs.epoch_end:
            logs["weight_decay"] = float(self._variable.numpy())

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["weight_decay"] = float(self._variable.numpy())

    def on_train_end(self, logs=None):
        self._step_logs.detach(self)
        optimizer = self._optimizer
        object.__setattr__(optimizer, "weight_decay", float(self._variable.numpy()))
        if "get_config" in vars(optimizer):
            object.__delattr__(optimizer, "get_config")
