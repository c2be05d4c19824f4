"""The detector's in-graph record of each step, and what the host reads of it.

`GradientExplosionDetector` makes the compiled step write one row per batch
(`ROW`: the loss the guard saw, the pre-clip global norm, the loss
tracker's totals around the step, whether it was skipped as non-finite or
as a gradient-norm spike, held by the guard's trip flag, skipped at the
detector's request (`steps_skipped_requested`), dropped from the epoch's
mean, the batch's mean sample weight, and during a paired comparison
the batch's loss at the snapshot's weights) into a ring buffer
(`StepRecord`) that the host reads every few steps; `RowLoss` takes the
judged steps back out of Keras' epoch mean on the host.
"""

import numpy as np
from keras import ops

from keras_stability import _keras_internals
from keras_stability.callbacks.step_logs import StepLogs
from keras_stability.optimizers.attach import find_guard
from keras_stability.optimizers.attach import log_prefix
from keras_stability.optimizers.guarded_optimizer import state_variable

__all__ = [
    "ROW",
    "RowLoss",
    "StepRecord",
    "read_scalar",
    "mean_sample_weight",
    "record_state",
    "record_values",
]


def read_scalar(variable):
    """A scalar variable's value on the host, by the shortest path.

    The detector reads the guard's global norm every step: on TensorFlow
    `tf.Variable.value()` avoids the copy `Variable.numpy()` makes.
    """
    value = variable.value
    read = getattr(value, "value", None)
    return float(read() if callable(read) else value)


# Columns of a recorded step (`StepRecord`).
ROW = {
    name: i
    for i, name in enumerate(
        (
            "raw",
            "grad_norm",
            "total_before",
            "count_before",
            "count_after",
            "nonfinite",
            "held",
            "dropped",
            "spike",
            "requested",
            "weight",
            "trial_current",
            "trial_snapshot",
        )
    )
}


class StepRecord:
    """The ring buffer of recorded steps (`check_every` rows) and its counter.

    Not saved: a `fit`'s state on the host, kept in-graph between looks.
    """

    def __init__(self, guard, size):
        self.guard = guard
        self.size = size
        self.rows = state_variable("detector_rows", (size, len(ROW)))
        self.written = state_variable("detector_written", dtype="int32")
        # The detector's `skipped_batches`, counted on in-graph between looks.
        self.skipped = state_variable("detector_skipped")
        # The guard's step count at the last row (see `record_values`).
        self.guard_steps = state_variable("detector_guard_steps", dtype="int32")
        self.read = 0

    def take(self):
        """The rows written since the last `take`, oldest first (host read).

        Returns:
            `(rows, written)`: `n` lists of `len(ROW)` floats and the
            number of rows written in this `fit`.
        """
        written = int(read_scalar(self.written))
        new = min(written - self.read, self.size)
        if new <= 0:
            return [], written
        rows = np.asarray(self.rows.numpy(), dtype=np.float64)
        index = [i % self.size for i in range(written - new, written)]
        self.read = written
        return rows[index].tolist(), written


def mean_sample_weight(data):
    """The mean sample weight of a step's `data` (`None` without weights).

    Keras' losses reduce a weighted batch to `sum(w * loss) / batch_size`,
    so a step's loss is the mean weight times the weighted mean of the
    per-sample losses (for class weights too: Keras turns them into sample
    weights). Several outputs' weights: the mean of their means.
    """
    import keras

    _, _, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    weights = [w for w in keras.tree.flatten(sample_weight) if w is not None]
    if not weights:
        return None
    means = [ops.mean(ops.cast(w, "float32")) for w in weights]
    return means[0] if len(means) == 1 else ops.mean(ops.stack(means))


def record_state(model, guard, data, shadow=None):
    """In the step, before `train_step`: the guard's count of spike skips (`None` when it skips no spikes), the
    batch's mean sample weight (`mean_sample_weight`) and, with a `shadow`
    (`paired_trial.ShadowWeights`), the batch's loss at the current and at
    the snapshot's weights (`None` without; see `ShadowWeights.evaluate`)."""
    weight = mean_sample_weight(data)
    trial_losses = None if shadow is None else shadow.evaluate(data)
    spikes = None
    if (
        guard.skip_spikes is not None
        and getattr(guard, "steps_skipped_spike", None) is not None
    ):
        spikes = _keras_internals.read(guard.steps_skipped_spike)
    return (spikes, weight, trial_losses)


def _guard_is_wrapped(model, guard):
    """Whether the model's optimizer wraps the guard (a `LossScaleOptimizer`,
    which skips a non-finite step without calling the guard)."""
    outer = getattr(model, "optimizer", None)
    return outer is not guard and getattr(outer, "inner_optimizer", None) is guard


def record_values(model, guard, attribute, record):
    """In the step, after `train_step`: writes the step's row (see `StepRecord`)."""

    def values(state, logs):
        if find_guard(model, attribute) is not guard:
            return {}  # compiled again with another optimizer
        spikes_before, weight, trial_losses = state
        # Keras' loss tracker around `train_step`, read once for all our
        # callbacks (`StepLogs`).
        before, after = StepLogs.of(model).tracker_in_step()
        if before is None:
            zero = ops.zeros((), "float32")
            total_before = count_before = total_after = count_after = zero
        else:
            (total_before, count_before), (total_after, count_after) = before, after
        used = ops.greater(count_after, count_before)  # Keras' own train_step
        new = {}
        loss, seen = guard.step_loss_info()
        # The raw loss: the loss the guard saw in `scale_loss` (the mean over
        # replicas, the same on each), else the change of Keras' loss tracker
        # (its total over its count; under a strategy, this replica's).
        delta = ops.subtract(count_after, count_before)
        raw = ops.where(
            seen,
            ops.cast(loss, "float32"),
            ops.where(
                used,
                ops.divide(
                    ops.subtract(total_after, total_before), ops.maximum(delta, 1e-30)
                ),
                float("nan"),
            ),
        )
        # Few ops: on a 1 ms step each costs about a percent.
        skipped = ops.greater(guard.last_step_skipped, 0)
        grad_norm = _keras_internals.read(guard.grad_norm)  # one read
        wrapped = _guard_is_wrapped(model, guard)
        if wrapped:
            # A `LossScaleOptimizer` around the guard skips a step with
            # non-finite scaled gradients without calling the guard (its
            # values are then the last step's): the guard's step count did not
            # move since the last row. With a non-finite loss too (a NaN
            # batch) that is a non-finite step, skipped; with a finite one the
            # loss scale was too high (it halves), which healthy mixed-precision
            # runs meet and which stays unseen, as before. The guard's flag
            # says so too, for `StepLogs` (which takes the skipped step out of
            # Keras' loss tracker after this).
            steps = _keras_internals.read(guard.step)
            wrapper_skip = ops.logical_and(
                ops.logical_not(ops.greater(steps, record.guard_steps.value)),
                ops.logical_not(ops.isfinite(raw)),
            )
            record.guard_steps.assign(steps)
            skipped = ops.logical_or(skipped, wrapper_skip)
            guard.last_step_skipped.assign(ops.cast(skipped, "int32"))
            grad_norm = ops.where(wrapper_skip, float("nan"), grad_norm)
        finite = ops.isfinite(grad_norm)
        if guard.skip_nonfinite or wrapped:
            # The guard's own condition for a non-finite skip (or the wrapper's).
            nonfinite = ops.logical_and(skipped, ops.logical_not(finite))
        else:
            nonfinite = ops.zeros((), "bool")
        # Held back by the trip flag (a non-finite step counts as non-finite).
        held = ops.logical_and(
            ops.logical_and(skipped, finite), ops.greater(guard.tripped, 0)
        )
        # A step not applied leaves the epoch's mean loss: `StepLogs` takes it
        # out of Keras' loss tracker after this (`step_logs.drop_skipped_step`,
        # once for all our callbacks, on `model.optimizer`'s guard), so the
        # host need not rewind it.
        if find_guard(model) is guard:
            dropped = ops.logical_and(skipped, used)
        else:  # a guard on another optimizer: the host rewinds the step
            dropped = ops.zeros((), "bool")
        prefix = log_prefix(attribute)  # `d_optimizer/raw_loss` for a GAN's
        new[f"{prefix}raw_loss"] = raw
        if spikes_before is None:
            spike = ops.zeros((), "bool")
        else:  # skipped in-graph as a gradient-norm spike (`steps_skipped_spike`)
            spike = ops.greater(
                _keras_internals.read(guard.steps_skipped_spike), spikes_before
            )
        # Skipped for any other reason: at the detector's request (a rollback's
        # `skip_next`, the trip), as the guard counts `steps_skipped_requested`
        # (each skipped step counts in exactly one of the guard's counters).
        requested = ops.logical_and(
            skipped, ops.logical_not(ops.logical_or(nonfinite, spike))
        )
        flags = ops.cast(
            ops.stack([nonfinite, held, dropped, spike, requested]), "float32"
        )
        # The tracker's totals over the replicas (each holds its share):
        # what the host assigns back to rewind the epoch's mean.
        totals = _summed_over_replicas(
            ops.stack(
                [
                    ops.cast(v, "float32")
                    for v in (total_before, count_before, count_after)
                ]
            )
        )
        values = ops.stack([ops.cast(raw, "float32"), ops.cast(grad_norm, "float32")])
        row = [values, totals, flags]
        if weight is None:  # no sample weights: a constant, no op
            row.append(ops.ones((1,), "float32"))
        else:
            row.append(ops.reshape(weight, (1,)))
        if trial_losses is None:  # no comparison traced: a constant, no op
            row.append(ops.convert_to_tensor(np.full((2,), np.nan, np.float32)))
        else:
            row.append(trial_losses)
        row = ops.concatenate(row)
        at = ops.mod(ops.convert_to_tensor(record.written), record.size)
        record.rows.assign(
            ops.scatter_update(
                ops.convert_to_tensor(record.rows),
                ops.reshape(at, (1, 1)),
                ops.reshape(row, (1, -1)),
            )
        )
        _keras_internals.assign_add(record.written, 1)
        # Every skipped step, once (non-finite, a spike or requested).
        _keras_internals.assign_add(record.skipped, ops.cast(skipped, "float32"))
        # A tensor (a read), not the variable: under a multi-worker strategy
        # the step's outputs are reduced across workers, which takes tensors.
        new[f"{prefix}skipped_batches"] = ops.convert_to_tensor(record.skipped.value)
        return new

    return values


def _summed_over_replicas(value):
    """`value` (this replica's) summed over the replicas, in a merge call.

    Keras' metric variables under a `tf.distribute` strategy hold one share
    per replica (`SyncOnReadVariable`, summed on read, split on assign).
    Unchanged on one replica, and under a strategy without merge calls
    (multi-worker, TPU), where the row keeps the first replica's.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        return value
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if (
        context is None
        or tf.distribute.get_strategy().num_replicas_in_sync == 1
        or tf.__internal__.distribute.strategy_supports_no_merge_call()
    ):
        return value

    def total(distribution, value):
        parts = distribution.experimental_local_results(value)
        return ops.sum(ops.stack(list(parts)), axis=0)

    return context.merge_call(total, args=(value,))


class RowLoss:
    """`mark` / `rewind` of Keras' epoch mean for the recorded steps.

    A rollback takes the bad steps out of the epoch's mean loss: back to
    the loss tracker's totals before the step being judged (or a `mark`
    taken earlier), which also removes the later steps of the same look
    (discarded by the rollback). Rows of a step that did not update Keras'
    loss tracker (a custom `train_step`) use the `RawLossTracker`.
    """

    def __init__(self, detector, raw_loss_tracker):
        self._detector = detector
        self._raw = raw_loss_tracker

    def _row(self):
        row = self._detector._row
        if row is None or not row[ROW["count_after"]] > row[ROW["count_before"]]:
            return None
        return row

    def mark(self):
        row = self._row()
        if row is None:
            return self._raw.mark()
        return (float(row[ROW["total_before"]]), float(row[ROW["count_before"]]))

    def rewind(self, before=None):
        row = self._row()
        tracker = _keras_internals.loss_tracker(self._detector.model)
        if row is None or tracker is None:
            self._raw.rewind(before)
            return
        total, count = self.mark() if before is None else before
        tracker.total.assign(total)
        tracker.count.assign(count)
        # The shared raw-loss tracker (the monitor's) goes on from there.
        self._raw._total, self._raw._count = total, count
        self._raw._before = (total, count)
