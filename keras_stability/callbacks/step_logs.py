"""Our values in `fit`'s logs, whatever the order of the callbacks.

Keras hands one converted copy of each step's logs to the callbacks in list
order, so a value a callback writes into its `logs` reaches only the
callbacks after it: with `keras.callbacks.CSVLogger` or `TensorBoard` first
(the usual order) they would never see `raw_loss`, `rollbacks`, ... Keras
builds both the batch logs and the epoch logs from the dict the train
function returns (see `keras_stability._keras_internals`), so values go in
there instead, by one of two routes:

- in-graph values (a `GuardedOptimizer`'s statistics) are returned by the
  compiled step itself (`StepLogs.set_graph_values`), with no host read of
  their own;
- host values (the raw loss, the detector's counters, the monitor's buffered
  statistics) are written by a hook that runs on the host right after each
  call of the train function, before any callback (`StepLogs.attach`). The
  callbacks' per-step work runs in that hook.

`StepLogs.of(model)` is the one instance per model, shared by all our
callbacks on it, with the step and epoch bookkeeping they need and the raw
loss of the last call, computed once.

It also owns the one correction of Keras' epoch loss: a step the model's
`GuardedOptimizer` skipped is taken back out of Keras' loss tracker in the
compiled step (`drop_skipped_step`), once, whichever of our callbacks are in
the `fit` and in whatever order.
"""

import itertools
import math
import threading
import warnings
import weakref

import keras
from keras import ops

from keras_stability import _keras_internals
from keras_stability._keras_internals import LoggedInt
from keras_stability.callbacks.raw_loss import RawLossTracker
from keras_stability.optimizers.attach import find_guard

__all__ = ["COUNTS", "LoggedInt", "StepLogs", "counts", "drop_skipped_step"]

# The counters our callbacks log: every Keras progress bar of a model they
# are on prints them as integers, wherever it is in the callback list.
COUNTS = ("rollbacks", "skipped_batches", "steps_clipped", "steps_skipped")


def counts(values):
    """`values` with each number as a `LoggedInt` (printed as an integer by
    Keras' progress bar; a float everywhere else)."""
    return {k: LoggedInt(v) for k, v in values.items()}


class StepLogs:
    """Per-model hooks that write our values where Keras builds the logs.

    Attributes:
        loss: The model's `RawLossTracker`.
        raw_loss: The raw loss of the last call of the train function
            (its mean over the call's batches with `steps_per_execution > 1`).
        epoch: The current epoch.
        batch: Keras' index of the last batch of the last call (the
            `batch` its callbacks receive).
        epoch_end: Whether the last call ended its epoch (`None` when the
            number of steps per epoch is unknown).
        loss_source: Where `raw_loss` came from (`RawLossTracker.source`):
            `"loss_tracker"`, `"guard"`, `"logged_mean"` or `None` (no loss
            seen: `raw_loss` is NaN, and a warning says so once per `fit`;
            the callbacks then use the gradient norm alone).
    """

    _ATTRIBUTE = "_keras_stability_step_logs"

    @classmethod
    def of(cls, model):
        """The model's instance (created on first use)."""
        step_logs = model.__dict__.get(cls._ATTRIBUTE)
        if step_logs is None:
            step_logs = cls(model)
            object.__setattr__(model, cls._ATTRIBUTE, step_logs)
        return step_logs

    def __init__(self, model):
        self.model = model
        self.loss = RawLossTracker.shared(model)
        self._hooks = {}  # key(owner) -> hook, in attach order
        self._hook_owners = {}  # key(owner) -> weakref, of `_hooks`
        # (params, states, arrays) of the backup restored last (`resume`).
        self._resumed = None
        self._params = None
        self._calls = 0
        self.epoch = None
        self.batch = -1
        self.epoch_end = None
        self._raw_loss = math.nan
        self._loss_source = None
        self._logs = None  # the last call's logs, until its raw loss is read
        self._warned_no_loss = False
        # Who is in the coming `fit` (`expect`, from `set_model`), and the
        # observers each of our callbacks put on a guard (`own_observer`);
        # by id, with a weak reference (an id is reused once its owner dies).
        self._expected = {}  # key(owner) -> weakref
        self._expected_closed = False
        self._entered_params = None
        self._owned_observers = {}  # key(owner) -> (weakref, [(guard, observer)])
        self._set_owners = {}  # key(owner) -> weakref, of `_graph_sets`
        # key(owner) -> (weakref, class, config, state): see `_adopt_absent`.
        self._handover = {}
        # Keras' loss tracker's `(total, count)` before and after the model's
        # `train_step`, while a step is being traced (`tracker_in_step`); per
        # thread: `MirroredStrategy` traces each replica's step in its own.
        self._in_step = threading.local()
        _keras_internals.print_as_integers(model, COUNTS)

    # -- who is in this fit -----------------------------------------------
    def expect(self, owner):
        """Call from the callback's `set_model`: `owner` is in the coming `fit`.

        Keras calls `set_model` on every callback of a `fit` when it builds
        the fit's callback list, before any `on_train_begin`.
        """
        if self._expected_closed:
            self._expected = {}
            self._expected_closed = False
        self._expected[_owner_key(owner)] = weakref.ref(owner)

    def enter(self, owner):
        """Call first in `on_train_begin` (before `own_observer` and
        `set_graph_values`).

        At the first call of a `fit`, drops the in-graph values and guard
        observers of our callbacks absent from it: the instances of an
        earlier `fit` (`callbacks=[GradientMonitor()]` again makes a new
        one each time). They would be computed in every step for nobody,
        one more set per `fit`, and their variables saved with the
        optimizer. A callback given to the next `fit` again keeps its own
        (no retrace), and a new instance of the same class and
        configuration takes over an absent one's (no retrace either, see
        `_adopt_absent`).

        Returns:
            Whether the train step changed (it is then traced again).
        """
        params = getattr(owner, "params", None)
        if params is not None and params is self._entered_params:
            return False
        self._entered_params = params
        self._expected[_owner_key(owner)] = weakref.ref(owner)
        self._expected_closed = True

        def present(key, ref):
            alive = ref()
            expected = self._expected.get(key)
            return alive is not None and expected is not None and expected() is alive

        self._adopt_absent(present)
        for key, (ref, *_) in list(self._handover.items()):
            if not present(key, ref):
                del self._handover[key]
        changed = False
        for key, (ref, owned) in list(self._owned_observers.items()):
            if not present(key, ref):
                del self._owned_observers[key]
                for guard, observer in owned:
                    changed = guard.remove_observer(observer) or changed
        sets = self.__dict__.get("_graph_sets", {})
        absent = [
            key
            for key in sets
            if key is not None and not present(key, self._set_owners[key])
        ]
        for key in absent:
            del sets[key]
            del self._set_owners[key]
        if absent:
            changed = self._wrap_graph_sets() or changed
        if changed and getattr(self.model, "train_function", None) is not None:
            self.model.make_train_function(force=True)
        return changed

    def _adopt_absent(self, present):
        """Hands an absent owner's state to a new instance of its kind.

        `callbacks=[GradientMonitor()]` written in each `fit` call makes a new
        instance each time (and the last one is usually gone by then). A
        present owner of the same class and configuration (`get_config`)
        that holds nothing on this model yet takes over the observers and
        in-graph values of an absent one, as if that instance had been given
        again: the step is not traced again. What moves is what the absent
        one handed over when it registered (`_model_state(model)`), set on
        the new one by `_set_model_state(model, state)` (an absent one still
        alive gives it up, `_set_model_state(model, None)`, so a later
        `detach` of it cannot take it from the new one); the new one's host
        state starts afresh as usual.
        """
        handover = self._handover
        absent = [key for key, (ref, *_) in handover.items() if not present(key, ref)]
        if not absent:
            return
        holding = {key for key, (ref, *_) in handover.items() if present(key, ref)}
        candidates = [
            ref()
            for key, ref in self._expected.items()
            if key not in holding
            and ref() is not None
            and callable(getattr(ref(), "_set_model_state", None))
        ]
        sets = self.__dict__.get("_graph_sets", {})
        for old_key in absent:
            old_ref, kind, config, state = handover[old_key]
            new = next(
                (
                    c
                    for c in candidates
                    if type(c) is kind and _same_config(_config(c), config)
                ),
                None,
            )
            if new is None:
                continue
            candidates.remove(new)
            new_key, new_ref = _owner_key(new), weakref.ref(new)
            del handover[old_key]
            handover[new_key] = (new_ref, kind, config, state)
            if old_key in self._owned_observers:
                _, owned = self._owned_observers.pop(old_key)
                self._owned_observers[new_key] = (new_ref, owned)
            if old_key in self._set_owners:
                # In the same place: the step's values keep their order (and key).
                rekeyed = {
                    (new_key if key == old_key else key): entry
                    for key, entry in sets.items()
                }
                sets.clear()
                sets.update(rekeyed)
                del self._set_owners[old_key]
                self._set_owners[new_key] = new_ref
            old = old_ref()
            if old is not None:  # alive but not in this fit: it gives its state up
                old._set_model_state(self.model, None)
            new._set_model_state(self.model, state)

    def _remember(self, owner):
        """Keeps what `owner` would hand to a later instance (`_adopt_absent`)."""
        model_state = getattr(owner, "_model_state", None)
        if not callable(model_state):
            return
        self._handover[_owner_key(owner)] = (
            weakref.ref(owner),
            type(owner),
            _config(owner),
            model_state(self.model),
        )

    def own_observer(self, owner, guard, observer):
        """Records that `owner` put `observer` on `guard` (see `enter`)."""
        ref, owned = self._owned_observers.get(_owner_key(owner), (None, []))
        if ref is None or ref() is not owner:
            ref, owned = weakref.ref(owner), []
            self._owned_observers[_owner_key(owner)] = (ref, owned)
        if not any(g is guard and o is observer for g, o in owned):
            owned.append((guard, observer))
        self._remember(owner)

    # -- host hooks -------------------------------------------------------
    def attach(self, owner, hook, params):
        """Runs `hook(logs)` after each call of the train function in this `fit`.

        Call it from `on_train_begin`. `logs` is the dict the compiled step
        returned (tensors), before any callback sees it: what the hook writes
        there reaches every callback and the epoch logs. Hooks run in the
        order they were attached, after the raw loss is computed.

        Args:
            owner: The callback (one hook each).
            hook: Function `logs -> None`.
            params: The callback's `params` (one dict per `fit`: a new one
                starts a new `fit`, dropping hooks a failed `fit` left).
        """
        if params is not self._params:
            self._params = params
            self._hooks = {}
            self._hook_owners = {}
            self.loss.steps_per_epoch = (params or {}).get("steps")
            self.loss.start_fit()
            self.epoch = None
            self.batch = -1
            self._warned_no_loss = False
        self._hooks[_owner_key(owner)] = hook
        self._hook_owners[_owner_key(owner)] = weakref.ref(owner)
        _keras_internals.add_train_function_hook(self.model, self._after_call)
        # The step takes the guard's skipped steps out of Keras' epoch loss
        # (`drop_skipped_step`), for an owner with no in-graph values too.
        if (
            self._wrap_graph_sets()
            and getattr(self.model, "train_function", None) is not None
        ):
            self.model.make_train_function(force=True)

    def detach(self, owner):
        """Removes `owner`'s hook (from `on_train_end`); the model's train
        function is unwrapped when no hook is left."""
        self._hooks.pop(_owner_key(owner), None)
        self._hook_owners.pop(_owner_key(owner), None)
        if not self._hooks:
            _keras_internals.remove_train_function_hook(self.model, self._after_call)

    def ready_for_backup(self, params):
        """Whether the weights may be backed up now, by our callbacks in this `fit`.

        Asks each callback whose hook is attached in the `fit` of `params`
        (the `params` dict Keras gives every callback of one `fit`) and that
        has a `ready_for_backup()` method: a `GradientExplosionDetector`
        is not ready before its next look, nor at weights it could not take
        as a snapshot (see `keras_stability.distribute.BackupAndRestore`).
        """
        if params is None or params is not self._params:
            return True
        ready = True
        for owner in self._owners_with("ready_for_backup"):
            ready = bool(owner.ready_for_backup()) and ready
        return ready

    def _owners_with(self, method):
        """Our callbacks of this `fit` that have `method`."""
        for ref in list(self._hook_owners.values()):
            owner = ref()
            if owner is not None and callable(getattr(owner, method, None)):
                yield owner

    def backup_states(self, params):
        """`{key: state}` of our callbacks in the `fit` of `params` that keep
        state in a backup (`backup_state()`, a detector's)."""
        if params is None or params is not self._params:
            return {}
        return dict(owner.backup_state() for owner in self._owners_with("backup_state"))

    def backup_arrays(self, params):
        """`{key: {name: array}}` of our callbacks in the `fit` of `params`
        that keep arrays beside a backup (`backup_arrays()`, a detector's
        snapshots)."""
        if params is None or params is not self._params:
            return {}
        return dict(
            owner.backup_arrays() for owner in self._owners_with("backup_arrays")
        )

    def resume(self, params, states, arrays=None):
        """A backup was restored in the `fit` of `params`, with `states`
        (`backup_states`) and `arrays` (`backup_arrays`): our callbacks of
        that `fit` that have begun are told now (`resumed(states, arrays)`),
        those that begin later read them (`resumed_states`)."""
        self._resumed = (params, dict(states or {}), dict(arrays or {}))
        if params is None or params is not self._params:
            return
        for owner in self._owners_with("resumed"):
            owner.resumed(self._resumed[1], self._resumed[2])

    def resumed_states(self, params):
        """`(states, arrays)` of the backup restored in the `fit` of
        `params`, or `None`."""
        resumed = self._resumed
        if resumed is None or params is None or resumed[0] is not params:
            return None
        return resumed[1], resumed[2]

    def start_epoch(self, epoch):
        """Call from `on_epoch_begin` (once per epoch, however many callbacks call it)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._calls = 0
            self.epoch_end = None
            self.loss.start_epoch(epoch)

    def _after_call(self, logs):
        self._calls += 1
        per_call = max(1, int(getattr(self.model, "steps_per_execution", 1) or 1))
        self.batch = self._calls * per_call - 1  # Keras' `end_step`
        steps = (self._params or {}).get("steps")
        self.epoch_end = None if not steps else self.batch + 1 >= steps
        if not logs:
            return  # batches skipped without training (a resumed backup)
        # The raw loss is computed when read (`raw_loss`): a hook that does
        # not need it this call (the detector between its looks) costs no
        # host read.
        self._logs = logs
        for hook in list(self._hooks.values()):
            hook(logs)
        if self.epoch_end or getattr(self.model, "stop_training", False):
            empty_epoch_loss(self.model, logs)  # the epoch ends with this call

    def _update_raw_loss(self):
        logs, self._logs = self._logs, None
        if logs is None:
            return
        self._raw_loss = self.loss.update_once(self.batch, logs)
        self._loss_source = self.loss.source
        if self._loss_source is None and not self._warned_no_loss:
            self._warned_no_loss = True
            warnings.warn(
                f"keras_stability: model '{self.model.name}' gives no per-step "
                "loss: its train_step updates no loss tracker, logs no `loss` "
                "and does not call `self.optimizer.scale_loss(loss)`. `raw_loss` "
                "is NaN; the gradient-health callbacks use the gradient norm "
                "alone. Call `loss = self.optimizer.scale_loss(loss)` before "
                "taking the gradients (as Keras' own train_step does) to give "
                "them the loss.",
                stacklevel=3,
            )

    @property
    def raw_loss(self):
        """The raw loss of the last call (see the class docstring)."""
        self._update_raw_loss()
        return self._raw_loss

    @property
    def loss_source(self):
        """Where `raw_loss` came from (see the class docstring)."""
        self._update_raw_loss()
        return self._loss_source

    # -- in-graph values --------------------------------------------------
    def set_graph_values(self, key, values, before=None, owner=None):
        """Makes the compiled step also return `values()` (a dict of scalar tensors).

        `values` is called in the step after the optimizer update. Each
        `owner` (a callback) has one set of values per model, replaced when
        it sets another; the sets of several owners are all computed, in the
        order they were first set. They stay after `fit` (a later `fit` with
        the same callback logs them too, without retracing); a later `fit`
        without that callback drops them (`enter`).

        Args:
            key: Identifies `values`; the same key again changes nothing.
            values: Function `() -> {name: tensor}`, traced into the step
                (`(state, logs) -> {name: tensor}` with `before`).
            before: Optional function `(data) -> state`, traced into the
                step before the model's `train_step`, with the step's data.
                Defaults to `None`.
            owner: Whose values these are; `None` means one set for the
                whole model, as before. Defaults to `None`.

        Returns:
            Whether the train step changed; the train function must then be
            traced again (`model.make_train_function(force=True)`).
        """
        sets = self.__dict__.setdefault("_graph_sets", {})
        sets[None if owner is None else _owner_key(owner)] = (key, values, before)
        if owner is not None:
            self._set_owners[_owner_key(owner)] = weakref.ref(owner)
            self._remember(owner)
        return self._wrap_graph_sets()

    def tracker_in_step(self):
        """Keras' loss tracker around the step being traced, for an owner's values.

        Returns:
            `(before, after)`: the tracker's `(total, count)` tensors before
            and after the model's `train_step` (each `None` without a loss
            tracker), read once per step for all owners.

        Raises:
            RuntimeError: Outside the values of a step being traced.
        """
        tracker = getattr(self._in_step, "tracker", None)
        if tracker is None:
            raise RuntimeError("`tracker_in_step` is only known in a step's values")
        return tracker

    def _wrap_graph_sets(self):
        """Wraps the model's `train_step` with every owner's values, then
        `drop_skipped_step` (once, after them all: they see Keras' loss
        tracker as the model's `train_step` left it)."""
        model = self.model
        entries = list(self.__dict__.get("_graph_sets", {}).values())
        combined_key = ("drop_skipped_step",) + tuple(entry[0] for entry in entries)

        def before_all(data):
            return [tracker_totals(model)] + [
                entry[2](data) if entry[2] is not None else None for entry in entries
            ]

        def values_all(states, logs):
            # The tracker read once each side of `train_step`, for every
            # owner's values (`tracker_in_step`) and `drop_skipped_step`.
            before, states = states[0], states[1:]
            tracker = self._in_step.tracker = (before, tracker_totals(model))
            try:
                new = {}
                for (_, fn, fn_before), state in zip(entries, states, strict=True):
                    merged = dict(logs) if isinstance(logs, dict) else logs
                    if isinstance(merged, dict):
                        merged.update(new)
                    new.update(fn(state, merged) if fn_before is not None else fn())
                merged = dict(logs) if isinstance(logs, dict) else logs
                if isinstance(merged, dict):
                    merged.update(new)
                new.update(drop_skipped_step(model, *tracker, merged))
            finally:
                self._in_step.tracker = None
            return new

        return _keras_internals.wrap_train_step(
            self.model, combined_key, values_all, before_all
        )


# Our callbacks' keys in the dicts below: a number no other object ever gets.
# Keyed by `id(owner)`, a new callback whose `id` was a dead one's took over
# that one's entries (its observers left on the guard for nobody, under load
# where the cyclic garbage collector runs late).
_OWNER_KEYS = weakref.WeakKeyDictionary()
_SERIALS = itertools.count()


def _owner_key(owner):
    """`owner`'s key: given once, never reused (unlike `id`)."""
    key = _OWNER_KEYS.get(owner)
    if key is None:
        key = _OWNER_KEYS[owner] = next(_SERIALS)
    return key


def _config(callback):
    """The callback's `get_config()`, or `None` when it has none."""
    try:
        return callback.get_config()
    except Exception:  # a subclass without a usable `get_config`
        return None


def _same_config(a, b):
    """Whether two configurations are known and equal (arrays in them too)."""
    if a is None or b is None:
        return False
    try:
        return bool(a == b)
    except Exception:  # values without a truth value (e.g. NumPy arrays)
        return False


def tracker_totals(model):
    """In the step, before `train_step`: Keras' loss tracker's `(total,
    count)`, read once each (`None` when the model has no loss tracker)."""
    tracker = _keras_internals.loss_tracker(model)
    if tracker is None:
        return None
    return (
        _keras_internals.read(tracker.total),
        _keras_internals.read(tracker.count),
    )


def drop_skipped_step(model, before, after, logs):
    """In the step, after `train_step`: a skipped step leaves Keras' epoch loss.

    When the model's `GuardedOptimizer` skipped the step (for any reason:
    non-finite gradients, a spike, at a callback's request) and the step
    updated Keras' loss tracker (Keras' own `train_step`; a custom one's own
    `Mean` is left alone), the tracker goes back to its totals before the
    step (`before`; `after`: its totals now, both from `tracker_totals`)
    and the logged `loss` is the mean
    over the applied steps (`tracker_loss_logs`): one skipped NaN step does
    not make the epoch's `loss` NaN (nor set off `TerminateOnNaN`). The one
    place this is done (`StepLogs` runs it once per step, after every
    callback's values), so it happens once whichever of our callbacks are in
    the `fit`, in whatever order.

    Returns:
        `{"loss": tensor}`, or `{}` (no loss tracker, no guard, or no
        `loss` in `logs`).
    """
    tracker = _keras_internals.loss_tracker(model)
    guard = find_guard(model)
    skipped = getattr(guard, "last_step_skipped", None)
    if before is None or tracker is None or skipped is None:
        return {}
    total_before, count_before = before
    total_after, count_after = after
    used = ops.greater(count_after, count_before)
    drop = ops.logical_and(ops.greater(_keras_internals.read(skipped), 0), used)
    total = ops.where(drop, total_before, total_after)
    count = ops.where(drop, count_before, count_after)
    tracker.total.assign(total)
    tracker.count.assign(count)
    return tracker_loss_logs(tracker, logs, used, total, count)


def empty_epoch_loss(model, logs):
    """At the end of an epoch: its `loss` is NaN if no step of it was applied.

    While an epoch runs, a batch whose skipped update leaves the epoch's
    mean empty logs its own loss (`tracker_loss_logs`); an epoch with no
    applied step at all ends with NaN (never 0.0 nor a skipped step's loss,
    which a tuner minimising the loss would pick). One host read of Keras'
    loss tracker, once per epoch, by `StepLogs` after the epoch's last call
    (or the call after which a callback stops training), before any
    callback and before validation (whose `evaluate` resets the tracker).
    When the steps per epoch
    are unknown (a dataset of unknown length), the epoch's last batch is not
    known in time and its logged loss stays as above; so does a model with
    its own `train_step` (whose loss may be its own `Mean`'s, not Keras').
    """
    tracker = _keras_internals.loss_tracker(model)
    if tracker is None or not isinstance(logs, dict) or "loss" not in logs:
        return
    if type(model).train_step is not keras.Model.train_step:
        return  # its own `train_step` may keep its loss in its own `Mean`
    if float(_keras_internals.to_numpy(tracker.count)) == 0.0:
        logs["loss"] = math.nan


def tracker_loss_logs(tracker, logs, used, total=None, count=None):
    """The logged `loss` recomputed from Keras' loss tracker, in-graph.

    For a step whose wrapper took a skipped update back out of the tracker:
    the mean over the applied steps, only if the step updated the tracker
    (`used`, a boolean tensor); otherwise the step's own `loss` is kept.
    While no step of the epoch was applied (the epoch's first batch skipped,
    or a rollback's), the step's own loss if finite, else 0.0 (Keras' `Mean`
    of no value): never a NaN that no applied step produced, which would
    set off `TerminateOnNaN` (and fail a Keras Tuner trial) in a run the
    skip is rescuing. An epoch that ends with no applied step logs NaN
    (`empty_epoch_loss`). `total` and `count`: the tracker's values just
    assigned, as tensors (read from the tracker when `None`).

    Returns:
        `{"loss": tensor}`, or `{}` when `logs` has no `loss`.
    """
    if not (isinstance(logs, dict) and "loss" in logs):
        return {}
    count = ops.convert_to_tensor(tracker.count if count is None else count)
    total = tracker.total if total is None else total
    own = logs["loss"]  # with none applied before: this step's loss
    mean = ops.where(
        ops.greater(count, 0.0),
        ops.cast(ops.divide(total, ops.maximum(count, 1e-30)), own.dtype),
        ops.where(ops.isfinite(own), own, ops.zeros_like(own)),
    )
    return {"loss": ops.where(used, mean, own)}
