"""`GradientExplosionDetector`: skip bad steps in `fit`, roll back from explosions.

The callback keeps the hooks; what it calls a spike and a problem is in
`keras_stability.diagnostics.rules`, the windows of losses and norms those
rules judge in `keras_stability.diagnostics.loss_history`, what it does about
a problem in `keras_stability.callbacks.recovery`, and the in-graph record of
each step in `keras_stability.callbacks.step_record`.
"""

import collections
import math
import warnings
import weakref

import keras
import numpy as np

from keras_stability import _keras_internals
from keras_stability._checks import check_bool
from keras_stability._checks import check_choice
from keras_stability._checks import check_nonnegative_int
from keras_stability._checks import check_number
from keras_stability._checks import check_path
from keras_stability._checks import check_positive
from keras_stability._checks import check_positive_int
from keras_stability._checks import check_verbose
from keras_stability._checks import check_writable_file
from keras_stability._checks import invalid
from keras_stability.callbacks.detector_backup import BackupStateMixin
from keras_stability.callbacks.exclude_batches import ExcludeList
from keras_stability.callbacks.layer_gradient_stats import LayerGradientStats
from keras_stability.callbacks.layer_gradient_stats import group_variables_by_layer
from keras_stability.callbacks.lr_scaling import LoweredRate
from keras_stability.callbacks.lr_scaling import innermost_optimizer
from keras_stability.callbacks.lr_scaling import wrap_schedule
from keras_stability.callbacks.recovery import Problem
from keras_stability.callbacks.recovery import RecoveryMixin
from keras_stability.callbacks.recovery import json_float
from keras_stability.callbacks.snapshots import Snapshot
from keras_stability.callbacks.step_logs import COUNTS
from keras_stability.callbacks.step_logs import StepLogs
from keras_stability.callbacks.step_logs import counts
from keras_stability.callbacks.step_record import ROW
from keras_stability.callbacks.step_record import RowLoss
from keras_stability.callbacks.step_record import StepRecord
from keras_stability.callbacks.step_record import read_scalar
from keras_stability.callbacks.step_record import record_state
from keras_stability.callbacks.step_record import record_values
from keras_stability.clipping.spike import RobustSpikeSkipping
from keras_stability.diagnostics import rules
from keras_stability.diagnostics.loss_history import START_SAMPLES
from keras_stability.diagnostics.loss_history import LossHistory
from keras_stability.distribute.strategy import chief_path
from keras_stability.optimizers.attach import ModelObservers
from keras_stability.optimizers.attach import check_optimizer_argument
from keras_stability.optimizers.attach import find_guard
from keras_stability.optimizers.attach import guarded_attribute
from keras_stability.optimizers.attach import log_prefix
from keras_stability.optimizers.attach import watch_optimizer_loads

__all__ = ["GradientExplosionDetector"]

ACTIONS = ("warn", "skip", "rollback", "stop")
HISTORY_KEPT = 2000  # raw losses / norms kept for the diagnostic
# Events whose batches go into `offending_batches` (and the exclude list):
# steps not trained on. A spike that was only recorded (`"spike"`) was
# trained on; its batches go in only when a rollback abandons it
# (`_note_abandoned_spikes`), so a resumed run trains on what the run kept.
OFFENDING_EVENTS = ("skipped_nonfinite", "skipped_spike")
# Recorded spikes kept for a rollback to find (the newest).
SPIKES_KEPT = 1000
# The per-layer gradient norms of the diagnostic are computed on steps whose
# global norm is non-finite or this many times the step before's.
ANOMALY_FACTOR = 10.0
_NEVER = 2**31 - 1  # a check frequency that is never reached after step 0


@keras.saving.register_keras_serializable(package="keras_stability")
class GradientExplosionDetector(
    RecoveryMixin, BackupStateMixin, keras.callbacks.Callback
):
    """Skips bad steps, rolls back from explosions and stops runs that fail.

    Add it to `fit`: a run that would blow up ends healthy, and a healthy run
    is left as plain `fit` leaves it. It answers by grade (the rules, with
    their thresholds: `keras_stability.diagnostics.rules`):

    - a step with non-finite gradients, or a gradient-norm spike of a
      corrupt batch (`clipping.RobustSpikeSkipping`: 10x the recent median
      and 100x any norm applied so far), is skipped in-graph by a
      `GuardedOptimizer`: never applied, on any replica;
    - any other single loss or gradient-norm spike is only recorded, as an
      event of kind `"spike"`: on small-batch noise it is far more often
      noise than a failure;
    - a problem, which needs sustained evidence (a non-finite loss, more
      than `max_consecutive_skips` non-finite steps in a row, bad steps
      with the loss climbing, a slow divergence, a regression, an explosion
      that leaves the model stuck at its starting loss, a failed recovery),
      rolls back: the last healthy snapshot of the weights and optimizer
      state is restored, the learning rate multiplied by `lr_factor` and
      the next `skip_batches` updates skipped. Before a rollback for a rise,
      a stall or non-finite steps in a row, the snapshot and the current
      weights are compared on the same next batches, and nothing is rolled
      back when the data was at fault (an unshuffled time series, a run of
      NaN batches: `"rollback_declined"`). After
      a rollback the recovery is checked and a lower rate probed
      (`check_recovery`, `probe_lower_lr`; `keras_stability.callbacks.recovery`);
    - after `max_rollbacks` rollbacks it stops, restoring the best finite
      weights, and writes a diagnostic to `diagnostic_path`.

    `action` sets how far it goes: `"warn"` warns and counts, `"skip"` skips
    in-graph and warns about problems (it stops after
    `max_consecutive_skips` non-finite steps in a row), `"rollback"` does
    all of the above, `"stop"` stops at the first problem.

    The compiled step records each batch (raw loss, pre-clip gradient norm,
    whether it was skipped) in an in-graph ring buffer; the host reads it
    every `check_every` batches and at each epoch end, and after every batch
    while something is being decided. Meanwhile the guard's trip flag holds
    back every step after a non-finite loss with finite gradients or too
    many non-finite steps in a row, so nothing bad is applied before the
    host looks (a lone NaN batch is skipped without holding the next ones). `raw_loss`,
    `rollbacks` and `skipped_batches` reach every callback's logs, whatever
    the order of the callbacks. With `steps_per_execution > 1` it looks
    after each execution and judges the execution's mean loss.

    After `fit`, it holds `rollbacks`, `skipped_batches` (of which
    `skipped_nonfinite`, `skipped_spikes`, `skipped_requested`),
    `rollbacks_declined`, `rollbacks_undone`, `lr_probes`, `spikes`,
    `events` (dicts; a problem's holds its kind, one of
    `callbacks.recovery.PROBLEM_KINDS`, in `"problem"`), `offending_batches`,
    `excluded_batches`, `stopped_reason` and `diagnostic`. The optimizer stays wrapped in the guard: call
    `keras_stability.optimizers.strip_guard(model)` before saving a model
    for a process without `keras_stability`.

    Args:
        action: One of `"warn"`, `"skip"`, `"rollback"`, `"stop"`.
            Defaults to `"rollback"`.
        snapshot_freq: Healthy steps between snapshots. Defaults to `50`.
        lr_factor: Learning-rate multiplier per rollback, in (0, 1).
            Defaults to `0.1`.
        skip_batches: Batches that measure a rollback: the paired comparison
            before one, or the updates skipped after one. Defaults to `5`.
        max_rollbacks: Rollbacks before stopping. Defaults to `3`.
        max_consecutive_skips: Non-finite or bad steps in a row tolerated
            by skipping or recording alone. Defaults to `3`.
        loss_z_threshold: Robust z-score (log space) of a loss spike.
            Defaults to `6.0`.
        grad_z_threshold: Robust z-score (log space) of a gradient-norm
            spike. Defaults to `6.0`.
        loss_factor: Multiple of the early median loss that is a spike in
            the first `min_samples` steps, and of the best snapshot's loss
            that is a slow divergence; `None` turns both off.
            Defaults to `10.0`.
        regress_factor: Multiple of the loss the fit started from that is a
            regression; `None` turns it off. Defaults to `1.5`.
        window: Healthy steps in the rolling statistics. Defaults to `128`.
        min_samples: Steps before spikes are judged, at most `window`.
            Defaults to `20`.
        restore_best_weights: Restore the best (not the last) snapshot when
            stopping. Defaults to `True`.
        check_recovery: Check each rollback, and roll back again with a
            lower rate when the loss rises after it. Defaults to `True`.
        probe_lower_lr: With `check_recovery`, compare each rollback's rate
            with one `lr_factor ** (1/3)` lower. Defaults to `True`.
        diagnostic_path: JSON file written when the detector stops, or
            `None`. Checked at the start of training. Defaults to `None`.
        verbose: 0 (silent) or 1 (print each rollback and each lower rate
            kept; problems and stops are warned about either way).
            Defaults to `0`.
        optimizer: The optimizer to guard: `None` (`model.optimizer`), a
            `keras.optimizers.Optimizer` the model holds, or the name of the
            model attribute holding it (`"d_optimizer"` in keras.io's GAN).
            A model with several optimizers needs it. Defaults to `None`.
        check_every: Batches between the host's looks at the recorded
            steps. Defaults to `10`.
        exclude_batches_path: JSON file of bad batches, or `None`. The
            batches skipped in-graph, and the spikes a rollback abandoned,
            are added to it as they are found; a `fit` that starts with the
            file (a run resumed from its backup) draws those batches without
            training on them. Needs the same data order. Defaults to `None`.
        skip_spikes: With `action="skip"` or `"rollback"`, whether the guard
            skips gradient-norm spikes in-graph (a guard that skips spikes
            already keeps its own settings). Defaults to `True`.

    Example:

    ```python
    detector = GradientExplosionDetector()
    model.fit(x, y, epochs=3, callbacks=[detector])
    detector.rollbacks, detector.skipped_batches
    ```
    """

    # Its batch hook only copies values into the (converted) batch logs for
    # the progress bar, reading nothing shared that a step changes: Keras may
    # call it in its background thread (as for callbacks without batch
    # hooks), so `fit` does not convert every step's logs on the host first.
    async_safe = True

    def __init__(
        self,
        action="rollback",
        snapshot_freq=50,
        lr_factor=0.1,
        skip_batches=5,
        max_rollbacks=3,
        max_consecutive_skips=3,
        loss_z_threshold=6.0,
        grad_z_threshold=6.0,
        loss_factor=10.0,
        regress_factor=1.5,
        window=128,
        min_samples=20,
        restore_best_weights=True,
        check_recovery=True,
        probe_lower_lr=True,
        diagnostic_path=None,
        verbose=0,
        optimizer=None,
        check_every=10,
        exclude_batches_path=None,
        skip_spikes=True,
    ):
        super().__init__()
        self._first_snapshot_due = False  # see `on_train_begin`
        self.action = check_choice("action", action, ACTIONS)
        self.snapshot_freq = check_positive_int("snapshot_freq", snapshot_freq)
        self.lr_factor = check_number(
            "lr_factor", lr_factor, low=0.0, high=1.0, low_open=True, high_open=True
        )
        self.skip_batches = check_nonnegative_int("skip_batches", skip_batches)
        self.max_rollbacks = check_nonnegative_int("max_rollbacks", max_rollbacks)
        self.max_consecutive_skips = check_nonnegative_int(
            "max_consecutive_skips", max_consecutive_skips
        )
        self.loss_z_threshold = check_positive("loss_z_threshold", loss_z_threshold)
        self.grad_z_threshold = check_positive("grad_z_threshold", grad_z_threshold)
        self.loss_factor = check_number(
            "loss_factor", loss_factor, low=1.0, low_open=True, allow_none=True
        )
        self.regress_factor = check_number(
            "regress_factor", regress_factor, low=1.0, low_open=True, allow_none=True
        )
        self.window = check_positive_int("window", window)
        self.min_samples = check_positive_int("min_samples", min_samples)
        if self.min_samples > self.window:
            raise invalid(
                "min_samples", min_samples, f"an integer <= window={self.window}"
            )
        self.restore_best_weights = check_bool(
            "restore_best_weights", restore_best_weights
        )
        self.check_recovery = check_bool("check_recovery", check_recovery)
        self.probe_lower_lr = check_bool("probe_lower_lr", probe_lower_lr)
        self.diagnostic_path = check_path(
            "diagnostic_path", diagnostic_path, allow_none=True
        )
        self.verbose = check_verbose("verbose", verbose)
        self._optimizer_arg = check_optimizer_argument("optimizer", optimizer)
        self.check_every = check_positive_int("check_every", check_every)
        self.skip_spikes = check_bool("skip_spikes", skip_spikes)
        self.exclude_batches_path = check_path(
            "exclude_batches_path", exclude_batches_path, allow_none=True
        )
        self.diagnostic = None
        self._stats = None
        self._observers = ModelObservers()
        self._records = weakref.WeakKeyDictionary()  # model -> StepRecord
        # model -> ShadowWeights (made at the first paired comparison)
        self._shadows = weakref.WeakKeyDictionary()

    def get_config(self):
        return {
            "action": self.action,
            "snapshot_freq": self.snapshot_freq,
            "lr_factor": self.lr_factor,
            "skip_batches": self.skip_batches,
            "max_rollbacks": self.max_rollbacks,
            "max_consecutive_skips": self.max_consecutive_skips,
            "loss_z_threshold": self.loss_z_threshold,
            "grad_z_threshold": self.grad_z_threshold,
            "loss_factor": self.loss_factor,
            "regress_factor": self.regress_factor,
            "window": self.window,
            "min_samples": self.min_samples,
            "restore_best_weights": self.restore_best_weights,
            "check_recovery": self.check_recovery,
            "probe_lower_lr": self.probe_lower_lr,
            "diagnostic_path": self.diagnostic_path,
            "verbose": self.verbose,
            "optimizer": self._optimizer_arg,
            "check_every": self.check_every,
            "exclude_batches_path": self.exclude_batches_path,
            "skip_spikes": self.skip_spikes,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    # -- fit hooks --------------------------------------------------------
    def set_model(self, model):
        super().set_model(model)
        # Before any callback's `on_train_begin` (a BackupAndRestore listed
        # first restores there, before we wrap the optimizer).
        watch_optimizer_loads(model)
        StepLogs.of(model).expect(self)  # in this fit (`StepLogs.enter`)

    def _model_state(self, model):
        # What a later instance of the same configuration takes over when
        # this one is not in its `fit` (see `StepLogs.enter`): the observer,
        # the step record and the device snapshot, so no retrace.
        return (
            self._observers.entry(model),
            self._records.get(model),
            self._shadows.get(model),
        )

    def _set_model_state(self, model, state):
        # `state` from `_model_state`; `None` forgets the model's.
        entry, record, shadow = state or (None, None, None)
        self._observers.put(model, entry)
        for store, value in ((self._records, record), (self._shadows, shadow)):
            if value is None:
                store.pop(model, None)
            else:
                store[model] = value

    def on_train_begin(self, logs=None):
        model = self.model
        StepLogs.of(model).enter(self)  # drops an earlier fit's instances
        with model.distribute_strategy.scope():
            attribute = guarded_attribute(model, self._optimizer_arg)
            target = getattr(model, attribute)
            if wrap_schedule(target):
                model.make_train_function(force=True)
        # An optimizer other than `model.optimizer` (a GAN's `d_optimizer`):
        # the values are logged under its attribute (`d_optimizer/raw_loss`).
        self._log_prefix = log_prefix(attribute)
        if self._log_prefix:  # its counts print as integers too
            _keras_internals.print_as_integers(
                model, [self._log_prefix + k for k in COUNTS]
            )
        if self.diagnostic_path:
            check_writable_file(
                "diagnostic_path",
                chief_path(self.diagnostic_path, model.distribute_strategy),
            )
        # Read on every worker (the same data order), written by the chief.
        self._exclude = ExcludeList(self.exclude_batches_path)
        self._exclude.load()
        if self.exclude_batches_path:
            check_writable_file(
                "exclude_batches_path",
                chief_path(self.exclude_batches_path, model.distribute_strategy),
            )
        self.offending_batches = []  # (epoch, batch) found bad in this fit
        self.excluded_batches = 0  # batches drawn without training (listed)
        self._unread_batches = []  # Keras' batch of each call since the last look
        self._judged_batches = ()  # the batches of the step being judged
        # (step, epoch, batches) of the recorded spikes (`"spike"` events).
        self._spike_batches = collections.deque(maxlen=SPIKES_KEPT)
        self._exclude_warned = False

        def per_layer_norms():
            # Per-layer gradient norms for the diagnostic, of the last step
            # whose norm was non-finite or jumped (the step that went wrong),
            # not of every step: a `cond` instead of a segment sum per step.
            return LayerGradientStats(
                groups=group_variables_by_layer(model),
                track_updates=False,
                check_freq=_NEVER,
                anomaly_factor=ANOMALY_FACTOR,
            )

        # With action="skip" or "rollback", the guard also skips
        # gradient-norm spikes in-graph (`RobustSpikeSkipping`, the rule of
        # `LossHistory.grad_z` with a ratio floor), whoever made it (this detector,
        # another callback such as `GradientMonitor`, or the user); a guard
        # that skips spikes already is used as it is.
        guard_kwargs = {}
        existing = find_guard(model, optimizer=self._optimizer_arg)
        if (
            self.skip_spikes
            and self.action in ("skip", "rollback")
            and (existing is None or existing.skip_spikes is None)
        ):
            guard_kwargs = {
                "skip_spikes": RobustSpikeSkipping(
                    window=self.window,
                    z_threshold=self.grad_z_threshold,
                    min_samples=self.min_samples,
                    max_consecutive=max(1, self.max_consecutive_skips),
                )  # its floors: 10x the median (100x in the first steps), 100x the peak
            }
        self.optimizer, self._stats = self._observers.attach(
            model, per_layer_norms, optimizer=self._optimizer_arg, **guard_kwargs
        )
        StepLogs.of(model).own_observer(self, self.optimizer, self._stats)
        self._layer_names = [name for name, _, _ in self._stats.groups]
        # A constant learning rate (a variable, not a schedule) that other
        # callbacks may set too: the detector's lowering is kept on it.
        self._lowered_rate = None
        self._follow_warned = False
        rate = _keras_internals.learning_rate_object(
            innermost_optimizer(self.optimizer)
        )
        if isinstance(rate, keras.Variable):
            self._lowered_rate = LoweredRate(_keras_internals.to_numpy(rate))
        self._step_logs = StepLogs.of(model)
        self._per_call = max(1, int(getattr(model, "steps_per_execution", 1) or 1))
        # One batch per call: the step records each batch in-graph and the
        # host looks every `check_every` calls (`_after_call`); several: the
        # per-call path (`_after_step`) as before.
        self._record = self._install_record(model) if self._per_call == 1 else None
        self._step_logs.attach(
            self,
            self._after_call if self._record is not None else self._after_step,
            self.params,
        )
        self._loss = self._step_logs.loss
        if self._record is not None:
            self._loss = RowLoss(self, self._step_logs.loss)
            # Off after a `fit` that raised too (no `on_train_end` then).
            guard = self.optimizer
            _keras_internals.add_stale_fit_cleanup(
                model, ("trip", id(guard)), lambda: guard.set_trip(None)
            )
        self._calls_unread = 0  # calls since the last look
        self._row_loss = None  # where a row's raw loss comes from (`_look`)
        self._at_weights = True  # whether the entry judged is the model's state
        self._holding = False  # whether the last row judged was held by the trip
        self._row = None  # the row being judged
        self._logged_raw = math.nan  # its raw loss as the step logged it
        # The losses and norms judged, and the rules on them.
        self._history = LossHistory(
            self.window,
            self.min_samples,
            self.loss_z_threshold,
            self.grad_z_threshold,
            self.loss_factor,
            self.regress_factor,
            self.max_consecutive_skips,
            mark=lambda: self._loss.mark(),
        )
        self.step = 0
        self.epoch = 0
        # Batches per call of the train function (`_per_call`, above); above
        # 1 the skipped steps are counted from the guard's counter (they may
        # be any of the call's).
        if self._record is None:  # the guard's counters, read per call
            self._steps_seen = _read_count(self.optimizer, "step")
            self._skips_seen = _read_count(self.optimizer, "steps_skipped_nonfinite")
            self._spike_skips_seen = _read_count(self.optimizer, "steps_skipped_spike")
            self._requested_seen = _read_count(
                self.optimizer, "steps_skipped_requested"
            )
        self.rollbacks = 0
        # After a rollback: the rate it settled on and the losses since, for
        # lowering it on a plateau (`_plateau_step`).
        self._plateau_top = None
        self._plateau_losses = []
        self._recovery_failed = False
        # Rollbacks undone because the restored weights did worse on the
        # next batches (`_undo_rollback`); after one, the rules comparing
        # the loss with its start or a snapshot are off for this fit.
        self.rollbacks_undone = 0
        # Rollbacks not made: the snapshot did no better than the current
        # weights on the same batches (`_finish_trial`); the rules comparing
        # the loss with its start or a snapshot are off after one too.
        self.rollbacks_declined = 0
        self._trial = None  # the paired comparison running (`_start_trial`)
        self.lr_probes = 0  # lower learning rates kept by probes after rollbacks
        # Every step the guard skipped, once (each counts in exactly one of
        # the guard's `steps_skipped_*` counters), and of them:
        self.skipped_batches = 0
        self.skipped_nonfinite = 0  # non-finite gradients
        self.skipped_spikes = 0  # gradient-norm spikes
        self.skipped_requested = 0  # asked for: after a rollback, held by the trip
        self.consecutive_skips = 0
        self.spikes = 0  # single spikes seen (events, no action)
        self.events = []
        self.raw_losses = []
        self.grad_norms = []
        self.stopped_reason = None
        self.diagnostic = None
        # `snapshot` is the last confirmed healthy one; `_pending` waits for
        # `confirm_steps` healthy steps after it (their mean raw loss is its
        # score) before it replaces `snapshot`. The first is taken at the
        # first batch: a callback listed after this one may still restore
        # weights in its `on_train_begin` (Keras' `BackupAndRestore`).
        self.snapshot = self.best = self._pending = None
        self._first_snapshot_due = True
        self._pending_losses = []
        self._last_snapshot_at = 0
        # After a rollback: the restored weights' losses (skipped updates) and
        # the losses of the applied steps after them, until judged.
        self._recovery = None
        self._loss_mode = None  # "keras", "guard" or "none" (see _choose_loss_source)
        # A backup restored before this callback began (listed before it).
        resumed = self._step_logs.resumed_states(self.params)
        if resumed is not None:
            self.resumed(*resumed)

    def _take_first_snapshot(self):
        self._first_snapshot_due = False
        self.snapshot = self.best = self._pending = Snapshot(self.model, step=0)
        if not self.snapshot.finite:
            warnings.warn(
                "GradientExplosionDetector: the model's weights are non-finite "
                "before training starts; there is no healthy state to roll back "
                "to (a rollback will stop training instead).",
                stacklevel=3,
            )

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self._step_logs.start_epoch(epoch)
        if self._history.bad_streak:
            self._history.streak_mark = (0.0, 0.0)  # Keras restarts the epoch's mean

    def _log_values(self, logs=None):
        raw = self.raw_losses[-1] if self.raw_losses else math.nan
        skipped = self.skipped_batches
        if self._record is not None and logs:
            # This step's, from the step itself (see `_after_call`).
            raw = logs.get(self._key("raw_loss"), raw)
            skipped = logs.get(self._key("skipped_batches"), skipped)
        return {
            self._key("raw_loss"): raw,
            **counts(
                {
                    self._key("rollbacks"): self.rollbacks,
                    self._key("skipped_batches"): skipped,
                }
            ),
        }

    def on_train_batch_end(self, batch, logs=None):
        # The values are in `logs` already (written by `_after_step`); the
        # counts again as `LoggedInt`, for the progress bar. Empty logs: a
        # batch drawn without training (a resumed backup), nothing to add.
        if logs:
            logs.update(self._log_values(logs))

    def _after_step(self, logs):
        """The per-step work, right after each call of the train function.

        `logs` is the dict the compiled step returned, before any callback
        sees it: the values written there reach them all.
        """
        steps = 1 if self._per_call == 1 else self._steps_in_call()
        self.step += steps
        first = self._step_logs.batch - self._per_call + 1
        self._judged_batches = range(first, first + steps)
        raw = self._step_logs.raw_loss
        # One host read per step: the pre-clip global norm. A non-finite norm
        # means the guarded optimizer skipped the step in-graph (if it skips
        # non-finite steps, the default).
        norm_var = getattr(self.optimizer, "grad_norm", None)
        norm = read_scalar(norm_var) if norm_var is not None else math.nan
        if self._loss_mode is None:
            self._choose_loss_source(raw, norm, norm_var)
        if self._loss_mode == "guard":
            raw = read_scalar(self.optimizer.step_loss)
        skips_nonfinite = norm_var is not None and bool(
            getattr(self.optimizer, "skip_nonfinite", False)
        )
        if self._per_call > 1 and skips_nonfinite:
            # The norm is the call's last step's; any step may have been
            # skipped, so read the guard's count (once per call).
            count = _read_count(self.optimizer, "steps_skipped_nonfinite")
            skipped, self._skips_seen = max(0, count - self._skips_seen), count
        else:
            skipped = int(skips_nonfinite and not math.isfinite(norm))
        spike_skips = 0
        if getattr(self.optimizer, "skip_spikes", None) is not None:
            count = _read_count(self.optimizer, "steps_skipped_spike")
            spike_skips, self._spike_skips_seen = (
                max(0, count - self._spike_skips_seen),
                count,
            )
        self._count_spike_skips(spike_skips, raw, norm)
        count = _read_count(self.optimizer, "steps_skipped_requested")
        requested, self._requested_seen = max(0, count - self._requested_seen), count
        self._count_requested_skips(requested, raw, norm)
        self._decide_step(
            raw, norm, norm_var is not None, skipped, steps, logs, spike_skips
        )
        self._save_exclude()
        logs[self._key("raw_loss")] = raw
        logs[self._key("rollbacks")] = self.rollbacks
        logs[self._key("skipped_batches")] = self.skipped_batches

    # -- the in-graph record and the looks (one batch per call) ------------
    def _install_record(self, model):
        """Makes the compiled step record each batch; returns the `StepRecord`.

        Each step writes one row (`ROW`: the loss the guard saw, the
        pre-clip global norm, whether it was skipped as non-finite or held
        by the trip flag, Keras' loss tracker before and after it) into a
        ring buffer of `check_every` rows (a skipped step leaves Keras' loss
        tracker in the step itself, by `StepLogs`, whichever of our
        callbacks are on the model). The guard's trip flag
        (`GuardedOptimizer.set_trip`) holds back every step after more than
        `max_consecutive_skips` non-finite steps in a row or a non-finite
        loss with finite gradients, until the host looks. Both stay in the step after `fit` (a
        later `fit` does not retrace); the trip is turned off at the end of
        each `fit`.
        """
        guard = self.optimizer
        record = self._records.get(model)
        if (
            record is None
            or record.guard is not guard
            or record.size != self.check_every
        ):
            with model.distribute_strategy.scope():
                record = StepRecord(guard, self.check_every)
            self._records[model] = record
        record.written.assign(0)
        record.skipped.assign(0.0)
        record.read = 0
        shadow = self._shadows.get(model)
        if shadow is not None:
            shadow.stop()  # a fit that raised during a comparison left it up
        changed = self._set_step_values(model, record)
        trip = None if self.action == "warn" else self.max_consecutive_skips
        changed = guard.set_trip(trip) or changed
        if changed:
            model.make_train_function(force=True)
        return record

    def _set_step_values(self, model, record):
        """Traces the record (and the paired comparison, once made) into the step.

        Returns whether the step changed (to be traced again).
        """
        guard = self.optimizer
        shadow = self._shadows.get(model)
        if shadow is not None and not shadow.covers(model):
            shadow = None
        attribute = guarded_attribute(model, self._optimizer_arg)
        return self._step_logs.set_graph_values(
            ("GradientExplosionDetector", id(guard), id(record), id(shadow)),
            record_values(model, guard, attribute, record),
            before=lambda data: record_state(model, guard, data, shadow),
            owner=self,
        )

    def _steady(self):
        """Whether the host may look only every `check_every` calls.

        Not before the loss source is known, not with a loss only the host
        can recover (a custom `train_step`'s own `Mean`), not while a
        rollback is being checked (its probes restore weights at exact
        steps), and not while bad steps (spikes, non-finite steps) are in
        the recent window (a streak acts at the step it would with a look
        after every step, once a look has seen its first bad step): those
        look after every call.
        """
        return (
            self._loss_mode is not None
            and self._row_loss is not None
            and self._recovery is None
            and self._trial is None
            and not self._history.bad_streak
        )

    def _after_call(self, logs):
        """After each call of the train function (one batch per call).

        Between looks nothing is read: the step's values are in-graph
        (`raw_loss` and `skipped_batches` come out of the step itself) and
        `rollbacks` is that of the last look.
        """
        self._calls_unread += 1
        self._unread_batches.append(self._step_logs.batch)
        # At most `snapshot_freq` steps apart (a snapshot is taken at a
        # look), at multiples of the interval (so snapshots are taken at the
        # steps they would be with a look after every step).
        every = min(self.check_every, self.snapshot_freq) if self._steady() else 1
        if (self.step + self._calls_unread) % every == 0 or self._step_logs.epoch_end:
            self._look(logs)
            logs[self._key("skipped_batches")] = self.skipped_batches
        # Between looks `skipped_batches` is the step's own count (in-graph).
        logs[self._key("rollbacks")] = self.rollbacks

    def _look(self, logs):
        """Reads the steps recorded since the last look and judges them in order.

        One host read of the ring buffer (and its counter). A problem at an
        entry that is not the last acts as it would have at that step (a
        rollback restores the snapshot, so the later steps' updates are
        discarded with it; their batches are counted as trained, and those
        the guard skipped are counted as skipped, unjudged). Steps the trip
        flag held back after the step that raised it are counted, not judged.
        """
        record = self._record
        self._calls_unread = 0
        batches, self._unread_batches = self._unread_batches, []
        if record is None:
            return
        rows, count = record.take()
        # Keras' batch of each row (calls that drew an excluded batch or a
        # resumed backup's without training wrote none).
        batches = batches[len(batches) - len(rows) :] if rows else []
        batches = [None] * (len(rows) - len(batches)) + batches
        flagged = False
        skipped_before = self.skipped_batches
        for k, row in enumerate(rows):
            self._at_weights = k == len(rows) - 1
            held = row[ROW["held"]] > 0
            flagged = (
                flagged or held or row[ROW["nonfinite"]] > 0 or row[ROW["spike"]] > 0
            )
            if held and self._holding:
                self.step += 1  # held back by the trip, after the step that raised it
                self._count_unjudged(row)
                continue
            self._holding = held
            rollbacks, stopped = self.rollbacks, self.stopped_reason
            self._row = row
            self._judged_batches = () if batches[k] is None else (batches[k],)
            self._judge_row(row, logs)
            if self.rollbacks != rollbacks or self.stopped_reason != stopped:
                for later in rows[k + 1 :]:  # discarded by the rollback or stop
                    self.step += 1
                    self._count_unjudged(later)
                break
        self._at_weights = True
        if flagged and self.optimizer.tripped is not None:
            if read_scalar(self.optimizer.tripped) > 0:
                self.optimizer.clear_trip()
            self._holding = False
        if count and rows and logs is not None and self._key("raw_loss") in logs:
            logs[self._key("raw_loss")] = self._logged_raw
        if self.skipped_batches != skipped_before:  # the in-graph count goes on
            record.skipped.assign(float(self.skipped_batches))
        self._save_exclude()

    def _judge_row(self, row, logs):
        """One recorded step through the rules (`_decide_step`)."""
        self.step += 1
        norm = row[ROW["grad_norm"]]
        if self._loss_mode is None:
            self._choose_loss_source(
                self._step_logs.raw_loss, norm, self.optimizer.grad_norm
            )
            if self._loss_mode == "keras":
                self._row_loss = (
                    "tracker" if self._step_logs.loss_source == "loss_tracker" else None
                )
            else:
                self._row_loss = self._loss_mode  # "guard", "none" or None
        weight = 1.0
        if self._row_loss in ("tracker", "guard"):
            # Computed in the step (the value its logs carry): the guard's
            # loss when it saw one, else Keras' loss tracker's change.
            raw = row[ROW["raw"]]
            weight = row[ROW["weight"]]
        else:
            raw = self._step_logs.raw_loss  # a look after every call
        self._logged_raw = raw
        if weight != 1.0:  # judged per unit of sample weight (see `rules`)
            raw = rules.per_unit_weight(raw, weight)
        skipped = int(row[ROW["nonfinite"]] > 0)
        self._count_spike_skips(int(row[ROW["spike"]] > 0), raw, norm)
        self._count_requested_skips(
            int(row[ROW["requested"]] > 0), raw, norm, held=row[ROW["held"]] > 0
        )
        trial = self._trial
        self._decide_step(
            raw, norm, True, skipped, 1, logs, rewound=row[ROW["dropped"]] > 0
        )
        if trial is not None and self._trial is trial:
            self._trial_step(row, logs)

    def _count_spike_skips(self, skips, raw, norm):
        """Counts steps the guard skipped in-graph as gradient-norm spikes.

        They are in `skipped_batches` (and `skipped_spikes`), with an event
        of kind `"skipped_spike"`; the step's loss is still judged by the
        rules as any other (a single spike is no rollback).
        """
        if not skips:
            return
        self.skipped_batches += skips
        self.skipped_spikes += skips
        self._event(
            "skipped_spike",
            raw,
            norm,
            "gradient-norm spike skipped in-graph by the guard"
            + (f" ({skips} steps of this call)" if skips > 1 else ""),
        )

    def _count_requested_skips(self, skips, raw, norm, held=False):
        """Counts steps the guard skipped in-graph at the detector's request.

        The `skip_batches` updates after a rollback (`skip_next`) and the
        steps the trip flag held back (`held`), as the guard counts them in
        `steps_skipped_requested`: in `skipped_batches` (and
        `skipped_requested`), with an event of kind `"skipped_requested"`.
        Bookkeeping only: the step is judged (or not) as before.
        """
        if not skips:
            return
        self.skipped_batches += skips
        self.skipped_requested += skips
        self._event(
            "skipped_requested",
            raw,
            norm,
            (
                "held back in-graph by the trip flag until the detector looked"
                if held
                else "skipped in-graph at the detector's request (after a rollback)"
            )
            + (f" ({skips} steps of this call)" if skips > 1 else ""),
        )

    def _count_unjudged(self, row):
        """Counts a recorded step the rules do not judge, if the guard skipped it.

        A step the trip held back after the step that raised it, or one
        after a rollback or stop in the same look (its update, if any, was
        discarded with the restored snapshot). Its batch is not added to the
        exclude list (only judged steps are).
        """
        self._judged_batches = ()
        raw, norm = row[ROW["raw"]], row[ROW["grad_norm"]]
        if row[ROW["nonfinite"]] > 0:
            self.skipped_batches += 1
            self.skipped_nonfinite += 1
            self._event("skipped_nonfinite", raw, norm, "not judged")
        self._count_spike_skips(int(row[ROW["spike"]] > 0), raw, norm)
        self._count_requested_skips(
            int(row[ROW["requested"]] > 0), raw, norm, held=row[ROW["held"]] > 0
        )

    def _decide_step(
        self, raw, norm, has_norm, skipped, steps, logs, spike_skips=0, rewound=False
    ):
        """Judges one call (`steps` batches, `skipped` of them non-finite,
        `spike_skips` skipped as gradient-norm spikes).

        `rewound`: the skipped steps are out of Keras' loss tracker already
        (taken out in-graph by the record, `_install_record`).
        """
        norm_var = self.optimizer.grad_norm if has_norm else None
        self.raw_losses.append(raw)
        self.grad_norms.append(norm)
        del self.raw_losses[:-HISTORY_KEPT], self.grad_norms[:-HISTORY_KEPT]

        problem = None
        if skipped:
            # Not applied (in-graph). Count it and keep the epoch loss finite
            # (with several steps per call, a non-finite loss removes the
            # whole call from the epoch's mean: its other losses are lost in it).
            self.skipped_batches += skipped
            self.skipped_nonfinite += skipped
            self.consecutive_skips = (
                self.consecutive_skips + skipped if skipped == steps else skipped
            )
            self._history.note_bad(skipped, steps, nonfinite=True)
            if not rewound and (steps == 1 or not math.isfinite(raw)):
                self._loss.rewind()
                self._fix_logged_loss(logs)
            self._event(
                "skipped_nonfinite",
                raw,
                norm,
                f"{skipped} of the {steps} steps of this call" if steps > 1 else "",
            )
            if self.consecutive_skips > self.max_consecutive_skips:
                problem = Problem(
                    "nonfinite_in_a_row",
                    f"{self.consecutive_skips} non-finite steps in a row",
                )
            elif self._history.bad_streak > self.max_consecutive_skips:
                problem = Problem(
                    "bad_steps",
                    f"{self._history.bad_streak} of the last "
                    f"{len(self._history.bad_window)} steps bad "
                    "(non-finite steps skipped and loss spikes)",
                )
        elif spike_skips and steps > 1:
            # An execution with a step skipped as a spike is left out of the
            # loss rules, as one with a non-finite step: its mean loss holds
            # the corrupt batch's, and its other steps would count as bad.
            self.consecutive_skips = 0
            self._history.note_bad(spike_skips, steps)
        elif self._loss_mode == "none":
            # No loss seen: the gradient norm alone is judged (spikes are
            # events; non-finite steps are skipped and counted above).
            self.consecutive_skips = 0
            self._history.note_bad(0, steps)
            if norm_var is not None and self._history.grad_z.update(norm):
                self._spike_event(f"gradient-norm spike: norm {norm:.4g}", raw, norm)
        elif (
            not math.isfinite(raw)
            and math.isfinite(norm)
            and self._step_logs.loss_source == "logged_mean"
        ):
            # A custom train_step's own `Mean` took the loss of a step the
            # guard skipped, and stays NaN for the epoch: the per-step loss
            # cannot be recovered from it, the step itself was finite.
            self._loss_mode = "none"
            self.consecutive_skips = 0
            self._history.note_bad(0, steps)
            warnings.warn(
                "GradientExplosionDetector: the model's own loss tracker is "
                "non-finite after a skipped step (a custom `train_step` whose "
                "metric includes the skipped step's loss): only the gradient "
                "norm is judged for the rest of this fit.",
                stacklevel=2,
            )
        elif not (math.isfinite(raw) and (math.isfinite(norm) or norm_var is None)):
            problem = Problem(
                "nonfinite_loss", f"non-finite loss ({raw}) or gradient norm ({norm})"
            )
            self._note_offending()
        else:
            self.consecutive_skips = 0
            problem = self._judge(raw, norm if norm_var is not None else None, steps)
        if problem is not None:
            self._handle(problem, raw, norm, logs)
            return True
        if not skipped and not self._history.last_bad:
            # A skipped step or a spike neither confirms nor takes a snapshot.
            self._healthy_step(raw)
        return False

    def _judge(self, raw, norm, steps):
        """The rules on one finite step: a problem (rollback-level) or `None`.

        A single loss or gradient-norm spike is only an event (`"spike"`):
        it is noise far more often than a failure, and rolling back for it
        costs a healthy run its progress. Rollback needs a persistent rise
        (`LossHistory.problem`; the rules are in `rules`).
        """
        history = self._history
        if not history.start_losses and self.snapshot.step == 0:
            # The first step's loss is the initial weights' loss.
            self.snapshot.loss = raw
        self._start_steps(steps)
        spike, grad_spike = history.observe(raw, norm, steps, self.step)
        if spike is not None:
            self._pending = None  # a snapshot right before a spike is suspect
            self._spike_event(spike, raw, norm)
        if grad_spike is not None:
            self._spike_event(grad_spike, raw, norm)
        found = history.problem(spike, self.step, self.best.score, self.best.typical)
        if found is None:
            found = history.exploded_at_start_level(self.step)
            if found is not None and not (
                self._recovery is None
                and self._trial is None
                # Only with a comparison: a rollback made blind this early
                # cannot be told from a rise of the data (an unshuffled series).
                and self._can_trial("exploded")
            ):
                found = None
        if found is not None:
            return Problem(*found)
        if spike is None and self._recovery is not None:
            return self._check_recovery(raw, steps)
        if spike is None and self.rollbacks and self.action == "rollback":
            self._plateau_step(raw)
        return None

    def _key(self, name):
        """`name` in the logs: under the optimizer's attribute unless it is
        `model.optimizer` (`optimizers.attach.log_prefix`)."""
        return getattr(self, "_log_prefix", "") + name

    def _spike_event(self, detail, raw, norm):
        self.spikes += 1
        self._event("spike", raw, math.nan if norm is None else norm, detail)
        if self.action in ("warn", "skip"):
            warnings.warn(
                f"GradientExplosionDetector at step {self.step}: {detail}.",
                stacklevel=4,
            )

    def on_epoch_end(self, epoch, logs=None):
        if self._calls_unread:  # steps per epoch unknown: the epoch's last look
            self._look(logs)
        if logs is not None:
            logs.update(
                counts(
                    {
                        self._key("rollbacks"): self.rollbacks,
                        self._key("skipped_batches"): self.skipped_batches,
                    }
                )
            )

    def on_train_end(self, logs=None):
        if self._first_snapshot_due:  # a fit of no batch
            self._take_first_snapshot()
        if self._calls_unread:
            self._look(None)
        if self._trial is not None:  # decided on the batches compared so far
            self._finish_trial(None)
        shadow = self._shadows.get(self.model)
        if shadow is not None and shadow.variables and self._record is not None:
            # The device copy of a snapshot's weights, made for a comparison,
            # is not kept after `fit` (a model's worth of memory): the step
            # is traced again without it (the next comparison makes another).
            shadow.release()
            if self._set_step_values(self.model, self._record):
                self.model.make_train_function(force=True)
        self._save_exclude()
        self._step_logs.detach(self)
        if self._record is not None:
            # Off between fits: no step is held back without a host to look.
            self.optimizer.set_trip(None)
        incumbent = self._recovery.incumbent if self._recovery is not None else None
        if incumbent is not None and self.stopped_reason is None:
            # `fit` ended (or another callback stopped it) during a probe: it
            # is not judged; the confirmed learning rate and its state are kept.
            self._revert_probe(
                incumbent,
                f"probe unfinished at the end of training: learning rate "
                f"{incumbent.lr:.4g} kept; restored the state of step "
                f"{incumbent.snapshot.step}",
            )
        self._recovery = None
        if not Snapshot(self.model).is_finite():
            target = self._restore_target()
            if target is None:
                warnings.warn(
                    "GradientExplosionDetector: training ended with non-finite "
                    "weights, and no finite snapshot was ever taken (the weights "
                    "were non-finite when `fit` started): they are left as they are.",
                    stacklevel=2,
                )
                return
            target.restore(self.model)
            warnings.warn(
                "GradientExplosionDetector: training ended with non-finite weights; "
                f"restored the healthy snapshot of step {target.step}.",
                stacklevel=2,
            )

    def detach(self):
        """Removes the detector's per-layer statistics from the optimizer.

        They stay after `fit` (so a loop of short `fit` calls does not
        retrace); `detach` removes them and retraces the train function.
        The `GuardedOptimizer` stays. Returns whether they were attached
        (to any model the detector was used with).
        """
        return self._observers.detach()

    def _steps_in_call(self):
        """Batches the train function ran in this call (`steps_per_execution > 1`).

        From the guard's step counter: Keras' `batch` (the call's last batch)
        overshoots on an epoch's last, shorter call.
        """
        count = _read_count(self.optimizer, "step")
        steps, self._steps_seen = count - self._steps_seen, count
        return max(1, steps)

    # -- decisions ----------------------------------------------------------
    def _fix_logged_loss(self, logs):
        """The logged loss without the steps rewound: their mean; while no
        step of the epoch is left in it, the step's raw loss if finite, else
        0.0, as in-graph (`step_logs.tracker_loss_logs`): no NaN that no
        applied step produced, which would set off `TerminateOnNaN`."""
        tracker = _keras_internals.loss_tracker(self.model)
        if tracker is not None and "loss" in logs:
            count = float(np.asarray(tracker.count))
            if count > 0:
                logs["loss"] = float(np.asarray(tracker.total)) / count
            else:
                own = self.raw_losses[-1] if self.raw_losses else math.nan
                logs["loss"] = own if math.isfinite(own) else 0.0

    def _say(self, message):
        """Prints `message` (`verbose=1`) on a line of its own: with Keras'
        progress bar running (`fit(verbose=1)`), its current line is ended
        first, so the message is not written onto the end of the bar."""
        if (self.params or {}).get("verbose") in (1, "auto"):
            message = "\n" + message
        _keras_internals.print_msg(message)

    def _event(self, kind, raw, norm, detail=""):
        if kind in OFFENDING_EVENTS:
            self._note_offending()
        elif kind == "spike" and self._judged_batches:
            self._spike_batches.append(
                (self.step, self.epoch, tuple(self._judged_batches))
            )
        self.events.append(
            {
                "step": self.step,
                "epoch": self.epoch,
                "kind": kind,
                "raw_loss": json_float(raw),
                "grad_norm": json_float(norm),
                "detail": detail,
            }
        )

    def _problem_event(self, problem, raw, norm):
        """An event of kind `"problem"`, with the problem's kind in `"problem"`."""
        self._event("problem", raw, norm, str(problem))
        self.events[-1]["problem"] = problem.kind

    def _note_offending(self):
        """Adds the batches of the step being judged to the exclude list."""
        self.offending_batches.extend(
            self._exclude.add(self.epoch, self._judged_batches)
        )

    def _note_abandoned_spikes(self, after_step):
        """Adds the recorded spikes after `after_step` (a rollback abandons
        them) to the exclude list; returns the pairs added."""
        added = []
        for step, epoch, batches in self._spike_batches:
            if step > after_step:
                added += self._exclude.add(epoch, batches)
        self._spike_batches.clear()
        self.offending_batches.extend(added)
        return added

    def _save_exclude(self):
        """Writes the exclude list if it changed (the chief; warns once on failure)."""
        if not (self.exclude_batches_path and self._exclude.unsaved):
            return
        error = self._exclude.save(
            chief_path(self.exclude_batches_path, self.model.distribute_strategy)
        )
        if error is not None and not self._exclude_warned:
            self._exclude_warned = True
            warnings.warn(
                f"GradientExplosionDetector could not write "
                f"exclude_batches_path={self.exclude_batches_path!r} ({error}); "
                "the batches are in `detector.offending_batches`.",
                stacklevel=3,
            )

    def on_train_batch_begin(self, batch, logs=None):
        if self._first_snapshot_due:
            self._take_first_snapshot()
        if batch == 0:
            self._follow_learning_rate()
        # A batch listed in `exclude_batches_path` is drawn without training.
        exclude = self._exclude
        if not exclude.batches or not exclude.hits(self.epoch, batch, self._per_call):
            return
        if _keras_internals.skipping_train_batches(self.model):
            return  # drawn without training already (a resumed backup)
        _keras_internals.skip_train_batches(self.model, self._per_call)
        self.excluded_batches += self._per_call
        self._event(
            "excluded_batch",
            math.nan,
            math.nan,
            f"batch {batch} of epoch {self.epoch} is in {self.exclude_batches_path}: "
            "drawn without training",
        )

    @property
    def confirm_steps(self):
        """Healthy steps that confirm a snapshot: `min(5, snapshot_freq)`."""
        return min(5, self.snapshot_freq)

    def _start_steps(self, steps):
        """Calls of the first START_SAMPLES samples (read once, at the first)."""
        history = self._history
        if history.start_calls is None:
            tracker = _keras_internals.loss_tracker(self.model)
            samples = float(np.asarray(tracker.count)) if tracker is not None else 0.0
            per_call = samples if samples > 0 else START_SAMPLES
            history.start_calls = max(1, math.ceil(START_SAMPLES / per_call))
            history.call_samples = per_call
        return history.start_calls

    def _choose_loss_source(self, raw, norm, norm_var):
        """Where the raw loss comes from, decided at the first informative step.

        Keras' loss tracker when it gives a finite loss (the compiled loss);
        else the loss the `GuardedOptimizer` saw in `scale_loss`, if any;
        else (a custom `train_step` with its own loss tracker, which never
        passes its loss through the optimizer) no loss: the gradient norm
        alone is judged, and the detector says so once.
        """
        if math.isfinite(raw):
            self._loss_mode = "keras"
            return
        if norm_var is not None and not math.isfinite(norm):
            return  # a non-finite step tells nothing: decide at the next
        seen_var = getattr(self.optimizer, "loss_seen", None)
        if seen_var is not None and read_scalar(seen_var) > 0:
            self._loss_mode = "guard"
            return
        self._loss_mode = "none"
        warnings.warn(
            "GradientExplosionDetector: no per-step loss is seen (a custom "
            "`train_step` that neither compiles a loss nor passes it through "
            "`optimizer.scale_loss`): only the gradient norm is judged. "
            "Non-finite steps are still skipped and rolled back from; loss "
            "spikes, divergence and regressions cannot be seen.",
            stacklevel=2,
        )


def _read_count(optimizer, name):
    """An integer statistic of the guard (0 before it is built)."""
    variable = getattr(optimizer, name, None)
    return int(read_scalar(variable)) if variable is not None else 0
