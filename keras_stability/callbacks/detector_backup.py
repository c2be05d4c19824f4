"""What `GradientExplosionDetector` keeps in a backup, and when one may be taken.

`keras_stability.distribute.BackupAndRestore` asks the detectors of its
`fit` (through `StepLogs`) whether the weights may be backed up now
(`ready_for_backup`), saves their state with each backup (`backup_state`)
and hands it back on resume (`resumed`). A backup taken while the detector
was deciding about an explosion held the exploded weights; the run resumed
from it, with a fresh detector and no snapshot from before, lost the last
good ones.
"""

import math

import numpy as np

from keras_stability.callbacks.recovery import SNAPSHOT_TOLERANCE
from keras_stability.callbacks.recovery import json_float
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
)


class BackupStateMixin:
    """`GradientExplosionDetector`'s side of `BackupAndRestore` (a mixin)."""

    def ready_for_backup(self, logs=None):
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
        healthy fine-tunes).
        A backup taken otherwise could hold the weights of an explosion,
        and the run resumed from it (a fresh detector, no snapshot from
        before) would have lost the last good ones.
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
            and not history.applied_bad_steps()
            and not self._above_best_snapshot()
        )

    def _above_best_snapshot(self):
        """Whether the recent losses are above `SNAPSHOT_TOLERANCE` times the
        best snapshot's, floored as a slow divergence's reference is
        (`rules.diverging`: a loss near zero is not "2x" anything)."""
        history = self._history
        if not history.recent:
            return False
        floors = (
            self.best.score,
            DIVERGENCE_FLOOR * history.start_loss,
            rules.NEAR_ZERO,
            self.best.typical if self.best.typical is not None else math.nan,
        )
        finite = [v for v in floors if math.isfinite(v)]
        if not math.isfinite(self.best.score):
            return False
        return float(np.mean(history.recent)) > SNAPSHOT_TOLERANCE * max(finite)

    def _backup_key(self):
        return f"{type(self).__name__}:{getattr(self, '_log_prefix', '')}"

    def backup_state(self):
        """`(key, state)`: what a run resumed from a backup taken now needs.

        `keras_stability.distribute.BackupAndRestore` saves it with each
        backup (a backup is taken only when `ready_for_backup`: no rollback
        is being compared or checked) and gives it back on resume
        (`resumed`): the counters (a resumed run has the budget of
        `max_rollbacks` left that the killed one had), the lowering of the
        rate after the last rollback on plateaus, and whether the rules
        comparing the loss with its start are off (after a rollback undone
        or declined). Not kept: the snapshots (the resumed run takes its
        first from the backup's weights), `events`, the loss the fit started
        from and the rolling windows: the resumed run starts those afresh,
        together (a healthy heavy-tailed run resumed with the killed run's
        start but fresh windows looked like an explosion that left it at
        its start).
        """
        lowered = self._lowered_rate
        state = {name: getattr(self, name) for name in RESUMED_COUNTS}
        state.update(
            plateau_top=self._plateau_top,
            plateau_losses=[json_float(v) for v in self._plateau_losses],
            recovery_failed=self._recovery_failed,
            lowered_rate=None if lowered is None else [lowered.base, lowered.value],
            level_rules_off=self._history.level_rules_off,
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
            self._history.level_rules_off = bool(state.get("level_rules_off", False))
        self.snapshot = self.best = self._pending = Snapshot(self.model, step=self.step)
        self._pending_losses = []
        self._last_snapshot_at = self.step
