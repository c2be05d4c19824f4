"""The raw per-step training loss, recovered from Keras' running mean.

Keras' batch logs carry the running mean of the loss over the epoch so far,
which hides a single bad batch. The model's loss tracker (a `Mean` metric)
holds the running `total` (sum of batch loss times batch size) and `count`
(samples); the raw loss of a batch is the change of `total` over the change
of `count`. To avoid a host read per step, the tracker is read only at the
first and last batch of an epoch (and after anything non-finite, or a logged
mean that did not move: a step the guard skipped, taken back out of the
tracker in the step); in between `total` is rebuilt from the logged mean, as
batches there have equal sizes.
"""

import math

import numpy as np

from keras_stability import _keras_internals
from keras_stability.optimizers.attach import find_guard

__all__ = ["RawLossTracker"]


class RawLossTracker:
    """Recovers the loss of each batch from the running epoch mean.

    With `steps_per_execution > 1` the value is the mean over the steps of
    one execution. When Keras' loss tracker is absent or never updated (a
    custom `train_step` with its own `Mean`, the keras.io "lower-level"
    pattern), it uses the loss the model's `GuardedOptimizer` saw in
    `scale_loss` (`step_loss`, the last step of the execution) if the step
    called it, else the logged `loss` as a running mean (assuming equal
    batch sizes), else NaN. `source` says which: `"loss_tracker"`,
    `"guard"`, `"logged_mean"` or `None` (no loss: NaN).

    Args:
        model: The compiled model being fit.
        steps_per_epoch: Batches per epoch (`callback.params["steps"]`), or
            `None` if unknown (the tracker is then read every batch).
            Defaults to `None`.
    """

    def __init__(self, model, steps_per_epoch=None):
        self.model = model
        self.steps_per_epoch = steps_per_epoch
        self._epoch = None
        self._key = None
        self._raw = math.nan
        self.source = None
        self.reset()

    @classmethod
    def shared(cls, model, steps_per_epoch=None):
        """The tracker shared by all callbacks of `model` (one state, one rewind).

        `GradientMonitor` and `GradientExplosionDetector` both need the raw
        loss; sharing keeps them consistent after a rewind. Their `StepLogs`
        updates it once per call of the train function, with the `batch`
        Keras gives callbacks, so another callback's `update_once(batch,
        logs)` returns the same value.
        """
        tracker = getattr(model, "_keras_stability_raw_loss", None)
        if not isinstance(tracker, cls):
            tracker = cls(model, steps_per_epoch)
            object.__setattr__(model, "_keras_stability_raw_loss", tracker)
        tracker.steps_per_epoch = steps_per_epoch
        return tracker

    def start_fit(self):
        """Forgets the epoch / batch keys (a new `fit` restarts at epoch 0)."""
        self._epoch = None
        self._key = None
        self.source = None

    def start_epoch(self, epoch):
        """`reset` once per epoch, however many callbacks call it."""
        if epoch != self._epoch:
            self._epoch = epoch
            self.reset()

    def update_once(self, batch, logs):
        """`update` once per batch, however many callbacks call it.

        Batches may be left out (nobody read their raw loss): the next
        update then reads Keras' loss tracker instead of rebuilding its
        total from the logged mean. A step that returns its own `raw_loss`
        in its logs (`GradientExplosionDetector` records it in-graph) gives
        that value when it is finite.
        """
        key = (self._epoch, batch)
        if key != self._key:
            gap = (
                self._key is None
                or self._key[0] != self._epoch
                or batch - self._key[1]
                > max(1, int(getattr(self.model, "steps_per_execution", 1) or 1))
            ) and self._index > 0
            self._key = key
            self._raw = self.update(logs, exact=gap)
            own = (logs or {}).get("raw_loss")
            if own is not None:
                own = float(own)
                if math.isfinite(own):
                    self._raw = own
        return self._raw

    def _tracker(self):
        return _keras_internals.loss_tracker(self.model)

    def reset(self):
        """Starts a new epoch (Keras resets its metrics at epoch begin)."""
        self._total = 0.0
        self._count = 0.0
        self._before = (0.0, 0.0)
        self._batch_size = None
        self._index = 0
        self._mean = None  # the logged mean of the last update

    def update(self, logs, exact=False):
        """Returns the raw loss of the batch just trained (NaN if unknown).

        With `exact`, Keras' loss tracker is read (its running total), not
        rebuilt from the logged mean: after batches that were not updated,
        the value is then their mean.
        """
        self._index += 1
        mean = float((logs or {}).get("loss", math.nan))
        # A mean that did not move: most likely a step taken back out of
        # the tracker (`step_logs.drop_skipped_step`), which adds no batch.
        unmoved = mean == self._mean
        self._mean = mean
        self._before = (self._total, self._count)
        tracker = self._tracker()
        if tracker is not None and self.source not in (None, "loss_tracker"):
            tracker = None  # found unused earlier in this fit
        exact = (
            exact
            or self._batch_size is None
            or self.steps_per_epoch is None
            or self._index >= self.steps_per_epoch
            or not math.isfinite(mean)
            or not math.isfinite(self._total)
            or unmoved
        )
        if tracker is not None and exact:
            total = float(np.asarray(tracker.total.numpy()))
            count = float(np.asarray(tracker.count.numpy()))
            if count < self._count:  # metrics were reset behind our back
                self._total, self._count = 0.0, 0.0
            if count == self._count and self._batch_size is None:
                # Keras' tracker is not updated by this train_step.
                return self._without_tracker(logs, mean)
            if self._batch_size is None and count > self._count:
                self._batch_size = count - self._count
            self.source = "loss_tracker"
        elif tracker is None:
            return self._without_tracker(logs, mean)
        else:
            size = self._batch_size or 1.0
            count = self._count + size
            total = mean * count
        delta = count - self._count
        if delta > 0:
            raw = (total - self._total) / delta
        else:  # taken out of the tracker (skipped): the loss the guard saw
            raw = self._guard_loss()
        self._total, self._count = total, count
        return raw

    def _guard_loss(self):
        """The loss the model's guard saw in the last step (NaN if none)."""
        guard = find_guard(self.model)
        if guard is None or guard.loss_seen is None or not int(guard.loss_seen.numpy()):
            return math.nan
        return float(guard.step_loss.numpy())

    def _without_tracker(self, logs, mean):
        guard = find_guard(self.model)
        if guard is not None and guard.loss_seen is not None:
            if int(guard.loss_seen.numpy()):
                self.source = "guard"
                return float(guard.step_loss.numpy())
        if "loss" in (logs or {}):
            # The running mean of the logged loss, over equal batches.
            self.source = "logged_mean"
            if self._index == 1 or not math.isfinite(self._total):
                self._total, self._count = 0.0, 0.0
            count = self._count + 1.0
            total = mean * count
            raw = total - self._total
            self._total, self._count = total, count
            return raw
        self.source = None
        return math.nan

    def mark(self):
        """The running total and count before the last batch, for `rewind`."""
        return self._before

    def rewind(self, before=None):
        """Removes the last batch from the loss tracker's running mean.

        Used after a step that was skipped for a non-finite loss, so the
        epoch's reported loss is not NaN for the rest of the epoch.

        Args:
            before: A `mark()` taken earlier in the epoch: removes every
                batch since, not only the last. Defaults to `None`.
        """
        tracker = self._tracker()
        total, count = self._before if before is None else before
        if tracker is None or self.source != "loss_tracker":
            self._total, self._count = total, count
            return
        tracker.total.assign(total)
        tracker.count.assign(count)
        self._total, self._count = total, count
