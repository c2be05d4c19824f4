"""Pure numeric core of spike detection: a rolling z-score.

Used on the host by `GradientExplosionDetector` for the raw per-step loss
and the global gradient norm. Values judged spikes are not added to the
window, so a run of spikes does not drag the statistics up and hide itself.
"""

import collections
import math

import numpy as np

__all__ = ["RollingZScore"]


class RollingZScore:
    """Rolling mean / standard deviation and the z-score of new values.

    Args:
        window: Number of accepted values kept. Defaults to `128`.
        threshold: z-score above which a value is a spike. Defaults to `6.0`.
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
            `min_samples > window` or `threshold` is not positive.

    Example:

    >>> z = RollingZScore(window=8, threshold=3.0, min_samples=4)
    >>> [z.update(v) for v in [1.0, 1.1, 0.9, 1.0, 10.0, 1.05]]
    [False, False, False, False, True, False]
    """

    def __init__(self, window=128, threshold=6.0, min_samples=20, factor=None):
        for name, value in (("window", window), ("min_samples", min_samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"Invalid value for argument `{name}`. Expected a positive "
                    f"integer. Received: {name}={value!r}"
                )
        if min_samples > window:
            raise ValueError(
                "Invalid value for argument `min_samples`. Expected at most "
                f"`window`={window}. Received: min_samples={min_samples!r}"
            )
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
            raise ValueError(
                "Invalid value for argument `threshold`. Expected a positive number. "
                f"Received: threshold={threshold!r}"
            )
        if factor is not None and (
            isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1
        ):
            raise ValueError(
                "Invalid value for argument `factor`. Expected None or a number > 1. "
                f"Received: factor={factor!r}"
            )
        self.factor = factor
        self.window = window
        self.threshold = float(threshold)
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
        spike = self.zscore(value) > self.threshold
        if self.factor is not None and 0 < len(self.values) < self.min_samples:
            median = self.median()
            spike = spike or (median > 0 and value > self.factor * median)
        if not spike:
            self._append(value)
        return spike
