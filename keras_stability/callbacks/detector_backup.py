"""What `GradientExplosionDetector` keeps in a backup, and when one may be taken.

`keras_stability.distribute.BackupAndRestore` asks the detectors of its
`fit` (through `StepLogs`) whether the weights may be backed up now
(`ready_for_backup`), saves their state with each backup (`backup_state`)
and hands it back on resume (`resumed`). A backup taken while the detector
was deciding about an explosion held the exploded weights; the run resumed
from it, with a fresh detector and no snapshot from before, lost the last
good ones.
"""

from keras_stability.callbacks.recovery import json_float
from keras_stability.callbacks.snapshots import Snapshot

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
)


class BackupStateMixin:
    """`GradientExplosionDetector`'s side of `BackupAndRestore` (a mixin)."""

    def ready_for_backup(self, logs=None):
        """Whether a backup may hold the current weights now.

        Called by `keras_stability.distribute.BackupAndRestore` when a backup
        falls due; it waits while this returns False. Not before the steps
        since the last look are judged (at the next look: at most
        `check_every - 1` batches later; the backup does not make a look of
        its own, so a run with it trains as one without). Then, with
        `action="rollback"` or `"stop"`, not while it is deciding about the
        current weights: a rollback being compared or checked, or bad steps
        in its window with the loss rising. A backup taken then could hold
        the weights of an explosion, and the run resumed from it (a fresh
        detector, no snapshot from before) would have lost the last good
        ones.
        """
        del logs
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
            and not (history.bad_streak and history.rising())
        )

    def _backup_key(self):
        return f"{type(self).__name__}:{getattr(self, '_log_prefix', '')}"

    def backup_state(self):
        """`(key, state)`: what a run resumed from a backup taken now needs.

        `keras_stability.distribute.BackupAndRestore` saves it with each
        backup (a backup is taken only when `ready_for_backup`: no rollback
        is being compared or checked) and gives it back on resume
        (`resumed`): the counters (a resumed run has the budget of
        `max_rollbacks` left that the killed one had), the lowering of the
        rate after the last rollback on plateaus, and the loss the fit
        started from (the regression and explosion rules' reference).
        Not kept: the snapshots (the resumed run takes its first from the
        backup's weights), the rolling windows, `events`.
        """
        lowered = self._lowered_rate
        state = {name: getattr(self, name) for name in RESUMED_COUNTS}
        state.update(
            plateau_top=self._plateau_top,
            plateau_losses=[json_float(v) for v in self._plateau_losses],
            recovery_failed=self._recovery_failed,
            lowered_rate=None if lowered is None else [lowered.base, lowered.value],
            history=self._history.start_state(),
        )
        return self._backup_key(), state

    def resumed(self, states):
        """A backup was restored (`keras_stability.distribute.BackupAndRestore`).

        Takes this detector's state from `states` (`backup_state`), and the
        restored weights and optimizer state as its snapshot: the snapshot
        taken when `fit` began may hold the weights from before the restore.
        """
        state = (states or {}).get(self._backup_key())
        if state:
            for name in RESUMED_COUNTS:
                setattr(self, name, int(state.get(name, 0)))
            self._plateau_top = state.get("plateau_top")
            self._plateau_losses = [float(v) for v in state.get("plateau_losses", [])]
            self._recovery_failed = bool(state.get("recovery_failed", False))
            lowered = state.get("lowered_rate")
            if lowered is not None and self._lowered_rate is not None:
                self._lowered_rate.base, self._lowered_rate.value = map(float, lowered)
            self._history.resume_start(state.get("history") or {})
        self.snapshot = self.best = self._pending = Snapshot(self.model, step=self.step)
        self._pending_losses = []
        self._last_snapshot_at = self.step
