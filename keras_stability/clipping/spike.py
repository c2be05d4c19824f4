"""Spike skipping: reject a step whose gradient norm is an outlier.

`SpikeSkipping`: OLMo's rule (mean + z standard deviations of the recent
norms). `RobustSpikeSkipping`: the robust rule of `GradientExplosionDetector`
(median and interquartile range of the logs of the recent norms, and a floor
on the ratio to the median), which it skips in-graph by default.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_stability import _keras_internals
from keras_stability._checks import check_int
from keras_stability._checks import check_number
from keras_stability._checks import check_positive
from keras_stability._checks import check_positive_int
from keras_stability._checks import invalid
from keras_stability.clipping.base import _scalar_variable
from keras_stability.clipping.base import check_buffer
from keras_stability.clipping.base import check_count
from keras_stability.clipping.base import check_tensor

__all__ = ["RobustSpikeSkipping", "SpikeSkipping", "robust_spike_step", "spike_step"]


def spike_step(
    norm, history, count, consecutive, z_threshold, min_samples, max_consecutive
):
    """One spike-detection step over a ring buffer of accepted norms (pure).

    The mean and (unbiased) standard deviation are taken over the last
    `min(count, window)` recorded norms, the current one excluded. The step is
    a spike when at least `min_samples` norms are recorded and
    `norm > mean + z_threshold * std`. Spikes are not recorded, so they cannot
    drag the statistics up; after `max_consecutive` spikes in a row the next
    one is accepted (and recorded) so a lasting change of scale is learnt
    instead of skipping forever.

    Args:
        norm: Float32 scalar, this step's pre-clip global norm.
        history: 1-D float32 ring buffer of size `window`.
        count: Int32 scalar, norms recorded so far (may exceed the window).
        consecutive: Int32 scalar, spikes skipped in a row so far.
        z_threshold: Positive float, in standard deviations.
        min_samples: Int >= 1, recorded norms needed before acting.
        max_consecutive: Int >= 1, spikes in a row after which one is
            accepted.

    Returns:
        Tuple `(is_spike, (history, count, consecutive))` with the state to
        commit when the step is finite and not skipped for another reason.

    Raises:
        ValueError: If an argument is of the wrong kind or out of range.
    """
    norm, history, count, consecutive, z_threshold, min_samples, max_consecutive = (
        _checked(
            norm, history, count, consecutive, z_threshold, min_samples, max_consecutive
        )
    )
    norm = ops.cast(norm, "float32")
    window = history.shape[0]
    count = ops.cast(count, "int32")
    n = ops.minimum(count, window)
    valid = ops.less(ops.arange(window, dtype="int32"), n)
    n_f = ops.cast(ops.maximum(n, 1), "float32")
    mean = ops.sum(ops.where(valid, history, 0.0)) / n_f
    sq = ops.sum(ops.where(valid, ops.square(history - mean), 0.0))
    std = ops.sqrt(sq / ops.maximum(n_f - 1.0, 1.0))
    outlier = ops.logical_and(
        ops.greater_equal(n, min_samples), ops.greater(norm, mean + z_threshold * std)
    )
    spike = ops.logical_and(outlier, ops.less(consecutive, max_consecutive))
    return spike, _advance(
        spike, ops.logical_not(spike), norm, history, count, consecutive
    )


def _checked(
    norm, history, count, consecutive, z_threshold, min_samples, max_consecutive
):
    """The arguments both spike steps share, validated."""
    return (
        check_tensor("norm", norm),
        check_buffer("history", history),
        check_count("count", count),
        check_count("consecutive", consecutive),
        check_positive("z_threshold", z_threshold),
        check_positive_int("min_samples", min_samples),
        check_positive_int("max_consecutive", max_consecutive),
    )


def _advance(spike, record, value, history, count, consecutive):
    """The state after a step: `value` written at the ring buffer's next slot
    and `count` advanced if `record`; `consecutive` counts spikes in a row."""
    window = history.shape[0]
    slot = ops.mod(count, window)
    new_history = ops.where(
        ops.logical_and(record, ops.equal(np.arange(window, dtype="int32"), slot)),
        value,
        history,
    )
    new_count = ops.where(record, count + 1, count)
    new_consecutive = ops.where(spike, consecutive + 1, 0)
    return new_history, new_count, new_consecutive


@keras.saving.register_keras_serializable(package="keras_stability")
class SpikeSkipping:
    """Settings and state of `GuardedOptimizer(skip_spikes=...)`.

    A step is skipped when its pre-clip global gradient norm exceeds the mean
    of a rolling window of recent accepted norms by more than `z_threshold`
    standard deviations (OLMo's defaults: 128 steps, 6 sigma, 20 samples).
    See `spike_step`.

    Args:
        window: Integer >= 2, rolling window length. Defaults to `128`.
        z_threshold: Positive float, in standard deviations. Defaults to `6.0`.
        min_samples: Integer >= 2, recorded norms needed before acting.
            Defaults to `20`.
        max_consecutive: Integer >= 1, spikes skipped in a row after which
            the next one is applied and recorded. Defaults to `10`.
    """

    def __init__(self, window=128, z_threshold=6.0, min_samples=20, max_consecutive=10):
        window = check_int("window", window, low=2)
        z_threshold = check_positive("z_threshold", z_threshold)
        min_samples = check_int("min_samples", min_samples, low=2)
        max_consecutive = check_positive_int("max_consecutive", max_consecutive)
        if min_samples > window:
            raise invalid("min_samples", min_samples, f"an integer <= window={window}")
        self.window = window
        self.z_threshold = z_threshold
        self.min_samples = min_samples
        self.max_consecutive = max_consecutive
        self.state_variables = []

    def build(self, optimizer):
        self.history = _scalar_variable(
            optimizer, "spike_history", shape=(self.window,)
        )
        self.count = _scalar_variable(optimizer, "spike_count", 0, "int32")
        self.consecutive = _scalar_variable(optimizer, "spike_consecutive", 0, "int32")
        self.state_variables = [self.history, self.count, self.consecutive]

    def _read_state(self):
        """Each state variable's value, read once (one op each in the step)."""
        return [_keras_internals.read(v) for v in self.state_variables]

    def detect(self, norm):
        """Returns `(is_spike, new_state)` without assigning anything."""
        read = self._read_state()
        history, count, consecutive = read
        spike, state = spike_step(
            norm,
            history,
            count,
            consecutive,
            self.z_threshold,
            self.min_samples,
            self.max_consecutive,
        )
        return spike, (list(state), read)

    def commit(self, new_state, accept):
        """Assigns `detect`'s new state where `accept`, else keeps the values
        `detect` read (no second read of the variables)."""
        values, read = new_state
        for variable, value, old in zip(
            self.state_variables, values, read, strict=True
        ):
            variable.assign(ops.where(accept, ops.cast(value, variable.dtype), old))

    def get_config(self):
        return {
            "window": self.window,
            "z_threshold": self.z_threshold,
            "min_samples": self.min_samples,
            "max_consecutive": self.max_consecutive,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def robust_spike_step(
    norm,
    history,
    count,
    consecutive,
    z_threshold,
    min_samples,
    max_consecutive,
    min_ratio,
    early_ratio=None,
    peak=None,
    peak_ratio=None,
):
    """One robust spike-detection step over a ring buffer of log norms (pure).

    `history` holds the logs of the last accepted positive norms. Once at
    least `min_samples` are recorded, the step is a spike when its log norm
    exceeds their median by more than `z_threshold` robust standard
    deviations (the interquartile range / 1.349, quartiles by nearest rank
    below: one sort) and by at least `log(min_ratio)` (the norm is
    `min_ratio` times their median or more): a log-space score is robust to
    heavy-tailed small-batch noise, and the ratio floor keeps a series with a
    tiny spread (full-batch training) from flagging ordinary changes. Before
    `min_samples`, with `early_ratio`, a norm `early_ratio` times the median
    of at least `EARLY_SAMPLES` recorded ones, and times the first one, is a
    spike (a corrupt batch in the first steps); otherwise nothing is. With
    `peak_ratio`, a spike must also be `peak_ratio` times the largest norm
    recorded so far (`peak`, in log space): an untrained model's first
    gradients set the scale of a misfit sample's, so a rare but genuine
    example (a 1% class at a small batch size: 1000x the median of well-fit
    batches, no more than a few times the first norms) is applied, while a
    corrupt batch (inputs x1000: 1000x every earlier norm) is not. Without
    it, a skipped rare example is never recorded nor learnt, and every later
    one is skipped too. Spikes are not recorded; after `max_consecutive`
    spikes in a row the next one is accepted and recorded, so a lasting
    change of scale is learnt instead of skipped forever.

    Args:
        norm: Float32 scalar, this step's pre-clip global norm.
        history: 1-D float32 ring buffer of size `window` (logs of norms).
        count: Int32 scalar, norms recorded so far (may exceed the window).
        consecutive: Int32 scalar, spikes skipped in a row so far.
        z_threshold: Positive float, in robust standard deviations.
        min_samples: Int >= 1, recorded norms needed before acting.
        max_consecutive: Int >= 1, spikes in a row after which one is
            accepted.
        min_ratio: Float > 1, the least multiple of the median that is a
            spike.
        early_ratio: `None`, or a float > 1: the least multiple of the
            median that is a spike before `min_samples` norms are recorded.
            Defaults to `None`.
        peak: `None`, or a float32 scalar: the log of the largest norm
            recorded so far (`PEAK_NONE` before the first). Defaults to
            `None`.
        peak_ratio: `None`, or a float > 1: the least multiple of the
            largest recorded norm that is a spike (needs `peak`). Defaults to
            `None`.

    Returns:
        Tuple `(is_spike, (history, count, consecutive))`, or with `peak`
        `(is_spike, (history, count, consecutive, peak))`, with the state to
        commit when the step is finite and not skipped for another reason.

    Raises:
        ValueError: If an argument is of the wrong kind or out of range.
    """
    norm, history, count, consecutive, z_threshold, min_samples, max_consecutive = (
        _checked(
            norm, history, count, consecutive, z_threshold, min_samples, max_consecutive
        )
    )
    min_ratio = _check_min_ratio(min_ratio)
    early_ratio = _check_early_ratio(early_ratio)
    peak_ratio = _check_peak_ratio(peak_ratio)
    if peak is not None:
        peak = check_tensor("peak", peak)
    elif peak_ratio is not None:
        raise invalid(
            "peak", peak, "the log of the largest recorded norm with `peak_ratio`"
        )
    norm = ops.cast(norm, "float32")
    history = ops.cast(history, "float32")
    window = history.shape[0]
    count = ops.cast(count, "int32")
    n = ops.minimum(count, window)
    positive = ops.greater(norm, 0.0)
    log_norm = ops.log(ops.where(positive, norm, 1.0))

    def robust_outlier():
        # Quartiles of the recorded logs by nearest rank below: one sort,
        # the unrecorded slots sorted to the end.
        positions = np.arange(window, dtype="int32")
        ordered = ops.sort(ops.where(ops.less(positions, n), history, np.float32(1e30)))
        ranks = ops.floor_divide(
            ops.maximum(n - 1, 0) * np.array([1, 2, 3], "int32"), np.int32(4)
        )
        low, center, high = ops.unstack(ops.take(ordered, ranks), 3)
        threshold = ops.maximum(
            np.float32(z_threshold / IQR_SCALE) * (high - low),
            np.float32(math.log(min_ratio)),
        )
        excess = ops.where(positive, log_norm - center, np.float32(-1.0))
        outlier = ops.logical_and(
            ops.greater_equal(n, min_samples), ops.greater(excess, threshold)
        )
        if early_ratio is not None:
            early = ops.logical_and(
                ops.logical_and(
                    ops.greater_equal(n, EARLY_SAMPLES), ops.less(n, min_samples)
                ),
                # Also against the first norm: at batch size 1 the median of
                # a few per-sample norms may be ~0 (well-fit samples), and an
                # ordinary misfit sample is then "100x" it.
                ops.greater(
                    excess - ops.maximum(history[0] - center, 0.0),
                    np.float32(math.log(early_ratio)),
                ),
            )
            outlier = ops.logical_or(outlier, early)
        return outlier

    if peak_ratio is None:
        outlier = robust_outlier()
    else:
        # A spike is `peak_ratio` times the largest recorded norm: a
        # necessary condition of two ops. The window's quartiles (a sort and
        # some 40 ops) are computed only when it holds, in a `cond`; the
        # result is the same, and on most steps they are not computed.
        above_peak = ops.greater(
            log_norm - ops.cast(peak, "float32"), np.float32(math.log(peak_ratio))
        )
        outlier = ops.cond(above_peak, robust_outlier, lambda: ops.zeros((), "bool"))
    spike = ops.logical_and(outlier, ops.less(consecutive, max_consecutive))
    record = ops.logical_and(ops.logical_not(spike), positive)
    state = _advance(spike, record, log_norm, history, count, consecutive)
    if peak is None:
        return spike, state
    peak = ops.cast(peak, "float32")
    return spike, (*state, ops.where(record, ops.maximum(peak, log_norm), peak))


# The interquartile range of a normal sample is 1.349 standard deviations.
IQR_SCALE = 1.349


def _check_min_ratio(value):
    return check_number("min_ratio", value, low=1.0, low_open=True)


def _check_peak_ratio(value):
    return check_number(
        "peak_ratio",
        value,
        low=1.0,
        low_open=True,
        allow_none=True,
        what="None or a number > 1",
    )


# `peak` before any norm is recorded: below the log of every float32 norm.
PEAK_NONE = -1e30


def _check_early_ratio(value):
    return check_number(
        "early_ratio",
        value,
        low=1.0,
        low_open=True,
        allow_none=True,
        what="None or a number > 1",
    )


# Before `min_samples`, `early_ratio` judges a norm against the median of at
# least this many recorded ones.
EARLY_SAMPLES = 4


@keras.saving.register_keras_serializable(package="keras_stability")
class RobustSpikeSkipping(SpikeSkipping):
    """Skips a step whose gradient norm is a robust outlier (log space).

    `GradientExplosionDetector`'s in-graph spike rule (its default): a step
    is skipped when its pre-clip global gradient norm is at least
    `min_ratio` times the median of the last `window` accepted norms and more
    than `z_threshold` robust standard deviations above it in log space
    (median and interquartile range / 1.349 of the logs). Unlike
    `SpikeSkipping`'s mean and standard deviation, heavy-tailed small-batch
    noise does not trip it, and one huge norm cannot inflate the statistics
    that judge the next. Before `min_samples` norms are recorded, only a
    norm `early_ratio` times the median of those recorded (and the first) is
    skipped. Either way a skipped norm is also `peak_ratio` times the largest
    norm applied so far: a rare genuine example is applied and learnt, not
    skipped every time it comes back. Training from scratch, such an example
    (a 1% class at batch size 4: 100x the median of well-fit batches) is no
    larger than the untrained model's first norms; fine-tuning a fit model
    on a new rare class, its first examples are 15-50x the largest norm
    applied before them, while a corrupt batch (inputs x1000) is 650-1600x.
    See `robust_spike_step`.

    Args:
        window: Integer >= 2, rolling window length. Defaults to `128`.
        z_threshold: Positive float, in robust standard deviations.
            Defaults to `6.0`.
        min_samples: Integer >= 2, recorded norms needed before acting.
            Defaults to `20`.
        max_consecutive: Integer >= 1, spikes skipped in a row after which
            the next one is applied and recorded. Defaults to `3`.
        min_ratio: Number > 1, the least multiple of the median norm that
            is a spike. Defaults to `10.0`.
        early_ratio: `None`, or a number > 1: before `min_samples` norms are
            recorded (from the 5th), a norm `early_ratio` times the median of
            those recorded and times the first is a spike (a corrupt batch in
            the first steps, which would otherwise be applied). Defaults to
            `100.0`.
        peak_ratio: `None`, or a number > 1: a spike is also at least this
            many times the largest norm applied so far. Defaults to `100.0`.
    """

    def __init__(
        self,
        window=128,
        z_threshold=6.0,
        min_samples=20,
        max_consecutive=3,
        min_ratio=10.0,
        early_ratio=100.0,
        peak_ratio=100.0,
    ):
        super().__init__(
            window=window,
            z_threshold=z_threshold,
            min_samples=min_samples,
            max_consecutive=max_consecutive,
        )
        self.min_ratio = _check_min_ratio(min_ratio)
        self.early_ratio = _check_early_ratio(early_ratio)
        self.peak_ratio = _check_peak_ratio(peak_ratio)

    def build(self, optimizer):
        super().build(optimizer)
        if self.peak_ratio is not None:
            self.peak = _scalar_variable(optimizer, "spike_peak", PEAK_NONE)
            self.state_variables.append(self.peak)

    def detect(self, norm):
        """Returns `(is_spike, new_state)` without assigning anything.

        `history` holds the logs of the accepted norms.
        """
        read = self._read_state()
        history, count, consecutive, *peak = read
        spike, state = robust_spike_step(
            norm,
            history,
            count,
            consecutive,
            self.z_threshold,
            self.min_samples,
            self.max_consecutive,
            self.min_ratio,
            self.early_ratio,
            peak[0] if peak else None,
            self.peak_ratio,
        )
        return spike, (list(state), read)

    def get_config(self):
        return {
            **super().get_config(),
            "min_ratio": self.min_ratio,
            "early_ratio": self.early_ratio,
            "peak_ratio": self.peak_ratio,
        }
