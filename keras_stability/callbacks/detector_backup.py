"""What `GradientExplosionDetector` keeps in a backup, and when one may be taken.

`keras_stability.distribute.BackupAndRestore` asks the detectors of its
`fit` (through `StepLogs`) whether the weights may be backed up now
(`ready_for_backup`), saves their state with each backup (`backup_state`,
`backup_arrays`) and hands it back on resume (`resumed`). Before, a backup
taken while the detector was deciding about an explosion held the exploded
weights, and the run resumed from it, with a fresh detector and no snapshot
from before, lost the last good ones.
"""

import math

import numpy as np

from keras_stability.callbacks.recovery import SNAPSHOT_TOLERANCE
from keras_stability.callbacks.snapshots import Snapshot
from keras_stability.diagnostics import rules
from keras_stability.diagnostics.loss_history import DIVERGENCE_FLOOR

__all__ = ["RESUMED_COUNTS", "BackupStateMixin"]

# The counters a run resumed from a backup goes on from (`backup_state`).
RESUMED_COUNTS = (
    "rollbacks",
    "rollbacks_undone",
    "rollbacks_declined",
    "lr_probes",
    "skipped_batches",
    "skipped_nonfinite",
    "skipped_spikes",
    "skipped_requested",
    "spikes",
    "consecutive_skips",
)


class BackupStateMixin:
    """`GradientExplosionDetector`'s side of `BackupAndRestore` (a mixin)."""

    def ready_for_backup(self):
        """Whether a backup may hold the current weights now.

        Called by `keras_stability.distribute.BackupAndRestore` when a backup
        falls due; it waits while this returns False. Not before the steps
        since the last look are judged (at the next look: at most
        `check_every - 1` batches later; the backup makes no look of its
        own, so a run with it trains as one without). Then, with
        `action="rollback"` or `"stop"`, only at weights it could take as a
        snapshot: no rollback being compared or checked, no loss spike
        applied in its window of recent steps, and the recent losses within
        `SNAPSHOT_TOLERANCE` times the best snapshot's (an explosion's
        first sign, `exploded_at`, is not enough: it stays up through
        healthy fine-tunes). A run resumed from a backup taken otherwise
        would start from weights on their way to an explosion; the
        detector's snapshots in the backup (`backup_arrays`) still hold the
        last good ones for the rare backup that does.
        """
        if self.model is None or self.stopped_reason is not None:
            return True
        if self._calls_unread:
            return False
        if self.action not in ("rollback", "stop"):
            return True
        history = self._history
        return (
            self._trial is None
            and self._recovery is None
            and not history.applied_bad_steps()
            and not self._above_best_snapshot()
        )

    def _above_best_snapshot(self):
        """Whether the recent losses are above `SNAPSHOT_TOLERANCE` times the
        best snapshot's, floored as a slow divergence's reference is
        (`rules.diverging`: a loss near zero is not "2x" anything)."""
        history = self._history
        if not history.recent or not math.isfinite(self.best.score):
            return False
        floors = (
            self.best.score,
            DIVERGENCE_FLOOR * history.start_loss,
            rules.NEAR_ZERO,
            self.best.typical if self.best.typical is not None else math.nan,
        )
        reference = max(v for v in floors if math.isfinite(v))
        return float(np.mean(history.recent)) > SNAPSHOT_TOLERANCE * reference

    def _backup_key(self):
        return f"{type(self).__name__}:{getattr(self, '_log_prefix', '')}"

    def backup_state(self):
        """`(key, state)`: what a run resumed from a backup taken now needs.

        `keras_stability.distribute.BackupAndRestore` saves it with each
        backup (taken only when `ready_for_backup`) and gives it back on
        resume (`resumed`), with the snapshots' values (`backup_arrays`):
        the counters (a resumed run has the budget of `max_rollbacks` left
        that the killed one had), the lowering of the rate after the last
        rollback on plateaus, the step count, every window the rules judge
        (`LossHistory.get_state`) and the snapshots. The resumed detector
        judges as the killed one would have. Not kept: `events` and the
        other reports (the resumed fit's are its own), a rollback being
        compared or checked (a backup waits for its end).
        """
        lowered = self._lowered_rate
        state = {name: getattr(self, name) for name in RESUMED_COUNTS}
        state.update(
            plateau_top=self._plateau_top,
            plateau_losses=list(self._plateau_losses),
            recovery_failed=self._recovery_failed,
            lowered_rate=None if lowered is None else [lowered.base, lowered.value],
            history=self._history.get_state(),
            step=self.step,
            last_snapshot_at=self._last_snapshot_at,
            snapshots={
                role: snapshot.to_arrays()[0]
                for role, snapshot in self._kept_snapshots()
            },
        )
        return self._backup_key(), state

    def _kept_snapshots(self):
        """`(role, snapshot)`: the rollback target, and the best if another."""
        yield "snapshot", self.snapshot
        if self.best is not self.snapshot:
            yield "best", self.best

    def backup_arrays(self):
        """`(key, {name: array})`: the values of the snapshots `backup_state` names
        (the weights a rollback or a stop restores), saved beside the backup:
        a run resumed from weights that turn out bad still has the last good
        ones to roll back to."""
        arrays = {}
        for role, snapshot in self._kept_snapshots():
            _, values = snapshot.to_arrays()
            arrays.update({f"{role}/{name}": v for name, v in values.items()})
        return self._backup_key(), arrays

    def _restored_snapshots(self, state, arrays):
        """`(snapshot, best)` from the backup, or `None` (not saved, or not
        for this model)."""
        infos = state.get("snapshots") or {}
        if not arrays or "snapshot" not in infos:
            return None
        found = {}
        for role, info in infos.items():
            prefix = f"{role}/"
            values = {
                k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)
            }
            found[role] = Snapshot.from_arrays(self.model, info, values)
            if found[role] is None:
                return None
        return found["snapshot"], found.get("best", found["snapshot"])

    def resumed(self, states, arrays=None):
        """A backup was restored (`keras_stability.distribute.BackupAndRestore`).

        Takes this detector's state from `states` (`backup_state`) and its
        snapshots from `arrays` (`backup_arrays`): it goes on as the killed
        run's would have, rolling back, if it must, to the weights that run
        would have restored. Without them (a backup made without the
        detector), the restored weights are its snapshot.
        """
        state = (states or {}).get(self._backup_key())
        restored = None
        self._first_snapshot_due = False
        if state:
            for name in RESUMED_COUNTS:
                setattr(self, name, int(state.get(name, 0)))
            self._plateau_top = state.get("plateau_top")
            self._plateau_losses = [float(v) for v in state.get("plateau_losses", [])]
            self._recovery_failed = bool(state.get("recovery_failed", False))
            lowered = state.get("lowered_rate")
            if lowered is not None and self._lowered_rate is not None:
                self._lowered_rate.base, self._lowered_rate.value = map(float, lowered)
            if "history" in state:
                self._history.set_state(state["history"])
            self.step = int(state.get("step", self.step))
            restored = self._restored_snapshots(
                state, (arrays or {}).get(self._backup_key())
            )
        if restored is not None:
            self.snapshot, self.best = restored
            self._pending = None
            self._last_snapshot_at = int(state.get("last_snapshot_at", self.step))
        else:
            self.snapshot = self.best = self._pending = Snapshot(
                self.model, step=self.step
            )
            self._last_snapshot_at = self.step
        self._pending_losses = []
