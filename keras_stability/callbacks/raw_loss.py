"""The raw per-step training loss, recovered from Keras' running mean.

Keras' batch logs carry the running mean of the loss over the epoch so far,
which hides a single bad batch. The model's loss tracker (a `Mean` metric)
holds the running `total` (sum of batch loss times batch size) and `count`
(samples); the raw loss of the last batch is the change of `total` divided by
the change of `count`. Reading the two scalars is one small host transfer per
batch, made where Keras already synchronises to hand out the logs.
"""

import math

import numpy as np

__all__ = ["RawLossTracker"]


class RawLossTracker:
    """Recovers the loss of each batch from the running epoch mean.

    With `steps_per_execution > 1` the value is the mean over the steps of
    one execution. Without a loss tracker (a custom `train_step`) it falls
    back to the logged running mean, assuming equal batch sizes.

    Args:
        model: The compiled model being fit.
    """

    def __init__(self, model):
        self.model = model
        self.reset()

    def _tracker(self):
        tracker = getattr(self.model, "_loss_tracker", None)
        if tracker is None or not hasattr(tracker, "total") or not hasattr(tracker, "count"):
            return None
        return tracker

    def reset(self):
        """Starts a new epoch (Keras resets its metrics at epoch begin)."""
        self._total = 0.0
        self._count = 0.0
        self._before = (0.0, 0.0)
        self._batches = 0
        self._mean = 0.0

    def update(self, logs):
        """Returns the raw loss of the batch just trained (NaN if unknown)."""
        tracker = self._tracker()
        if tracker is not None:
            total = float(np.asarray(tracker.total))
            count = float(np.asarray(tracker.count))
            if count < self._count:  # metrics were reset behind our back
                self._total, self._count = 0.0, 0.0
            self._before = (self._total, self._count)
            delta = count - self._count
            raw = (total - self._total) / delta if delta > 0 else math.nan
            self._total, self._count = total, count
            return raw
        mean = float((logs or {}).get("loss", math.nan))
        self._batches += 1
        raw = self._batches * mean - (self._batches - 1) * self._mean
        self._mean = mean
        return raw

    def rewind(self):
        """Removes the last batch from the loss tracker's running mean.

        Used after a step that was skipped for a non-finite loss, so the
        epoch's reported loss is not NaN for the rest of the epoch.
        """
        tracker = self._tracker()
        if tracker is None:
            return
        total, count = self._before
        tracker.total.assign(total)
        tracker.count.assign(count)
        self._total, self._count = total, count
