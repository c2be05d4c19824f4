"""`find_learning_rate`: the learning-rate range test (fastai `lr_find`, Lightning `lr_find`).

Trains for a few steps while the learning rate grows exponentially from
`start_lr` to `end_lr`, records the loss of every step, stops once the loss
has clearly diverged, then puts the model's weights, the optimizer's state and
its learning rate back exactly as they were. The curve of loss against rate
says which rates learn and which blow up; `suggestion` reads one rate off it.

Two curves are kept. The stop rule and fastai's `valley` use the smoothed loss
fastai and Lightning use (a bias-corrected exponential average, beta 0.98).
`minimum` (the default) and `steepest` read a centred running median over half
a decade of rate instead: the exponential average is causal, and over a
100-step test its window (about 50 steps) spans some four decades of rate, so
its lowest point lands one to one and a half decades past the rate where the
loss was lowest. The median has no lag and ignores the spikes of a diverging
tail.

Reference: Leslie N. Smith, "Cyclical Learning Rates for Training Neural
Networks", WACV 2017 (arXiv 1506.01186), section 3.3.
"""

import dataclasses
import math

import keras
import numpy as np
import tensorflow as tf

from keras_stability import _checks
from keras_stability import _keras_internals

__all__ = [
    "LearningRateRange",
    "find_learning_rate",
    "running_median",
    "suggest_learning_rate",
]

SUGGESTIONS = ("valley", "steepest", "minimum")

# Width of the centred running median `minimum` and `steepest` read, in
# decades of rate (7 steps of the default test, which takes 12.4 a decade).
SMOOTHING_DECADES = 0.5


@dataclasses.dataclass
class LearningRateRange:
    """What `find_learning_rate` measured.

    Attributes:
        learning_rates: The rate of each recorded step (increasing).
        losses: The training loss of each step.
        smoothed_losses: `losses` after bias-corrected exponential smoothing
            (`smoothing`), as fastai and Lightning plot them; the stop rule
            and `valley` read it. It lags: its lowest point comes after the
            loss's.
        suggestion: The suggested learning rate (`nan` if too few steps).
        method: How `suggestion` was read off the curve.
        stopped_early: Whether the test stopped because the loss diverged.
        median_losses: `losses` after a centred running median over half a
            decade of rate (`running_median`), without lag; `minimum` and
            `steepest` read it.
    """

    learning_rates: np.ndarray
    losses: np.ndarray
    smoothed_losses: np.ndarray
    suggestion: float
    method: str
    stopped_early: bool
    median_losses: np.ndarray = None

    def plot(self, ax=None):
        """Plots the loss against learning rate (log axis) and marks the suggestion.

        Draws the raw loss, the exponential average and the running median.

        Args:
            ax: A matplotlib `Axes` to draw on; a new figure if `None`.
                Defaults to `None`.

        Returns:
            The matplotlib `Axes`.
        """
        if ax is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.learning_rates, self.losses, alpha=0.3, label="loss")
        ax.plot(
            self.learning_rates,
            self.smoothed_losses,
            alpha=0.6,
            label="exponential average (lags)",
        )
        if self.median_losses is not None:
            ax.plot(self.learning_rates, self.median_losses, label="running median")
        if math.isfinite(self.suggestion):
            ax.axvline(
                self.suggestion,
                color="tab:red",
                linestyle="--",
                label=f"suggestion ({self.method}): {self.suggestion:.2g}",
            )
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        curve = (
            self.smoothed_losses if self.median_losses is None else self.median_losses
        )
        finite = curve[np.isfinite(curve)]
        if finite.size:
            low, start = float(finite.min()), float(finite[0])
            ax.set_ylim(
                low - 0.1 * abs(start - low), start + 0.5 * abs(start - low) + 1e-12
            )
        ax.legend()
        return ax


def suggest_learning_rate(learning_rates, smoothed_losses, method="valley"):
    """Reads a learning rate off a range-test curve.

    `"minimum"` and `"steepest"` read positions on the rate axis, so they
    need a curve without lag, such as `running_median`'s: on the exponential
    average they land one to one and a half decades too high. `"valley"`
    (fastai's) sits halfway, in steps, through the longest run over which
    the loss keeps falling, so on a log axis halfway between where the loss
    starts to fall and its lowest point; fastai reads it off the exponential
    average. Where the loss starts to fall tells little: with Adam it falls
    from the first small rates that shave the initial loss (the battery's
    char LM: from about 2e-6, four decades below its lowest loss), and the
    middle then lands 3-5x below a grid search's best rate.

    Args:
        learning_rates: Increasing learning rates, one per step.
        smoothed_losses: The smoothed loss at each rate.
        method: `"valley"` (fastai's: the middle of the longest stretch over
            which the loss keeps falling), `"steepest"` (where the loss falls
            fastest per decade of rate, as Lightning suggests) or `"minimum"`
            (fastai's: a tenth of the rate at the lowest loss, the rule of
            thumb "an order of magnitude below the minimum"). Defaults to
            `"valley"`.

    Returns:
        The suggested rate as a float, `nan` with fewer than 5 finite points.
    """
    _checks.check_choice("method", method, SUGGESTIONS)
    lrs = np.asarray(learning_rates, dtype="float64")
    losses = np.asarray(smoothed_losses, dtype="float64")
    keep = np.isfinite(losses)
    lrs, losses = lrs[keep], losses[keep]
    if lrs.size < 5:
        return math.nan
    if method == "minimum":
        return float(lrs[int(np.argmin(losses))] / 10.0)
    if method == "steepest":
        end = int(np.argmin(losses)) + 1
        if end < 3:
            return float(lrs[0])
        slope = np.gradient(losses[:end], np.log(lrs[:end]))
        return float(lrs[int(np.argmin(slope))])
    # fastai's `valley`: the longest decreasing subsequence of the loss; the
    # suggestion sits a third plus a sixth of the way through it (halfway).
    n = losses.size
    lds = np.ones(n, dtype=int)
    max_start, max_end = 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    index = max_start + int(sections) + int(sections / 2)
    return float(lrs[min(index, n - 1)])


def running_median(learning_rates, losses, decades=SMOOTHING_DECADES):
    """Smooths a range-test curve with a centred running median, without lag.

    The window spans `decades` of rate (an odd number of steps, at least 3);
    at the ends it is filled with the end values. A non-finite loss counts as
    `inf` (a diverged step), so the median skips lone spikes and marks a
    diverged tail as `inf`.

    Args:
        learning_rates: Increasing learning rates, exponentially spaced, one
            per step.
        losses: The raw loss at each rate.
        decades: Width of the window in decades of rate. Defaults to `0.5`.

    Returns:
        The smoothed losses, a float64 array as long as `losses`.
    """
    decades = _checks.check_positive("decades", decades)
    lrs = np.asarray(learning_rates, dtype="float64")
    values = np.asarray(losses, dtype="float64")
    values = np.where(np.isnan(values), np.inf, values)
    if values.size < 3:
        return values
    steps_per_decade = (values.size - 1) / max(np.log10(lrs[-1] / lrs[0]), 1e-12)
    half = max(1, int(round(decades * steps_per_decade / 2)))
    padded = np.pad(values, half, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1)
    return np.median(windows, axis=1)


class _ConstantRate(keras.optimizers.schedules.LearningRateSchedule):
    """A schedule returning a variable, so the test can set any rate each step."""

    def __init__(self, variable):
        self.variable = variable

    def __call__(self, step):
        return self.variable

    def get_config(self):
        return {}


class _RangeTest(keras.callbacks.Callback):
    def __init__(self, rates, set_rate, smoothing, divergence_factor):
        super().__init__()
        self.rates = rates
        self.set_rate = set_rate
        self.smoothing = smoothing
        self.divergence_factor = divergence_factor
        self.losses = []
        self.smoothed = []
        self.stopped_early = False
        self.missing_loss = False
        self._average = 0.0
        self._best = math.inf

    def on_epoch_begin(self, epoch, logs=None):
        self.set_rate(self.rates[epoch])

    def on_epoch_end(self, epoch, logs=None):
        # One update per epoch: the epoch's loss is its batches' mean.
        if "loss" not in (logs or {}):
            self.missing_loss = True
            self.model.stop_training = True
            return
        loss = float(logs["loss"])
        self.losses.append(loss)
        beta = self.smoothing
        self._average = beta * self._average + (1 - beta) * loss
        smooth = self._average / (1 - beta ** (epoch + 1))
        self.smoothed.append(smooth)
        if not math.isfinite(smooth) or (
            epoch > 0 and smooth > self.divergence_factor * self._best
        ):
            self.stopped_early = True
            self.model.stop_training = True
        self._best = min(self._best, smooth)


def find_learning_rate(
    model,
    x,
    y=None,
    batch_size=None,
    start_lr=1e-7,
    end_lr=10.0,
    num_steps=100,
    smoothing=0.98,
    divergence_factor=4.0,
    method="minimum",
    verbose=0,
):
    """Runs a learning-rate range test and suggests a learning rate.

    The model trains for at most `num_steps` steps on `x` (and `y`) with the
    learning rate growing exponentially from `start_lr` to `end_lr`, one
    rate per step, and the loss of each step is recorded. The test stops once
    the exponentially smoothed loss (`smoothing`, as fastai and Lightning) is
    non-finite or above `divergence_factor` times its best value. Then the
    model's weights, the optimizer's variables (iterations, moments, ...) and
    learning rate (a constant or a `LearningRateSchedule`) are restored
    exactly, so the model trains afterwards as if the test had never run.

    The first tenth of the steps is left out of the suggestion, as fastai
    does. By default the suggestion is a tenth of the rate at the lowest loss
    (fastai's `minimum`), read off a centred running median over half a
    decade of rate (`running_median`) rather than the lagging exponential
    average. fastai's `valley` (`method="valley"`, read off the exponential
    average as fastai does) was the default before; it suggested 3-5x below
    the best rate of a grid search on a small char LM (see
    `suggest_learning_rate`).

    With `gradient_accumulation_steps` (N) on the optimizer, each rate gets
    N micro-batches, one update: the recorded loss is their mean (the loss of
    the update's whole batch), and the test starts at the beginning of an
    accumulation window (the accumulators emptied; restored afterwards).

    Too high a rate often makes the loss plateau rather than explode, which
    no detector can tell from slow learning; this test answers "which rate?"
    before the run.

    Args:
        model: A compiled `keras.Model` (a wrapped optimizer such as
            `GuardedOptimizer` or `LossScaleOptimizer` is fine). An unbuilt
            model (a `Sequential` without `keras.Input`) is built from the
            first batches of `x`, as `fit` builds it; the built, untrained
            weights are what the test restores.
        x: Training inputs, as `model.fit` takes them (arrays, a
            `tf.data.Dataset` of `(x, y)` batches, ...). A dataset is repeated.
        y: Training targets, if `x` holds only the inputs. Defaults to `None`.
        batch_size: Batch size for array inputs; Keras' default (32) if
            `None`. Defaults to `None`.
        start_lr: First learning rate. Defaults to `1e-7`.
        end_lr: Last learning rate. Defaults to `10.0`.
        num_steps: Steps of the test (one rate each). Defaults to `100`.
        smoothing: Exponential smoothing factor of the loss that the stop rule
            watches, in [0, 1). Defaults to `0.98`.
        divergence_factor: Stop once the smoothed loss exceeds this multiple
            of its best. Defaults to `4.0`.
        method: How to read the suggestion off the curve: `"minimum"`,
            `"valley"` or `"steepest"` (see `suggest_learning_rate`).
            Defaults to `"minimum"`.
        verbose: 0 silent, 1 prints the suggestion. Defaults to `0`.

    Returns:
        A `LearningRateRange`: rates, losses, the suggestion; `.plot()` draws
        the curve.

    Raises:
        ValueError: For bad arguments, an uncompiled model, or a train step
            that logs no `loss`.

    Example:

    ```python
    result = keras_stability.tuning.find_learning_rate(model, x_train, y_train)
    result.plot()
    model.optimizer.learning_rate = result.suggestion
    model.fit(x_train, y_train, epochs=10)
    ```
    """
    if not isinstance(model, keras.Model):
        raise _checks.invalid("model", model, "a compiled `keras.Model`")
    if getattr(model, "optimizer", None) is None:
        raise _checks.invalid(
            "model", model.name, "a compiled model (call `model.compile` first)"
        )
    start_lr = _checks.check_positive("start_lr", start_lr)
    end_lr = _checks.check_positive("end_lr", end_lr)
    if end_lr <= start_lr:
        raise _checks.invalid("end_lr", end_lr, f"a number > start_lr={start_lr:g}")
    num_steps = _checks.check_int("num_steps", num_steps, low=5)
    batch_size = _checks.check_positive_int("batch_size", batch_size, allow_none=True)
    smoothing = _checks.check_number(
        "smoothing", smoothing, low=0.0, high=1.0, high_open=True
    )
    divergence_factor = _checks.check_number(
        "divergence_factor", divergence_factor, low=1.0, low_open=True
    )
    _checks.check_choice("method", method, SUGGESTIONS)
    verbose = _checks.check_verbose("verbose", verbose)

    if not all(layer.built for layer in _keras_internals.flatten_layers(model)):
        # Build it as `fit` would on its first call, from the data's batches,
        # so the weights saved below are those the test starts from.
        x = _keras_internals.build_from_data(model, x, y, batch_size)
    optimizer = model.optimizer
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    # The innermost optimizer owns the rate (wrappers delegate to it) and the
    # gradient accumulation.
    inner = optimizer
    while hasattr(inner, "inner_optimizer"):
        inner = inner.inner_optimizer
    weights = [v.numpy() for v in model.variables]
    slots = [v.numpy() for v in optimizer.variables]  # wrappers list the inner's
    history = getattr(model, "history", None)
    accumulation = getattr(inner, "gradient_accumulation_steps", None) or 1
    if accumulation > 1:
        # One rate per update: each epoch's N micro-batches make one window.
        iterations = _keras_internals.raw_iterations(inner)
        iterations.assign(iterations - iterations % accumulation)
        for accumulator in _keras_internals.gradient_accumulators(inner):
            accumulator.assign(keras.ops.zeros_like(accumulator))

    # A constant rate is a variable: assign it each step, restore its value.
    # A schedule is swapped for one that returns a variable, then put back.
    original_rate = inner._learning_rate
    swapped = not isinstance(original_rate, keras.Variable)
    if swapped:
        rate = keras.Variable(
            start_lr, dtype="float32", trainable=False, name="range_lr"
        )
        inner.learning_rate = _ConstantRate(rate)
        model.make_train_function(force=True)
    else:
        rate = original_rate

    rates = np.geomspace(start_lr, end_lr, num_steps)
    test = _RangeTest(rates, rate.assign, smoothing, divergence_factor)
    is_dataset = isinstance(x, tf.data.Dataset)
    if is_dataset:
        x = x.repeat()
    try:
        model.fit(
            x,
            y,
            batch_size=batch_size,
            epochs=num_steps,
            steps_per_epoch=accumulation,
            shuffle=not is_dataset,
            callbacks=[test],
            verbose=0,
        )
    finally:
        if swapped:
            inner.learning_rate = original_rate
        for variable, value in zip(model.variables, weights, strict=True):
            variable.assign(value)
        for variable, value in zip(optimizer.variables, slots, strict=True):
            variable.assign(value)
        if swapped:
            model.make_train_function(force=True)
        model.reset_metrics()
        if history is not None:
            model.history = history
    if test.missing_loss:
        raise _checks.invalid(
            "model", model.name, "a train step whose logs include `loss`"
        )

    n = len(test.losses)
    losses = np.asarray(test.losses, dtype="float64")
    smoothed = np.asarray(test.smoothed, dtype="float64")
    median = running_median(rates[:n], losses)
    curve = smoothed if method == "valley" else median
    skip = num_steps // 10  # as fastai, the first tenth is left out
    result = LearningRateRange(
        learning_rates=rates[:n],
        losses=losses,
        smoothed_losses=smoothed,
        suggestion=suggest_learning_rate(rates[skip:n], curve[skip:], method),
        method=method,
        stopped_early=test.stopped_early,
        median_losses=median,
    )
    if verbose:
        _keras_internals.print_msg(
            f"find_learning_rate: {n} steps from {start_lr:g} to {rates[n - 1]:.3g}"
            f"{' (stopped: loss diverged)' if test.stopped_early else ''}; "
            f"suggested learning rate ({method}): {result.suggestion:.3g}"
        )
    return result
