"""Per-epoch schedules of the distillation temperature and `alpha`.

A schedule maps the epoch index (0-based) to a value. `DistillationScheduler`
is the Keras adapter: a callback that writes the scheduled values into the
`Distiller`'s `temperature` and `alpha` variables at the start of each epoch.
The values live in variables, so the compiled train step reads them without
retracing and a saved `.keras` file carries them. The `Distiller` reports
both in its logs, so `History` records them per epoch.
"""

import numbers

import keras

__all__ = ["DistillationScheduler", "LinearSchedule"]


@keras.saving.register_keras_serializable(package="keras_stability")
class LinearSchedule:
    """Linear ramp from `start` to `end` over `epochs` epochs, then constant.

    Args:
        start: Value at epoch 0.
        end: Value from epoch `epochs` on.
        epochs: Length of the ramp in epochs, a positive integer.

    Example:

    >>> schedule = LinearSchedule(start=8.0, end=2.0, epochs=3)
    >>> [schedule(e) for e in range(5)]
    [8.0, 6.0, 4.0, 2.0, 2.0]
    """

    def __init__(self, start, end, epochs):
        for arg, value in (("start", start), ("end", end)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(
                    f"Invalid value for argument `{arg}`. Expected a number. "
                    f"Received: {arg}={value!r}"
                )
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(
                "Invalid value for argument `epochs`. Expected a positive "
                f"integer. Received: epochs={epochs!r}"
            )
        self.start = float(start)
        self.end = float(end)
        self.epochs = epochs

    def __call__(self, epoch):
        fraction = min(max(epoch, 0), self.epochs) / self.epochs
        return self.start + (self.end - self.start) * fraction

    def get_config(self):
        return {"start": self.start, "end": self.end, "epochs": self.epochs}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _check_schedule(arg, value):
    if value is not None and not callable(value):
        raise ValueError(
            f"Invalid value for argument `{arg}`. Expected a callable "
            f"`epoch -> value` such as `LinearSchedule`, or None. Received: "
            f"{arg}={value!r}"
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
