"""Per-epoch schedules of the distillation temperature and `alpha`.

A schedule maps the epoch index (0-based) to a value. `DistillationScheduler`
is the Keras adapter: a callback that writes the scheduled values into the
`Distiller`'s `temperature` and `alpha` variables at the start of each epoch.
The values live in variables, so the compiled train step reads them without
retracing and a saved `.keras` file carries them. The `Distiller` reports
both in its logs, so `History` records them per epoch.
"""

import keras

from keras_stability._checks import check_int
from keras_stability._checks import check_number
from keras_stability._checks import invalid

__all__ = ["DistillationScheduler", "LinearSchedule"]


def check_temperature(value, arg="temperature"):
    """A softmax temperature: a finite number > 0 (infinity trains to NaN)."""
    return check_number(arg, value, low=0.0, low_open=True)


def check_alpha(value, arg="alpha"):
    """The weight of the hard-label loss: a number in [0, 1]."""
    return check_number(arg, value, low=0.0, high=1.0)


def check_schedule_values(arg, schedule, check):
    """Checks a schedule's values where they can be known before `fit`.

    The value at epoch 0, and for a `LinearSchedule` its end value too (a
    ramp is linear, so both ends in range means every epoch is). Other
    schedules are checked again each epoch, when their value is assigned.

    Raises:
        ValueError: Naming `arg`, if a value is out of range.
    """
    epochs = [0]
    if isinstance(schedule, LinearSchedule):
        epochs.append(schedule.epochs - 1)
    for epoch in epochs:
        value = schedule(epoch)
        try:
            check(value)
        except ValueError:
            what = (
                "a positive number"
                if check is check_temperature
                else "a number in [0, 1]"
            )
            raise invalid(
                arg,
                schedule,
                f"{what} or a schedule of them; the schedule gives {value!r} at "
                f"epoch {epoch}",
            ) from None


@keras.saving.register_keras_serializable(package="keras_stability")
class LinearSchedule:
    """Linear ramp from `start` at epoch 0 to `end` at epoch `epochs - 1`, then constant.

    Made for `fit(epochs=epochs)`: the first epoch uses `start` and the last
    one uses exactly `end`. In a longer `fit` the value stays at `end`.

    Args:
        start: Value at epoch 0, a number.
        end: Value from epoch `epochs - 1` on, a number.
        epochs: Number of epochs of the ramp, its two ends included; an
            integer >= 2.

    Raises:
        ValueError: If `start` or `end` is not a finite number or `epochs`
            is not an integer >= 2.

    Example:

    >>> schedule = LinearSchedule(start=8.0, end=2.0, epochs=4)
    >>> [schedule(e) for e in range(6)]
    [8.0, 6.0, 4.0, 2.0, 2.0, 2.0]
    """

    def __init__(self, start, end, epochs):
        self.start = check_number("start", start)
        self.end = check_number("end", end)
        self.epochs = check_int("epochs", epochs, low=2)

    def __call__(self, epoch):
        last = self.epochs - 1
        step = min(max(int(epoch), 0), last)
        if step == last:
            return self.end  # exactly `end`, no rounding
        return self.start + (self.end - self.start) * step / last

    def __repr__(self):
        return f"LinearSchedule(start={self.start!r}, end={self.end!r}, epochs={self.epochs})"

    def get_config(self):
        return {"start": self.start, "end": self.end, "epochs": self.epochs}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _check_schedule(arg, value):
    if value is not None and not callable(value):
        raise invalid(
            arg, value, "a callable `epoch -> value` such as `LinearSchedule`, or None"
        )


class DistillationScheduler(keras.callbacks.Callback):
    """Sets the `Distiller`'s temperature and `alpha` from schedules each epoch.

    The `Distiller` validates every scheduled value (temperature > 0, alpha in
    `[0, 1]`) before assigning it. `Distiller.compile` accepts schedules for
    `temperature`/`alpha` directly and then adds this callback to `fit` itself.

    Args:
        temperature: Callable `epoch -> temperature`, or `None` to leave the
            temperature alone. Defaults to `None`.
        alpha: Callable `epoch -> alpha`, or `None`. Defaults to `None`.

    Raises:
        ValueError: If a schedule is not callable, both are `None`, or a
            schedule's value at epoch 0 (and, for a `LinearSchedule`, at its
            end) is out of range.

    Example:

    ```python
    distiller.fit(x, y, epochs=5, callbacks=[
        DistillationScheduler(temperature=LinearSchedule(8.0, 2.0, epochs=4))])
    ```
    """

    def __init__(self, temperature=None, alpha=None):
        super().__init__()
        _check_schedule("temperature", temperature)
        _check_schedule("alpha", alpha)
        if temperature is None and alpha is None:
            raise ValueError(
                "Invalid value for arguments `temperature` and `alpha`. Expected "
                "at least one schedule. Received: temperature=None, alpha=None"
            )
        for arg, schedule, check in (
            ("temperature", temperature, check_temperature),
            ("alpha", alpha, check_alpha),
        ):
            if schedule is not None:
                check_schedule_values(arg, schedule, check)
        self.temperature = temperature
        self.alpha = alpha

    def on_epoch_begin(self, epoch, logs=None):
        if not hasattr(self.model, "set_distillation_params"):
            raise ValueError(
                "Invalid value for `DistillationScheduler.model`. Expected a "
                "`keras_stability.Distiller`. Received: model of type "
                f"{type(self.model).__name__}"
            )
        self.model.set_distillation_params(
            temperature=None if self.temperature is None else self.temperature(epoch),
            alpha=None if self.alpha is None else self.alpha(epoch),
        )
