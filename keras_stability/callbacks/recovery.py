"""What `GradientExplosionDetector` does about a problem: snapshots, rollback, probes, stop.

This is where the detector's recovery is described (what counts as a
problem is in `keras_stability.diagnostics.rules`). It is a mixin on the
detector, whose state it keeps (`snapshot`, `best`, `_pending`,
`_recovery`, `_trial`, `rollbacks`, ...).

- **Snapshots** (`_healthy_step`): every `snapshot_freq` healthy steps the
  weights and the state of every optimizer the model holds are copied; a
  new snapshot waits for `confirm_steps` healthy steps, whose mean raw
  loss is its score, before it replaces the last one (a snapshot followed
  by a spike or a problem is dropped, and after an explosion one holding a
  model stuck at its starting loss is not kept). `best` is the one with
  the lowest score. No snapshot is taken while a rollback is being
  decided or checked.
- **A problem** (`_handle`): with `action="warn"` a warning; `"stop"`
  stops; `"skip"` stops after `max_consecutive_skips` non-finite steps in
  a row and warns about the rest; `"rollback"` rolls back, after
  `max_rollbacks` rollbacks it stops.
- **The paired comparison** (`_start_trial`, `_finish_trial`): before a
  rollback for a rise (the loss climbing, regressing or diverging), a stall
  or a run of non-finite steps (`NONFINITE_RUNS`: skipped, so the weights
  did not change; the batches may have been NaN), the compiled step also scores each of the next `skip_batches`
  batches at the snapshot's weights (a stateless forward pass on a device
  copy of them, traced into the step at the first comparison), while
  training goes on. The detector rolls back only if the snapshot's median
  loss on the same batches is below `UNDO_FACTOR_RISE` (0.9) times the
  current weights' after a rise or a non-finite run (a batch the current
  weights score non-finite counts for the snapshot), `UNDO_FACTOR` (1.5)
  after a stall or an
  explosion left at the starting loss; those batches then stand for the
  skipped updates. Otherwise the data, not the weights, made the loss rise
  (an unshuffled time series): nothing is rolled back, a warning and an
  event of kind `"rollback_declined"` (`rollbacks_declined`), and, after a
  rise or a stall, the rules that compare the loss with its start or a
  snapshot are off for the rest of the `fit`. Without a compiled loss (a custom `train_step` with its
  own) there is no comparison: the rollback acts at once and is undone
  (`"rollback_undone"`, `rollbacks_undone`) when the restored weights'
  median loss on the skipped batches is as many times that of the weights
  it left, over their last steps.
- **A rollback** (`_rollback`): the last healthy snapshot is restored, the
  learning rate multiplied by `lr_factor` (a schedule is wrapped in
  `ScaledSchedule`, keeping its shape; a constant rate that another
  callback sets higher again, as `LearningRateScheduler` does at each
  epoch start, gets the lowering applied again with a warning, one set
  lower, as by `ReduceLROnPlateau`, is kept) and the next `skip_batches`
  updates are skipped in-graph (none after a paired comparison), which
  measures the restored weights' loss on fresh batches.
- **The check** (`_check_recovery`, with `check_recovery`): if the mean raw
  loss of the next `confirm_steps` applied steps rises above the restored
  weights' loss by more than two of its batch-to-batch standard
  deviations plus `RECOVERY_TOLERANCE` (0.5%), the lowered rate is still
  too high: "recovery failed", another rollback, the rate lowered by
  `lr_factor ** PROBE_EXPONENT` (1/3).
- **The probe** (`_start_probe`, `_judge_probe`, `_revert_probe`, with
  `probe_lower_lr`): if the loss did not rise, the rate may still be far
  too high to train well, which the loss alone cannot tell from slow
  healthy training. The detector keeps the state reached, restores the
  snapshot again and runs `confirm_steps` steps at a rate
  `lr_factor ** (1/3)` lower; if their mean raw loss is lower, that rate is
  kept (`lr_probes`, an event of kind `"lr_probe"`; not a rollback) and
  probed in turn, up to `max_rollbacks` times per rollback; otherwise the
  kept state is restored and training goes on from it at the lower rate
  anyway (a few steps favour the higher of two rates: the best rate for
  the rest of a run is lower than the best for the next few steps). A
  probe still running when `fit` ends is undone.
- **A plateau** (`_plateau_step`), after a rollback only: when the median
  raw loss of `PLATEAU_WINDOW` (25) steps is not `PLATEAU_GAIN` (5%) below
  that of the 25 before, the rate is lowered by `lr_factor ** (1/3)`, down
  to `lr_factor` times the rate the rollback settled on.
- **The stop** (`_stop`): restores the best finite snapshot (the last one
  with `restore_best_weights=False`), sets `model.stop_training`, warns
  with the reason and writes the diagnostic (`_write_diagnostic`: step,
  reason, events, the raw-loss and gradient-norm history, the per-layer
  gradient norms of the last step whose global norm was non-finite or 10x
  the step before's) to `diagnostic_path`; if writing fails then, it warns,
  so `fit` still returns its `History`.
"""

import dataclasses
import json
import math
import os
import warnings

import numpy as np

from keras_stability import _keras_internals
from keras_stability.callbacks.lr_scaling import learning_rate_variable
from keras_stability.callbacks.lr_scaling import scale_learning_rate
from keras_stability.callbacks.paired_trial import ShadowWeights
from keras_stability.callbacks.paired_trial import can_compare
from keras_stability.callbacks.paired_trial import paired_ratio
from keras_stability.callbacks.snapshots import Snapshot
from keras_stability.callbacks.step_record import ROW
from keras_stability.callbacks.step_record import read_scalar
from keras_stability.diagnostics import rules
from keras_stability.distribute.strategy import chief_path

__all__ = ["PROBLEM_KINDS", "Problem", "RecoveryMixin", "json_float"]

SNAPSHOT_TOLERANCE = 2.0  # a snapshot's loss may be at most this x the best
# A recovery fails if the mean loss after a rollback exceeds the restored
# weights' loss by more than 2 of their batch-to-batch standard deviations
# plus this fraction of it.
RECOVERY_TOLERANCE = 0.005
# A probe after a rollback tries the learning rate `lr_factor ** PROBE_EXPONENT`
# lower (3.2x at the default 0.1): the rollback's own factor of 10 jumps
# over the best rate (from SGD(5) on the Keras example to 0.5 and 0.05, where
# its best is 0.1-0.2).
PROBE_EXPONENT = 1 / 3
# After a rollback, the rate is lowered (by `lr_factor ** PROBE_EXPONENT`)
# when the median raw loss of the last PLATEAU_WINDOW steps is not
# PLATEAU_GAIN below the median of the PLATEAU_WINDOW before, down to
# `lr_factor ** PLATEAU_FLOOR` times the rate that exploded.
PLATEAU_WINDOW = 25
PLATEAU_GAIN = 0.05
PLATEAU_FLOOR = 1.0
# A rollback is undone when the restored weights' loss on the batches
# skipped after it (their median) is this many times the median loss of the
# weights it abandoned, over their last steps: the loss had risen with the
# data (an unshuffled time series, whose first batches are no measure of
# the later ones: keras.io's weather forecaster on
# `timeseries_dataset_from_array` windows, 1.6-8x), not with the weights.
# After a stall or a failed recovery, the model left is stuck where the
# restored one starts (a model an explosion killed, at the class prior,
# scores about what the weights `fit` started from score: 0.85-1.0x in the
# battery's diverging runs), so only a restored loss 1.5x higher undoes it;
# after a rise (the loss climbing, regressing or diverging), the weights
# left were broken, and the restored ones must do clearly better: 0.9x or
# more undoes it (the battery's rises measure 0.00001-0.64x; a seasonal
# series whose rise sets off "loss rising" just after a snapshot, 0.97x).
# Not after a non-finite loss or a run of bad steps: the escalation to a
# rollback is the point there (optax's `apply_if_finite`).
UNDO_FACTOR = 1.5
UNDO_FACTOR_RISE = 0.9
# What the detector found, by kind; the kind decides what is done about it
# (the message only tells the user). A rise or a stall may be caused by the
# data rather than the weights: its rollback is decided by a paired
# comparison, or undone, against its factor in `UNDO_FACTORS`.
RISES = ("rising", "regressing", "diverging")
# An explosion that leaves the model at its starting loss or above
# (`"exploded"`) is compared at once, as a stall is (its model may be dead
# already), without waiting for the stall: a rollback 10 steps sooner on the
# Keras example at SGD(5), batch 64. A comparison that measures nothing
# leaves it to the stall.
STALLS = ("stalled", "exploded", "recovery_failed")
# More than `max_consecutive_skips` non-finite steps in a row escalate to a
# rollback (optax's `apply_if_finite`), but the guard skipped them: the
# weights did not change, and a run of NaN batches in the data (4 in a row
# once an epoch) rolled back to an old snapshot every epoch, lowered the
# rate 10x each time and ended at the untrained weights. So the snapshot and
# the current weights are compared on the next batches first, as for a
# rise: the rollback goes on when the current weights score them non-finite
# or clearly worse (below 0.9x), and is declined when they score them
# finitely and no worse (the NaNs were the data's).
NONFINITE_RUNS = ("nonfinite_in_a_row",)
PROBLEM_KINDS = ("nonfinite_in_a_row", "bad_steps", "nonfinite_loss", *RISES, *STALLS)
UNDO_FACTORS = {
    **dict.fromkeys(RISES + NONFINITE_RUNS, UNDO_FACTOR_RISE),
    **dict.fromkeys(STALLS, UNDO_FACTOR),
}


@dataclasses.dataclass(frozen=True)
class Problem:
    """A problem the detector found: its `kind` (one of `PROBLEM_KINDS`),
    which decides what is done about it, and its `message` for the user."""

    kind: str
    message: str

    def __post_init__(self):
        if self.kind not in PROBLEM_KINDS:
            raise ValueError(
                f"Invalid problem kind: {self.kind!r}. Expected one of {PROBLEM_KINDS}."
            )

    def __str__(self):
        return self.message

    @property
    def undo_factor(self):
        """`UNDO_FACTORS`' factor for a rise or a stall, else `None`."""
        return UNDO_FACTORS.get(self.kind)

    def detailed(self, detail):
        """The same problem, its message followed by `detail`."""
        return dataclasses.replace(self, message=self.message + detail)


def json_float(value):
    """`value` as a float for JSON, or its string (`"nan"`, `"inf"`) when not finite."""
    value = float(value)
    return value if math.isfinite(value) else str(value)


@dataclasses.dataclass
class _Abandoned:
    """The state a rollback left: kept until the batches skipped after it
    have measured the restored weights (`_undo_rollback`)."""

    snapshot: Snapshot
    loss: float  # the median of its last raw losses
    lr_value: object  # its learning rate, when a variable
    problem: Problem
    offending: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Incumbent:
    """The state a probe of a lower learning rate is compared with."""

    loss: float  # the mean raw loss of its trial
    lr: float
    lr_value: object
    snapshot: Snapshot


@dataclasses.dataclass
class _Recovery:
    """The check of the last rollback (`_check_recovery`)."""

    skip_left: int  # updates still skipped to measure the restored weights
    reference: list  # the restored weights' raw losses
    after: list = dataclasses.field(default_factory=list)  # the trial's losses
    incumbent: _Incumbent | None = None  # what a probe is compared with
    probes_kept: int = 0
    abandoned: _Abandoned | None = None


@dataclasses.dataclass
class _Trial:
    """A paired comparison of the snapshot with the current weights."""

    problem: Problem
    shadow: object  # the snapshot's weights on the device (`ShadowWeights`)
    raw: float
    norm: float
    event: dict | None  # the problem's event
    pairs: list = dataclasses.field(default_factory=list)  # (current, snapshot)
    rows: int = 0
    nonfinite: int = 0  # rows skipped as non-finite during the comparison


class RecoveryMixin:
    """Snapshots, rollbacks, learning-rate probes and the stop of `GradientExplosionDetector`."""

    def _healthy_step(self, raw):
        if self._recovery is not None or self._trial is not None:
            # No snapshot until the last rollback is confirmed, nor while a
            # rollback is being decided.
            return
        if self._pending is not None:
            self._pending_losses.append(raw)
            if len(self._pending_losses) >= self.confirm_steps:
                # The mean loss of the steps after a snapshot scores it (one
                # batch is too noisy once the loss is small); a snapshot far
                # above the best one is not kept (it may sit on a slow
                # divergence).
                score = float(np.mean(self._pending_losses))
                best = self.best.score
                # After an explosion, a snapshot at the starting loss may
                # hold a model the explosion killed: not one to return to,
                # unless the losses around it are not stuck (`rules.stalled`:
                # a fit model near its near-zero start is no dead one).
                history = self._history
                window = history.stall_window()
                dead = history.exploded_at is not None and (
                    rules.stalled(
                        [score],
                        history.start_loss,
                        max_jitter=None if window is None else rules.STALL_JITTER,
                        window=window,
                    )
                )
                if not dead and not (
                    math.isfinite(best)
                    and best > 0
                    and score > SNAPSHOT_TOLERANCE * best
                ):
                    self._pending.score = score
                    self.snapshot = self._pending
                    if not best <= score:
                        self.best = self.snapshot
                        # The mean loss of the steps before it: a floor of
                        # the divergence reference (`rules.diverging`).
                        self.best.typical = (
                            float(np.mean(history.recent)) if history.recent else None
                        )
                        # A slow divergence is judged on losses after the
                        # best snapshot only: a window reaching back before it
                        # holds the higher losses of a falling run.
                        history.sustained.clear()
                self._pending = None
            return
        if (
            self.step - self._last_snapshot_at < self.snapshot_freq
            or not self._at_weights
        ):
            # A snapshot holds the model's state: an entry read at a look
            # that is not the last one is past (`_look`).
            return
        snapshot = Snapshot(self.model, step=self.step)
        self._last_snapshot_at = self.step
        if snapshot.is_finite():
            self._pending = snapshot
            self._pending_losses = []

    def _handle(self, problem, raw, norm, logs=None):
        if self._trial is not None:
            if problem.undo_factor is not None:
                return  # a rise or stall again: already being compared
            self._end_trial()  # anything else acts now
        self._problem_event(problem, raw, norm)
        if self.action != "warn":
            self._pending = None  # a snapshot followed by a problem is not healthy
        if self.action == "warn" or (
            self.action == "skip" and problem.kind != "nonfinite_in_a_row"
        ):
            warnings.warn(
                f"GradientExplosionDetector at step {self.step}: {problem}.",
                stacklevel=3,
            )
            return
        if not self.snapshot.finite and self.action in ("rollback", "stop"):
            self._stop(
                f"{problem}; no finite snapshot to roll back to (the weights were "
                "non-finite when `fit` started)",
                raw,
                norm,
            )
            return
        if self.action == "rollback" and self.rollbacks < self.max_rollbacks:
            if self._can_trial(problem.kind):
                self._start_trial(problem, raw, norm)
            else:
                self._rollback(problem, logs)
            return
        reason = str(problem)
        if self.action == "rollback":
            reason = f"{problem} after {self.rollbacks} rollbacks (max_rollbacks={self.max_rollbacks})"
        self._stop(reason, raw, norm)

    def _rollback(self, problem, logs=None, compared=False, reference=None):
        # The state it abandons, and that state's last losses: kept until
        # the skipped batches have measured the restored weights
        # (`_undo_rollback`; the recovery check below needs those batches),
        # unless a paired comparison decided it (`compared`): then its
        # snapshot losses (`reference`) measured them, and nothing is skipped.
        abandoned = None
        recent = [v for v in self._history.recent if math.isfinite(v)]
        # Non-finite steps were skipped: the weights they left are no better
        # state to return to, so such a rollback is never undone.
        factor = None if problem.kind in NONFINITE_RUNS else problem.undo_factor
        if (
            not compared
            and factor is not None
            and recent
            and self.check_recovery
            and self._loss_mode != "none"
            and self.skip_batches
            and hasattr(self.optimizer, "skip_next")
        ):
            candidate = Snapshot(self.model, step=self.step)
            if candidate.finite:
                abandoned = _Abandoned(
                    snapshot=candidate,
                    loss=float(np.median(recent)),
                    lr_value=_lr_value(self.optimizer),
                    problem=problem,
                )
        self.snapshot.restore(self.model)
        offending = self._note_abandoned_spikes(self.snapshot.step)
        if abandoned is not None:
            abandoned.offending = offending
        # The losses that triggered it (the whole streak of bad steps) leave
        # the epoch's mean: a huge finite one left in Keras' float32 running
        # total would make the raw losses recovered from it later
        # (differences of totals) meaningless.
        streak = self._history.streak_mark if self._history.bad_streak else None
        if streak is not None and streak[1] <= self._loss.mark()[1]:
            self._loss.rewind(streak)
        else:
            self._loss.rewind()
        if logs is not None:
            self._fix_logged_loss(logs)
        self.rollbacks += 1
        # A failed recovery: the lowered rate trains but still raises the
        # loss a little; it is lowered by the probes' finer step, not by a
        # whole `lr_factor` again.
        factor = self.lr_factor
        if getattr(self, "_recovery_failed", False):
            factor = self.lr_factor**PROBE_EXPONENT
        self._recovery_failed = False
        self._plateau_losses = []
        self._plateau_top = None
        new_lr = scale_learning_rate(self.optimizer, factor)
        self._lr_wrote()
        skips = 0 if compared else self.skip_batches
        if skips and hasattr(self.optimizer, "skip_next"):
            self.optimizer.skip_next(skips)
        self.consecutive_skips = 0
        self._pending = None
        # The explosion is answered: a stall is judged on new evidence only.
        self._history.forget()
        if self.check_recovery and self._loss_mode != "none":
            skipped = skips if hasattr(self.optimizer, "skip_next") else 0
            if reference is None:
                reference = (
                    []
                    if skipped or not math.isfinite(self.snapshot.score)
                    else [self.snapshot.score]
                )
            self._recovery = _Recovery(
                skip_left=skipped, reference=reference, abandoned=abandoned
            )
        # The next snapshot waits for `snapshot_freq` healthy steps again.
        self._last_snapshot_at = self.step
        if self.events:
            self.events[-1].update(
                action="rollback",
                restored_step=self.snapshot.step,
                learning_rate=new_lr,
            )
        message = (
            f"GradientExplosionDetector at step {self.step}: {problem}. Rolled back "
            f"to step {self.snapshot.step} (rollback {self.rollbacks}/"
            f"{self.max_rollbacks}), learning rate x{factor:.3g}"
            + (f" -> {new_lr:.4g}" if new_lr is not None else "")
            + (f", skipping the next {skips} updates." if skips else ".")
        )
        if self.verbose:
            self._say(message)

    # -- a paired comparison before a rollback for a rise or a stall ------
    def _can_trial(self, kind):
        """Whether the rollback for a problem of `kind` is decided by a paired comparison.

        For a rise or a stall (the problems a rollback may be undone for),
        with a recorded step (one batch per call), a compiled loss the step
        can compute and batches to compare on (`skip_batches`). Otherwise
        the rollback acts at once (and may be undone, `_undo_rollback`).
        """
        return (
            kind in UNDO_FACTORS
            and self.check_recovery
            and self.skip_batches > 0
            and self._record is not None
            and self._loss_mode not in (None, "none")
            and self.snapshot.finite
            and can_compare(self.model)
            and getattr(self._shadows.get(self.model), "failed", None) is None
        )

    def _start_trial(self, problem, raw, norm):
        """Compares the snapshot with the current weights on the next batches.

        The snapshot's weights go to the device (`ShadowWeights`; the first
        time, the comparison is traced into the step) and the next
        `skip_batches` steps compute each batch's loss at them too, beside
        the current weights' (the step's own). Training goes on: when the
        snapshot does no better, no batch is lost (`_finish_trial`); when it
        does, the rollback needs no skipped batches to measure it.
        """
        model = self.model
        shadow = self._shadows.get(model)
        if shadow is None or not shadow.covers(model):
            shadow = self._shadows[model] = ShadowWeights(model)
            if self._set_step_values(model, self._record):
                model.make_train_function(force=True)
        shadow.load(self.snapshot)
        self._trial = _Trial(
            problem=problem,
            shadow=shadow,
            raw=raw,
            norm=norm,
            event=self.events[-1] if self.events else None,
        )
        if self.events:
            self.events[-1].update(action="compare", compared_step=self.snapshot.step)
        if self.verbose:
            self._say(
                f"GradientExplosionDetector at step {self.step}: {problem}. Comparing "
                f"the snapshot of step {self.snapshot.step} with the current weights "
                f"on the next {self.skip_batches} batches before rolling back."
            )

    def _trial_step(self, row, logs):
        """One judged row during a comparison: its pair of losses, if any."""
        trial = self._trial
        trial.rows += 1
        trial.nonfinite += int(row[ROW["nonfinite"]] > 0)
        snapshot = row[ROW["trial_snapshot"]]
        if not math.isnan(snapshot):  # computed (the flag was up)
            trial.pairs.append((row[ROW["trial_current"]], snapshot))
        if (
            len(trial.pairs) >= self.skip_batches
            # the step could not score the snapshot: roll back now
            or trial.shadow.failed is not None
            # the non-finite steps go on: the escalation stands
            or self._nonfinite_goes_on(trial)
            # rows of the look that started it hold none; the step may
            # compute none (variables added since): decide without
            or trial.rows >= 2 * self.skip_batches + self.check_every
        ):
            self._finish_trial(logs)

    def _nonfinite_goes_on(self, trial):
        """Whether a comparison for a run of non-finite steps has seen more
        of them: more than half of `skip_batches` non-finite again (the
        weights, or the data, still give nothing to train on)."""
        return (
            trial.problem.kind in NONFINITE_RUNS
            and trial.nonfinite > self.skip_batches // 2
        )

    def _end_trial(self):
        trial, self._trial = self._trial, None
        trial.shadow.stop()
        return trial

    def _finish_trial(self, logs):
        """Rolls back if the snapshot did better on the compared batches.

        The median over the batches of the snapshot's loss over the current
        weights' (`paired_ratio`) against `UNDO_FACTORS`: after a rise the
        snapshot must score below 0.9x (the current weights broke), after
        a stall below 1.5x (a dead model scores about what its snapshot
        does; rolling back and lowering the rate is its chance). Otherwise
        the loss rose with the data: no rollback (`"rollback_declined"`,
        counted in `rollbacks_declined`), and the rules that compare the
        loss with its start or a snapshot are off for the rest of the `fit`,
        as after an undone rollback. Without a pair, it rolls back, except
        for an explosion (`"exploded"`): then nothing is done and the stall
        after it, if one comes, decides.
        """
        trial = self._end_trial()
        goes_on = self._nonfinite_goes_on(trial)
        ratio = None if goes_on else paired_ratio(trial.pairs)
        if ratio is None and trial.problem.kind == "exploded":
            # Nothing measured: no rollback; the stall after it decides.
            if trial.event is not None:
                trial.event.update(action="none")
            return
        raw = self.raw_losses[-1] if self.raw_losses else trial.raw
        norm = self.grad_norms[-1] if self.grad_norms else trial.norm
        if ratio is None or not ratio > trial.problem.undo_factor:
            problem = trial.problem
            if goes_on:
                problem = problem.detailed(
                    f"; the non-finite steps went on ({trial.nonfinite} of the "
                    f"next {trial.rows})"
                )
            if ratio is not None:
                problem = problem.detailed(
                    f"; confirmed on the next {len(trial.pairs)} batches: the "
                    f"snapshot of step {self.snapshot.step} scored {ratio:.3g}x the "
                    "current weights' loss"
                )
            # The rollback's own event (the last one may be a later spike's).
            self._problem_event(problem, raw, norm)
            reference = [
                s for _, s in trial.pairs if math.isfinite(s)
            ]  # the restored weights' losses, measured
            self._rollback(
                problem,
                logs,
                compared=ratio is not None,
                reference=reference if ratio is not None else None,
            )
            if ratio is not None:
                self.events[-1].update(paired_ratio=json_float(ratio))
            return
        self.rollbacks_declined += 1
        compared = (
            f"rollback declined: on the {len(trial.pairs)} batches after "
            f'"{trial.problem}", the snapshot of step {self.snapshot.step} '
            f"scored {ratio:.3g}x the current weights' loss (median over the "
            f"batches; a rollback needs below {trial.problem.undo_factor:g}x): "
        )
        if trial.problem.kind in NONFINITE_RUNS:
            # The weights did not change (the steps were skipped) and score
            # the next batches finitely: the batches were non-finite.
            detail = compared + (
                "the non-finite steps came from the data, not from the weights "
                "(they were skipped; the weights are unchanged). Training goes on "
                "from the current weights"
            )
        else:
            self._history.level_rules_off = True
            self._history.exploded_at = None
            detail = compared + (
                "the loss rose with the data, not with the weights (an unshuffled "
                "or drifting stream?). Training goes on from the current weights; "
                "the rules that compare the loss with its start or a snapshot are "
                "off for the rest of this fit"
            )
        self._event("rollback_declined", raw, norm, detail)
        self.events[-1].update(
            action="none",
            restored_step=None,
            paired_ratio=json_float(ratio),
        )
        warnings.warn(
            f"GradientExplosionDetector at step {self.step}: {detail}.", stacklevel=3
        )

    def _check_recovery(self, raw, steps=1):
        """Feeds one healthy call (`steps` batches) to the check of the last rollback.

        The skipped updates measure the restored weights' loss (the
        reference); then each trial runs `confirm_steps` applied steps from
        the restored weights. The first trial, at the lowered learning rate,
        fails if its mean loss rises above the reference. If it passes (and
        `probe_lower_lr`), the next trial runs from the restored weights
        again at a learning rate `lr_factor` lower; see `_judge_probe`.

        Returns:
            A problem description if the recovery failed, else `None`.
        """
        rec = self._recovery
        if rec.skip_left > 0:
            rec.skip_left -= steps
            rec.reference.append(raw)
            if rec.skip_left <= 0:
                self._undo_rollback()
            return None
        rec.after.append(raw)
        if len(rec.after) < self.confirm_steps:
            return None
        after = float(np.mean(rec.after))
        rec.after = []
        reference = np.asarray(rec.reference, dtype=np.float64)
        if reference.size == 0:
            self._recovery = None
            return None
        level = float(reference.mean())
        if not math.isfinite(self.snapshot.loss):
            self.snapshot.loss = level
        spread = float(reference.std()) if reference.size > 1 else 0.0
        # Batch-to-batch noise at fixed weights: a difference of mean losses
        # within it is no evidence.
        tolerance = 2.0 * spread + RECOVERY_TOLERANCE * abs(level)
        if rec.incumbent is not None:
            self._judge_probe(after)
            return None
        if after > level + tolerance:
            self._recovery = None
            self._recovery_failed = True
            return Problem(
                "recovery_failed",
                f"recovery failed: after rollback {self.rollbacks} the mean raw loss of "
                f"{self.confirm_steps} steps rose to {after:.4g}, above the restored "
                f"weights' loss {level:.4g} (bound {level + tolerance:.4g}); the learning "
                "rate is still too high",
            )
        if not self._start_probe(after):
            self._recovery = None
        return None

    def _undo_rollback(self):
        """Undoes the last rollback if the weights it restored did worse.

        The batches skipped after a rollback measure the restored weights on
        the data that comes next. When their median loss is `UNDO_FACTOR`
        times (after a stall or a failed recovery; `UNDO_FACTOR_RISE` times
        after a rise) the median of the last losses of the weights the
        rollback abandoned, those weights were as good or better for this
        data: the
        loss rose because the data changed (an unshuffled time series), not
        because the weights broke. The abandoned state and learning rate
        come back, the rollback is not counted, and the rules that compare
        the loss with its start or with a snapshot (explosion, stall,
        regression, divergence) are off for the rest of the `fit`: its first
        batches are no measure of the later ones. Non-finite steps and
        spikes are still skipped, and a climbing run of bad steps still
        rolls back.
        """
        rec = self._recovery
        abandoned = rec.abandoned
        rec.abandoned = None
        if abandoned is None or not rec.reference:
            return
        restored = float(np.median(np.asarray(rec.reference, dtype=np.float64)))
        before = abandoned.loss
        if not (
            math.isfinite(restored)
            and before > 0
            and restored > abandoned.problem.undo_factor * before
        ):
            return
        abandoned.snapshot.restore(self.model)
        if abandoned.offending:  # kept after all: trained on, not excluded
            self._exclude.remove(abandoned.offending)
            taken = set(abandoned.offending)
            self.offending_batches = [
                p for p in self.offending_batches if p not in taken
            ]
        if abandoned.lr_value is not None:
            learning_rate_variable(self.optimizer).assign(abandoned.lr_value)
            self._lr_wrote()
        self.rollbacks -= 1
        self.rollbacks_undone += 1
        self._recovery = None
        self._history.level_rules_off = True
        self._recovery_failed = False
        detail = (
            f"rollback undone: the weights of step {self.snapshot.step} it restored "
            f"reached a median raw loss of {restored:.4g} on the next "
            f"{len(rec.reference)} batches, {restored / before:.3g}x the "
            f"{before:.4g} of the weights it left (step {abandoned.snapshot.step}); "
            "the loss rose with the data, not with the weights (an unshuffled "
            "or drifting stream?). Back to those weights and their learning "
            "rate; the rules that compare the loss with its start or a snapshot "
            f"are off for the rest of this fit (it rolled back for: "
            f"{abandoned.problem})"
        )
        self._event("rollback_undone", self.raw_losses[-1], self.grad_norms[-1], detail)
        self.events[-1].update(action="undo", restored_step=abandoned.snapshot.step)
        warnings.warn(
            f"GradientExplosionDetector at step {self.step}: {detail}.", stacklevel=3
        )

    def _lr_wrote(self):
        """Notes the constant learning rate as the detector just set it."""
        lowered = getattr(self, "_lowered_rate", None)
        if lowered is not None:
            lowered.wrote(read_scalar(learning_rate_variable(self.optimizer)))

    def _follow_learning_rate(self):
        """Keeps the detector's lowering of a rate another callback set again.

        Called at the start of each epoch's first batch, after the other
        callbacks' `on_epoch_begin` (`LearningRateScheduler`) and the last
        epoch's `on_epoch_end` (`ReduceLROnPlateau`); see `LoweredRate`.
        """
        lowered = getattr(self, "_lowered_rate", None)
        if lowered is None:
            return
        variable = learning_rate_variable(self.optimizer)
        given = read_scalar(variable)
        new = lowered.seen(given)
        if new is None:
            return
        variable.assign(new)
        lowered.wrote(read_scalar(variable))
        message = (
            f"GradientExplosionDetector: another callback set the learning rate "
            f"to {given:.4g} (a LearningRateScheduler?), above the rate the "
            f"detector had lowered it to; the detector's lowering (x{lowered.scale:.3g}) "
            f"is applied to it: {lowered.value:.4g}."
        )
        if not getattr(self, "_follow_warned", False):
            self._follow_warned = True
            warnings.warn(message, stacklevel=3)
        elif self.verbose:
            self._say(message)

    def _can_probe(self):
        return (
            self.probe_lower_lr
            and self.action == "rollback"
            and self._recovery.probes_kept < self.max_rollbacks
            and learning_rate_variable(self.optimizer) is not None
        )

    def _start_probe(self, after):
        """Keeps the current trial's end state and starts one a factor lower.

        Returns:
            Whether a probe was started.
        """
        if not self._can_probe():
            return False
        self._recovery.incumbent = _Incumbent(
            loss=after,
            lr=float(np.asarray(self.optimizer.learning_rate)),
            lr_value=_lr_value(self.optimizer),
            snapshot=Snapshot(self.model, step=self.step),
        )
        self.snapshot.restore(self.model)
        scale_learning_rate(self.optimizer, self.lr_factor**PROBE_EXPONENT)
        self._lr_wrote()
        return True

    def _judge_probe(self, after):
        """Ends a probe: keeps the lower learning rate only if it trains faster.

        The lower one wins if its mean loss over the trial is below the
        incumbent's (no margin: right after a rollback that lowered a rate
        found unstable, the lower of two rates that train alike is the safer
        one, and a margin of the batch noise kept rates 10x too high on the
        Keras example at SGD(20)); it is then kept (counted in `lr_probes`)
        and probed in turn, up to `max_rollbacks` kept per rollback.
        Otherwise the incumbent's end state is restored and training goes on
        from it at the probe's lower rate (short-horizon bias, see below).
        """
        rec = self._recovery
        incumbent = rec.incumbent
        lr = float(np.asarray(self.optimizer.learning_rate))
        if after < incumbent.loss:
            self.lr_probes += 1
            rec.probes_kept += 1
            detail = (
                f"lower learning rate kept: from the weights of step {self.snapshot.step}, "
                f"{self.confirm_steps} steps at {lr:.4g} reached a mean raw loss of "
                f"{after:.4g}, below {incumbent.loss:.4g} at {incumbent.lr:.4g}"
            )
            self._event("lr_probe", self.raw_losses[-1], self.grad_norms[-1], detail)
            self.events[-1].update(
                action="lower_lr", restored_step=self.snapshot.step, learning_rate=lr
            )
            if self.verbose:
                self._say(
                    f"GradientExplosionDetector at step {self.step}: {detail} "
                    f"(lower rate {rec.probes_kept} kept after rollback {self.rollbacks})."
                )
            if not self._start_probe(after):
                self._recovery = None
            return
        # The higher rate's state is kept, and training goes on at the lower
        # rate: a comparison over `confirm_steps` steps favours the higher of
        # two rates (short-horizon bias, Wu et al. 2018: early on the faster
        # one is ahead, and the best rate for the whole run is lower than the
        # best for the next few steps), and the higher one is the highest
        # that trains right after an explosion.
        self._revert_probe(
            incumbent,
            f"went on at {lr:.4g} from the state at {incumbent.lr:.4g}: "
            f"{self.confirm_steps} steps at {lr:.4g} reached a mean raw loss of "
            f"{after:.4g}, not below {incumbent.loss:.4g} at {incumbent.lr:.4g} "
            "(a few steps favour the higher rate); restored the state of step "
            f"{incumbent.snapshot.step}",
            keep_lr=True,
        )

    def _revert_probe(self, incumbent, detail, keep_lr=False):
        lr_var = learning_rate_variable(self.optimizer)
        lr_value = _lr_value(self.optimizer)
        incumbent.snapshot.restore(self.model)
        lr_var.assign(lr_value if keep_lr else incumbent.lr_value)
        self._lr_wrote()
        self._event("lr_probe", self.raw_losses[-1], self.grad_norms[-1], detail)
        if keep_lr:
            self.events[-1].update(
                action="lower_lr",
                restored_step=incumbent.snapshot.step,
                learning_rate=float(np.asarray(self.optimizer.learning_rate)),
            )
            if self.verbose:
                self._say(f"GradientExplosionDetector at step {self.step}: {detail}.")
        self._recovery = None

    def _plateau_step(self, raw):
        """After a rollback: lowers the learning rate once the loss plateaus.

        The rate a rollback (and its probes) settles on is the highest one
        that trains in a few steps, which is often too high to end well (on
        the Keras example at SGD(5): 0.5, where the best constant rate is
        0.1-0.2). When the median raw loss of the last PLATEAU_WINDOW steps is
        not PLATEAU_GAIN below the median of the PLATEAU_WINDOW before, the
        rate is multiplied by `lr_factor ** PROBE_EXPONENT`, while it stays
        at or above `lr_factor ** PLATEAU_FLOOR` times the rate that
        exploded. Only after a rollback: a healthy run is never touched.
        """
        losses = self._plateau_losses
        if self._plateau_top is None:
            # The rate the rollback and its probes settled on.
            self._plateau_top = float(np.asarray(self.optimizer.learning_rate))
        losses.append(raw)
        if len(losses) < 2 * PLATEAU_WINDOW:
            return
        last = float(np.median(losses[-PLATEAU_WINDOW:]))
        before = float(np.median(losses[-2 * PLATEAU_WINDOW : -PLATEAU_WINDOW]))
        if last < (1.0 - PLATEAU_GAIN) * before:
            del losses[:-PLATEAU_WINDOW]
            return
        factor = self.lr_factor**PROBE_EXPONENT
        lr = float(np.asarray(self.optimizer.learning_rate))
        floor = self._plateau_top * self.lr_factor**PLATEAU_FLOOR
        if not lr * factor >= floor * (1 - 1e-6):
            return
        losses.clear()
        new_lr = scale_learning_rate(self.optimizer, factor)
        self._lr_wrote()
        detail = (
            f"loss plateau after rollback {self.rollbacks}: median raw loss {last:.4g} "
            f"over the last {PLATEAU_WINDOW} steps, not {PLATEAU_GAIN:g} below "
            f"{before:.4g} over the {PLATEAU_WINDOW} before; learning rate "
            f"{lr:.4g} -> {new_lr:.4g}"
        )
        self._event("lr_probe", raw, self.grad_norms[-1], detail)
        self.events[-1].update(action="lower_lr", learning_rate=new_lr)
        if self.verbose:
            self._say(f"GradientExplosionDetector at step {self.step}: {detail}.")

    def _stop(self, reason, raw, norm):
        target = self._restore_target()
        if target is not None:
            target.restore(self.model)
        self.model.stop_training = True
        self.stopped_reason = reason
        stats = (
            self._stats.read()
            if self._stats is not None and self._stats.built
            else None
        )
        self.diagnostic = {
            "reason": reason,
            "step": self.step,
            "epoch": self.epoch,
            "action": self.action,
            "rollbacks": self.rollbacks,
            "lr_probes": self.lr_probes,
            "rollbacks_undone": self.rollbacks_undone,
            "rollbacks_declined": self.rollbacks_declined,
            "skipped_batches": self.skipped_batches,
            "skipped_nonfinite": self.skipped_nonfinite,
            "skipped_spikes": self.skipped_spikes,
            "skipped_requested": self.skipped_requested,
            "offending_batches": [list(p) for p in self.offending_batches],
            "restored_step": None if target is None else target.step,
            "restored_loss": None
            if target is None
            else json_float(target.known_loss()),
            "events": self.events,
            "loss_history": [json_float(v) for v in self.raw_losses],
            "grad_norm_history": [json_float(v) for v in self.grad_norms],
            # Computed only on a step whose global norm was non-finite or
            # jumped: how many steps before the last trained one (None: none yet).
            "per_layer_grad_norms_steps_ago": (
                stats["step"] - stats["report_step"]
                if stats is not None and stats["report_step"] > 0
                else None
            ),
            "per_layer_grad_norms": (
                {
                    n: json_float(v)
                    for n, v in zip(self._layer_names, stats["grad_norms"], strict=True)
                }
                if stats is not None and stats["report_step"] > 0
                else {}
            ),
        }
        where = ""
        if self.diagnostic_path:
            where = self._write_diagnostic()
        warnings.warn(
            f"GradientExplosionDetector stopped training at step {self.step}: "
            f"{reason}. "
            + (
                "No finite snapshot to restore: the weights are left as they are."
                if target is None
                else f"Restored the {'best' if target is self.best else 'last'} "
                f"healthy weights (step {target.step})."
            )
            + where,
            stacklevel=3,
        )

    def _restore_target(self):
        """The snapshot a stop restores: the best (or last) finite one, or `None`."""
        target = self.best if self.restore_best_weights else self.snapshot
        if target.finite:
            return target
        return self.snapshot if self.snapshot.finite else None

    def _write_diagnostic(self):
        """Writes `diagnostic` as JSON; returns the sentence for the warning.

        The weights are restored by then: a path that cannot be written
        (checked at the start of training, but the disk may have changed)
        is warned about rather than raised, so `fit` still returns its
        `History`.
        """
        path = chief_path(self.diagnostic_path, self.model.distribute_strategy)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                json.dump(self.diagnostic, f, indent=2)
        except OSError as e:
            warnings.warn(
                f"GradientExplosionDetector could not write the diagnostic to "
                f"diagnostic_path={self.diagnostic_path!r} ({e}); it is in "
                "`detector.diagnostic`.",
                stacklevel=4,
            )
            return " The diagnostic could not be written (see the previous warning)."
        return f" Diagnostic written to {self.diagnostic_path}."


def _lr_value(optimizer):
    """A copy of the value `learning_rate_variable` holds (`None` without one)."""
    variable = learning_rate_variable(optimizer)
    if variable is None:
        return None
    return np.array(_keras_internals.to_numpy(variable), copy=True)
