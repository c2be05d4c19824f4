"""Pure numeric core of spike detection: a rolling z-score.

Used on the host by `GradientExplosionDetector` for the raw per-step loss
and the global gradient norm. Values judged spikes are not added to the
window, so a run of spikes does not drag the statistics up and hide itself.
"""

import collections
import math

import numpy as np

from keras_stability._checks import check_number
from keras_stability._checks import check_positive_int
from keras_stability._checks import invalid

__all__ = ["RobustZScore", "RollingZScore"]


class RollingZScore:
    """Rolling mean / standard deviation and the z-score of new values.

    Args:
        window: Number of accepted values kept. Defaults to `128`.
        z_threshold: z-score above which a value is a spike (the name
            `ZClip` uses). Defaults to `6.0`.
        min_samples: Values needed before the z-score is judged.
            Defaults to `20`.
        factor: If set, a value above `factor` times the (positive) median of
            the window is a spike too while the window holds fewer than
            `min_samples` values, when the z-score cannot judge yet; this
            catches a divergence in the first steps. Later the z-score alone
            judges, so a heavy-tailed series (a small loss with rare larger
            batches) is not flagged for being 10x its median. Defaults to `None`.

    Raises:
        ValueError: If `window` or `min_samples` is not a positive integer,
            `min_samples > window`, `z_threshold` is not positive or `factor`
            is neither `None` nor a number > 1.

    Example:

    >>> z = RollingZScore(window=8, z_threshold=3.0, min_samples=4)
    >>> [z.update(v) for v in [1.0, 1.1, 0.9, 1.0, 10.0, 1.05]]
    [False, False, False, False, True, False]
    """

    def __init__(self, window=128, z_threshold=6.0, min_samples=20, factor=None):
        window, min_samples, self.z_threshold = _check_window(
            window, min_samples, z_threshold
        )
        self.factor = check_number(
            "factor",
            factor,
            low=1.0,
            low_open=True,
            allow_none=True,
            what="None or a number > 1",
        )
        self.window = window
        self.min_samples = min_samples
        self.reset()

    def reset(self):
        self.values = collections.deque(maxlen=self.window)
        self._sum = 0.0
        self._sumsq = 0.0
        self._appends = 0
        self._median = math.nan

    def zscore(self, value):
        """z-score of `value` against the window (0 before `min_samples`)."""
        n = len(self.values)
        if n < self.min_samples:
            return 0.0
        mean = self._sum / n
        std = math.sqrt(max(self._sumsq / n - mean * mean, 0.0))
        # A floor on the spread keeps a flat history from flagging noise.
        std = max(std, 1e-3 * abs(mean), 1e-12)
        return float((value - mean) / std)

    def median(self):
        """Median of the window (NaN when empty); refreshed every 8 values."""
        if self.values and math.isnan(self._median):
            self._median = float(np.median(self.values))
        return self._median

    def _append(self, value):
        if len(self.values) == self.window:
            old = self.values[0]
            self._sum -= old
            self._sumsq -= old * old
        self.values.append(value)
        self._sum += value
        self._sumsq += value * value
        self._appends += 1
        if self._appends % 8 == 0 or len(self.values) < 8:
            self._median = math.nan

    def update(self, value):
        """Returns whether `value` is a spike; non-spikes join the window.

        Non-finite values are spikes and never join the window.
        """
        value = float(value)
        if not math.isfinite(value):
            return True
        spike = self.zscore(value) > self.z_threshold
        if self.factor is not None and 0 < len(self.values) < self.min_samples:
            median = self.median()
            spike = spike or (median > 0 and value > self.factor * median)
        if not spike:
            self._append(value)
        return spike


# Scale of the median absolute deviation of a normal sample: MAD * 1.4826
# estimates its standard deviation.
MAD_SCALE = 1.4826


class RobustZScore:
    """Robust z-score of new values in log space: median / MAD over a window.

    A value's score is `(log(value) - median) / (1.4826 * MAD)` over the
    logs of the last `window` accepted values: a multiplicative scale,
    robust to heavy-tailed small-batch noise (one batch 10x the median of a
    loss near zero scores low when such batches are common) and meaningful
    near zero (no value is "10x" anything by noise alone). The spread has a
    floor of `min_spread` (in log units), so a flat series does not flag
    every wobble. Values judged spikes are not added, so a run of spikes does
    not hide itself.

    Args:
        window: Number of accepted values kept. Defaults to `128`.
        z_threshold: Score above which a value is a spike. Defaults to `6.0`.
        min_samples: Values needed before the score is judged.
            Defaults to `20`.
        min_spread: Floor of the spread, in log units (0.05: 5%).
            Defaults to `0.05`.

    Raises:
        ValueError: If `window` or `min_samples` is not a positive integer,
            `min_samples > window`, or `z_threshold` or `min_spread` is not
            positive.

    Example:

    >>> z = RobustZScore(window=8, z_threshold=6.0, min_samples=4)
    >>> [z.update(v) for v in [1.0, 1.3, 0.8, 1.1, 10.0, 1.05]]
    [False, False, False, False, True, False]
    """

    def __init__(self, window=128, z_threshold=6.0, min_samples=20, min_spread=0.05):
        window, min_samples, self.z_threshold = _check_window(
            window, min_samples, z_threshold
        )
        self.min_spread = check_number("min_spread", min_spread, low=0.0, low_open=True)
        self.window = window
        self.min_samples = min_samples
        self.reset()

    def reset(self):
        self.values = collections.deque(maxlen=self.window)
        self._logs = collections.deque(maxlen=self.window)
        self._appends = 0
        self._stats = None

    def get_state(self):
        """The window as a JSON-able dict (`set_state`)."""
        return {
            "values": list(self.values),
            "logs": list(self._logs),
            "appends": self._appends,
            "stats": None if self._stats is None else list(self._stats),
        }

    def set_state(self, state):
        """Takes back a window `get_state` gave (a run resumed from a backup)."""
        self.reset()
        self.values.extend(float(v) for v in state.get("values", []))
        self._logs.extend(float(v) for v in state.get("logs", []))
        self._appends = int(state.get("appends", len(self._logs)))
        stats = state.get("stats")
        self._stats = None if stats is None else tuple(float(v) for v in stats)

    def ready(self):
        """Whether enough values are in the window to judge."""
        return len(self._logs) >= self.min_samples

    def _center_spread(self):
        if self._stats is None:
            logs = np.asarray(self._logs, dtype=np.float64)
            center = float(np.median(logs))
            mad = float(np.median(np.abs(logs - center)))
            self._stats = (center, max(MAD_SCALE * mad, self.min_spread))
        return self._stats

    def median(self):
        """Median of the window's values (NaN when empty)."""
        if not self._logs:
            return math.nan
        return math.exp(self._center_spread()[0])

    def zscore(self, value):
        """Robust score of `value`: NaN before `min_samples` or for a negative
        value, -inf for 0."""
        if not self.ready():
            return math.nan
        value = float(value)
        if not value > 0:
            return -math.inf if value == 0 else math.nan
        center, spread = self._center_spread()
        return (math.log(value) - center) / spread

    def _append(self, value):
        self.values.append(value)
        self._logs.append(math.log(value))
        self._appends += 1
        if self._appends % 8 == 0 or len(self._logs) <= self.min_samples:
            self._stats = None

    def update(self, value):
        """Returns whether `value` is a spike; non-spikes join the window.

        Non-finite values are spikes and never join the window; values
        before `min_samples`, and values <= 0 (which have no log), are never
        spikes, and the latter never join the window either.
        """
        value = float(value)
        if not math.isfinite(value):
            return True
        if not value > 0:
            return False  # no log: neither judged nor kept
        spike = self.ready() and self.zscore(value) > self.z_threshold
        if not spike:
            self._append(value)
        return spike


def _check_window(window, min_samples, z_threshold):
    """The window arguments both z-scores share, validated."""
    window = check_positive_int("window", window)
    min_samples = check_positive_int("min_samples", min_samples)
    if min_samples > window:
        raise invalid("min_samples", min_samples, f"at most `window`={window}")
    z_threshold = check_number("z_threshold", z_threshold, low=0.0, low_open=True)
    return window, min_samples, z_threshold
