"""A Keras Tuner `HyperModel` whose diverging trials fail cleanly."""

import math

import keras
import keras_tuner

from keras_stability._checks import check_bool
from keras_stability._checks import check_number
from keras_stability._checks import check_str
from keras_stability._checks import invalid

__all__ = ["DivergenceDetector", "StableHyperModel"]


def _check_monitor(monitor):
    names = (monitor,) if isinstance(monitor, str) else monitor
    if (
        not isinstance(names, (list, tuple))
        or not names
        or not all(isinstance(n, str) and n for n in names)
    ):
        raise invalid(
            "monitor", monitor, "a metric name or a non-empty list or tuple of names"
        )
    return tuple(names)


class DivergenceDetector(keras.callbacks.Callback):
    """Stops training when a monitored loss becomes NaN, infinite or too large.

    Like `keras.callbacks.TerminateOnNaN`, but it remembers why it stopped
    (`reason`), watches validation metrics at epoch end too and can treat a
    loss above `threshold` as divergence.

    Args:
        monitor: Name, or list or tuple of names, of logged values to watch.
            Defaults to `("loss", "val_loss")`.
        threshold: A finite value above which the loss counts as diverged,
            or `None`. Defaults to `None`.

    Raises:
        ValueError: If `monitor` is not a name or a non-empty list of names,
            or `threshold` is neither `None` nor a finite number.

    Attributes:
        diverged: Whether training diverged in the last `fit`.
        reason: Text naming the metric, its value, the epoch and batch.
    """

    def __init__(self, monitor=("loss", "val_loss"), threshold=None):
        super().__init__()
        self.monitor = _check_monitor(monitor)
        self.threshold = check_number("threshold", threshold, allow_none=True)
        self.diverged = False
        self.reason = None
        self._epoch = 0

    def on_train_begin(self, logs=None):
        self.diverged = False
        self.reason = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def _check(self, logs, where):
        if self.diverged or not logs:
            return
        for name in self.monitor:
            value = logs.get(name)
            if value is None:
                continue
            value = float(value)
            bad = not math.isfinite(value)
            if not bad and self.threshold is not None and value > self.threshold:
                bad = True
            if bad:
                self.diverged = True
                self.reason = (
                    f"Training diverged: {name}={value} at epoch {self._epoch + 1}, "
                    f"{where}."
                )
                self.model.stop_training = True
                return

    def on_train_batch_end(self, batch, logs=None):
        self._check(logs, f"batch {batch + 1}")

    def on_epoch_end(self, epoch, logs=None):
        self._check(logs, "epoch end")


class StableHyperModel(keras_tuner.HyperModel):
    """A `keras_tuner.HyperModel` that records diverging trials as failed.

    A trial whose loss turns NaN (or infinite, or above `threshold`) stops at
    once and raises `keras_tuner.errors.FailedTrialError` with the reason;
    the tuner marks the trial `FAILED`, keeps its message, does not retry it
    and goes on with the next trial. Without this a NaN objective is either
    reported as a result or crashes the search. Keras Tuner still stops the
    search after `max_consecutive_failed_trials` failures in a row (3 by
    default, an argument of the tuner). Works with `RandomSearch`,
    `BayesianOptimization`, `Hyperband` and `GridSearch`.

    Either pass `build_fn(hp) -> compiled model` or subclass and override
    `build(hp)`, as with `keras_tuner.HyperModel`.

    Args:
        build_fn: Function `hp -> compiled keras.Model`, or `None` when
            subclassing. Defaults to `None`.
        monitor: Logged values to watch. Defaults to `("loss", "val_loss")`.
        threshold: Loss value above which a trial counts as diverged, or
            `None`. Defaults to `None`.
        name: Name of the hypermodel. Defaults to `None`.
        tunable: As in `keras_tuner.HyperModel`. Defaults to `True`.

    Raises:
        ValueError: If `build_fn` is neither callable nor `None`, on a bad
            `monitor` or `threshold` (as in `DivergenceDetector`), a `name`
            that is not a string or a `tunable` that is not a bool.

    Example:

    >>> import keras_tuner
    >>> def build(hp):
    ...     model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    ...     model.compile(optimizer="sgd", loss="mse")
    ...     return model
    >>> tuner = keras_tuner.RandomSearch(
    ...     StableHyperModel(build), objective="loss", max_trials=2,
    ...     directory="/tmp/kt", overwrite=True)
    """

    def __init__(
        self,
        build_fn=None,
        monitor=("loss", "val_loss"),
        threshold=None,
        name=None,
        tunable=True,
    ):
        if build_fn is not None and not callable(build_fn):
            raise invalid(
                "build_fn", build_fn, "a function `hp -> keras.Model` or None"
            )
        monitor = _check_monitor(monitor)
        threshold = check_number("threshold", threshold, allow_none=True)
        name = check_str("name", name, allow_none=True)
        tunable = check_bool("tunable", tunable)
        super().__init__(name=name, tunable=tunable)
        self.build_fn = build_fn
        self.monitor = monitor
        self.threshold = threshold

    def build(self, hp):
        if self.build_fn is None:
            raise NotImplementedError(
                "Pass `build_fn` to StableHyperModel or override `build(hp)`."
            )
        return self.build_fn(hp)

    def fit(self, hp, model, *args, **kwargs):
        """Fits `model` and raises `FailedTrialError` if training diverged.

        Args:
            hp: The trial's `keras_tuner.HyperParameters`.
            model: The model returned by `build`.
            *args: Arguments of `model.fit`.
            **kwargs: Keyword arguments of `model.fit`.

        Returns:
            The `History` of `model.fit`.

        Raises:
            keras_tuner.errors.FailedTrialError: If a monitored value became
                NaN, infinite or exceeded `threshold`.
        """
        detector = DivergenceDetector(self.monitor, self.threshold)
        kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + [detector]
        history = model.fit(*args, **kwargs)
        if detector.diverged:
            raise keras_tuner.errors.FailedTrialError(
                f"{detector.reason} Hyperparameters: {hp.values}"
            )
        return history
