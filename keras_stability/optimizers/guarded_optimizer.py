"""`GuardedOptimizer`: clipping, step skipping and gradient statistics in-graph.

In Keras 3 the gradients only exist inside the compiled train step, and the one
place that sees them is the optimizer. `GuardedOptimizer` wraps any Keras 3
optimizer, as `keras.optimizers.LossScaleOptimizer` does, and acts on the
all-reduced gradient, so every replica takes the same decision.
"""

import contextlib
import warnings

import keras
import numpy as np
from keras import ops

from keras_stability import _keras_internals
from keras_stability import clipping as clipping_module
from keras_stability._checks import check_bool
from keras_stability._checks import check_nonnegative_int
from keras_stability._checks import check_str
from keras_stability._checks import invalid
from keras_stability.clipping.base import SquaredNorms
from keras_stability.clipping.base import stacked_global_norm
from keras_stability.clipping.base import stacked_squared_norms
from keras_stability.clipping.spike import SpikeSkipping

__all__ = ["GradientObserver", "GuardedOptimizer", "optimizer_chain"]

_STAT_NAMES = (
    "grad_norm",
    "clip_threshold",
    "steps_clipped",
    "steps_skipped_nonfinite",
    "steps_skipped_spike",
    "steps_skipped_requested",
    "last_step_skipped",
    "skip_remaining",
    "step",
)
_BASE_OPTIMIZER_DEFAULTS = {
    "weight_decay": None,
    "clipnorm": None,
    "global_clipnorm": None,
    "clipvalue": None,
    "use_ema": False,
    "ema_momentum": 0.99,
    "ema_overwrite_frequency": None,
    "loss_scale_factor": None,
    "gradient_accumulation_steps": None,
}


def state_variable(name, shape=(), dtype="float32", initializer="zeros"):
    """A non-trainable step-state variable, one value for all replicas.

    `aggregation="only_first_replica"`, so that a step may assign it in
    replica context under a `tf.distribute` strategy (see
    `GradientObserver`). Created in the strategy scope the caller is in.
    """
    return keras.Variable(
        initializer=initializer,
        shape=shape,
        dtype=dtype,
        trainable=False,
        aggregation="only_first_replica",
        name=name,
    )


class GradientObserver:
    """Base class for code that reads the gradients inside the train step.

    Register with `GuardedOptimizer(observers=[...])` or `add_observer`.

    - `build(optimizer, variables)` is called once, when the optimizer builds
      (or at once if added later). Create state with `optimizer.add_variable`
      (saved with the optimizer) or `keras.Variable`.
    - `observe(grads, variables, stats)` is called in-graph once per step with
      the all-reduced, unscaled, pre-clip gradients (entries may be `None`)
      and `stats`, a dict of scalar tensors: `"global_norm"` (float32),
      `"clip_threshold"` (float32), `"skipped"` (bool) and `"step"` (int, the
      0-based index of this call of `apply`, counting skipped steps), and
      `"squared_norms"`, the list of each gradient's float32 squared norm
      (`None` for a `None` gradient; for a `tf.IndexedSlices`, of its values),
      so observers need not compute them again (a `SquaredNorms` list: its
      `stacked` attribute holds them as one vector, to sum without
      stacking them again), `"loss"` (float32, the
      step's loss as seen by `GuardedOptimizer.scale_loss`, NaN when it was
      not called this step), `"loss_seen"` (bool) and `"update_step"`
      (bool: false on the calls where an inner optimizer with
      `gradient_accumulation_steps` only accumulates, when the gradients
      are the micro-batch's; true on its update steps, when they are the
      accumulated mean, and always true without accumulation).
    - `after_apply(variables, skipped)` is called in-graph after the update
      (or the skip).

    Under a `tf.distribute` strategy that uses merge calls (MirroredStrategy
    on CPUs, or without XLA) both hooks run once, in cross-replica context, on
    replica 0's copy of the all-reduced gradients; any `variable.assign` works
    there. Strategies without merge calls (MirroredStrategy on GPUs under XLA)
    run them in each replica with identical inputs: create observer state with
    `aggregation="only_first_replica"` (`state_variable`) so replica-context
    assignments are allowed (that path is not tested here: no GPU).
    """

    def build(self, optimizer, variables):
        del optimizer, variables

    def observe(self, grads, variables, stats):
        del grads, variables, stats

    def after_apply(self, variables, skipped):
        del variables, skipped


def optimizer_chain(optimizer):
    """`optimizer` and those it wraps (`inner_optimizer`), outermost first.

    Follows GuardedOptimizer, LossScaleOptimizer and any wrapper with an
    `inner_optimizer`; stops at a cycle. Empty for `None`.
    """
    chain = []
    while optimizer is not None and all(o is not optimizer for o in chain):
        chain.append(optimizer)
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return chain


def _gradients_already_reduced(optimizer):
    """Makes `optimizer` (and those it wraps) skip their own all-reduce."""
    return _keras_internals.gradients_already_reduced(optimizer_chain(optimizer))


@keras.saving.register_keras_serializable(package="keras_stability")
class GuardedOptimizer(keras.optimizers.Optimizer):
    """Wraps an optimizer with clipping, step skipping and gradient statistics.

    Each step, on the all-reduced and unscaled gradient (identical on every
    replica), the wrapper:

    1. computes the global norm and records it in `grad_norm`;
    2. decides to skip the step if the norm is non-finite (`skip_nonfinite`),
       if the host asked for it (`skip_next`), or if the norm is a spike
       (`skip_spikes`);
    3. otherwise clips with the `clipping` policy and lets the inner optimizer
       apply the update (with its own weight decay, EMA and gradient
       accumulation).

    A skipped step leaves the weights, the inner optimizer's moments and EMA,
    and `iterations` unchanged, like `LossScaleOptimizer`: the optimizer
    behaves as if the batch never came, so Adam's bias correction and learning
    rate schedules (which read `iterations`) advance only on applied steps.
    The `step` statistic counts every call, skipped or not. The clipping and
    spike statistics only learn from applied, finite steps.

    With `gradient_accumulation_steps` (N) on the inner optimizer, the guard
    clips and decides once per update, on the gradient the update uses:
    Keras' `apply` adds each micro-batch gradient to its accumulators and,
    on every N-th call (counted by its raw iterations), updates with
    `(g + sum) / N`. On that update step the guard measures this
    accumulated mean, lets the `clipping` policy and `skip_spikes` decide
    on it (they learn from update steps only), and hands the inner
    optimizer `g` untouched when the mean is not clipped, or `N` times the
    clipped mean over emptied accumulators when it is, so the update uses
    the clipped mean (as Keras' own `clipnorm` clips the average). On the
    other calls nothing is clipped: the micro-batch is only accumulated,
    unless it is non-finite (or skipped by `skip_next` or the trip), then
    it is dropped, not accumulated, and the raw iterations do not advance,
    so one NaN micro-batch never poisons the sum and the update still
    averages N micro-batches. A skipped update step whose own micro-batch is
    non-finite drops only that micro-batch (the window waits for a finite
    one); an update step skipped for any other reason (a spike,
    `skip_next`, the trip) drops the whole window: the accumulators are
    emptied and the raw iterations go back to the window's start, so the
    weights, moments, `iterations` and the learning rate schedule are as if
    its N micro-batches never came (Keras' EMA, which moves on every call,
    did see them), and the next N start a clean window. `grad_norm`, and
    what observers get (`grads`, `"global_norm"`, `"squared_norms"`), are
    the micro-batch's on accumulate-only calls and the accumulated mean's on
    update steps, both dense; `stats["update_step"]` tells them apart.
    `steps_clipped` counts clipped updates and `clip_threshold` is the last
    update step's. Under `tf.distribute` (merge-call strategies) the inner
    optimizer is then applied in cross-replica context, since Keras 3.15's
    own accumulation fails in replica context there.

    Statistics (non-trainable scalar variables, readable after any step):
    `grad_norm` (pre-clip global norm), `clip_threshold` (`inf` without a
    policy; `clip_factor` for AGC), `steps_clipped`,
    `steps_skipped_nonfinite`, `steps_skipped_spike`,
    `steps_skipped_requested`, `last_step_skipped` (0/1), `skip_remaining`
    and `step`. A skipped step counts in exactly one counter (non-finite
    before requested before spike).

    The loss of each step: Keras' `train_step` calls `optimizer.scale_loss`
    with the step's loss before it computes the gradients; the guard records
    that value and, in the same step's `apply`, publishes it as `step_loss`
    (float32, the mean over replicas of each replica's loss, as Keras' loss
    tracker computes it, summed from the replicas' local copies with no
    collective of its own: under a multi-worker strategy the mean over this
    worker's replicas, and where the strategy has no merge call
    (MirroredStrategy on GPUs under XLA, not tested here) each replica's own
    loss; NaN when `scale_loss` was not called since the last
    `apply`) and `loss_seen` (int32, 1 if it was called, else 0). A custom
    `train_step` that never calls `self.optimizer.scale_loss(loss)` (the
    keras.io "lower-level" pattern, a GAN's own optimizers) leaves
    `loss_seen` at 0. With `steps_per_execution > 1` both are those of the
    last step of the execution (observers see every step's). Not recorded
    under a `LossScaleOptimizer`, whose `scale_loss` does not call the inner
    optimizer's. `step_loss_info()` returns both as tensors (under a
    strategy read the variables with `.numpy()`). They are not saved with
    the optimizer and not in `statistics()`.

    Under mixed precision let `compile` wrap this optimizer in a
    `LossScaleOptimizer` (it does so for `mixed_float16`): the loss scale
    optimizer unscales the gradients before this one measures them. An inner
    optimizer's static `loss_scale_factor` works as in Keras: `scale_loss`
    multiplies the loss by it (the guard records the loss before), and the
    guard divides the gradients by it before it measures them, then lets the
    inner optimizer apply them without dividing again.

    Args:
        inner_optimizer: A Keras 3 `keras.optimizers.Optimizer`. With a
            `clipping` policy it must not clip by itself (`clipnorm`,
            `clipvalue`, `global_clipnorm` unset); without one its own
            clipping is kept: it clips what the guard hands it, the
            all-reduced gradient of an applied step (so, unlike Keras alone,
            which clips each replica's gradient before the all-reduce, the
            same under `MirroredStrategy` as on one device), and
            `grad_norm` and the observers see the gradient before it.
        clipping: A `keras_stability.clipping` policy, a positive number
            (meaning `GlobalNorm(number)`) or `None`. Defaults to `None`.
        skip_nonfinite: Whether to skip steps whose gradient contains NaN or
            Inf (or whose norm overflows float32). Defaults to `True`.
        skip_spikes: `None`/`False` (off), `True` (`SpikeSkipping()` with
            OLMo's defaults) or a `SpikeSkipping`. Defaults to `None`.
        observers: List of `GradientObserver`s. They are runtime attachments
            and are not serialized (`get_config` has `observers=None`).
            Defaults to `None`.
        name: Optional name. Defaults to `None`.
        **kwargs: The base optimizer's arguments (`weight_decay`,
            `clipnorm`, `use_ema`, ...) are refused unless left at their
            defaults: set them on `inner_optimizer`.

    Raises:
        ValueError: for an inner optimizer that is not a Keras 3 optimizer,
            clips by itself while `clipping` is set or is a
            `LossScaleOptimizer`; for an invalid policy; for any argument of
            the wrong kind.

    Example:

    ```python
    optimizer = GuardedOptimizer(keras.optimizers.Adam(1e-3),
                                 clipping=keras_stability.clipping.ZClip())
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y)
    float(optimizer.grad_norm), int(optimizer.steps_clipped)
    ```
    """

    def __init__(
        self,
        inner_optimizer,
        clipping=None,
        skip_nonfinite=True,
        skip_spikes=None,
        observers=None,
        name=None,
        **kwargs,
    ):
        for arg_name, default in _BASE_OPTIMIZER_DEFAULTS.items():
            if arg_name in kwargs:
                value = kwargs.pop(arg_name)
                if value != default:
                    raise invalid(
                        arg_name,
                        value,
                        f"{default!r}: GuardedOptimizer does not support "
                        f"`{arg_name}`; set it on the `inner_optimizer`",
                    )
        if kwargs:
            raise TypeError(
                "GuardedOptimizer.__init__() got unexpected keyword arguments: "
                f"{sorted(kwargs)}"
            )
        clipping = clipping_module.get_policy("clipping", clipping)
        _check_inner_optimizer(inner_optimizer, clipping)
        skip_spikes = _get_spike_skipping(skip_spikes)
        skip_nonfinite = check_bool("skip_nonfinite", skip_nonfinite)
        name = check_str("name", name, allow_none=True)
        if observers is not None and not (
            isinstance(observers, (list, tuple))
            and all(isinstance(o, GradientObserver) for o in observers)
        ):
            raise invalid(
                "observers",
                observers,
                "None or a list of keras_stability.optimizers.GradientObserver",
            )
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self.clipping = clipping
        self.skip_nonfinite = skip_nonfinite
        self.skip_spikes = skip_spikes
        self._observers = []
        self._observer_variables = []
        self._observer_owned = {}  # id(observer) -> the variables it created
        self._pending_observer_values = {}
        self._trip_traced = False  # whether `_decide` includes the trip (`set_trip`)
        self._trip_limit = -1
        for observer in observers or []:
            self.add_observer(observer)

    # ------------------------------------------------------------------ state
    def build(self, var_list):
        def stat(name, dtype):
            return self.add_variable(
                shape=(),
                dtype=dtype,
                initializer="zeros",
                aggregation="only_first_replica",
                name=name,
            )

        self.grad_norm = stat("grad_norm", "float32")
        self.clip_threshold = stat("clip_threshold", "float32")
        self.steps_clipped = stat("steps_clipped", "int32")
        self.steps_skipped_nonfinite = stat("steps_skipped_nonfinite", "int32")
        self.steps_skipped_spike = stat("steps_skipped_spike", "int32")
        self.steps_skipped_requested = stat("steps_skipped_requested", "int32")
        self.last_step_skipped = stat("last_step_skipped", "int32")
        self.skip_remaining = stat("skip_remaining", "int32")
        self.step = stat("step", "int32")
        self._build_loss_record()
        if self.clipping is not None:
            self.clipping.build(self, var_list)
        if self.skip_spikes is not None:
            self.skip_spikes.build(self)
        if not self.inner_optimizer.built:
            self.inner_optimizer.build(var_list)
        super().build(var_list)
        for observer in self._observers:
            self._build_observer(observer)

    def _build_loss_record(self):
        # Kept out of the tracked variables: not saved (a file saved before
        # they existed still loads) and not in `variables`.
        with keras.name_scope(self.name, caller=self):
            # Per replica: [loss given to `scale_loss`, 1 if it was called].
            pending = keras.Variable(
                initializer="zeros",
                shape=(2,),
                dtype="float32",
                trainable=False,
                synchronization="on_read",
                aggregation="sum",
                name="pending_loss",
            )
            step_loss = state_variable("step_loss")
            loss_seen = state_variable("loss_seen", dtype="int32")
            # The trip flag (`set_trip`): 1 while every step is held back,
            # and the run of non-finite steps that raises it.
            tripped = state_variable("tripped", dtype="int32")
            nonfinite_run = state_variable("nonfinite_run", dtype="int32")
            # Initialized, not assigned: Keras may build the optimizer in a
            # stateless scope (its symbolic build), which drops assignments.
            trip_limit = state_variable(
                "trip_limit",
                dtype="int32",
                initializer=keras.initializers.Constant(
                    getattr(self, "_trip_limit", -1)
                ),
            )
        self._loss_record = _LossRecord(
            pending, step_loss, loss_seen, tripped, nonfinite_run, trip_limit
        )
        step_loss.assign(float("nan"))

    @property
    def step_loss(self):
        """The loss of the last step (a float32 variable; NaN if not seen).

        See the class docstring: the value given to `scale_loss` in the step,
        averaged over replicas. `None` before the optimizer is built.
        """
        record = getattr(self, "_loss_record", None)
        return None if record is None else record.step_loss

    @property
    def loss_seen(self):
        """Whether the last step called `scale_loss` (an int32 variable, 0/1).

        `None` before the optimizer is built.
        """
        record = getattr(self, "_loss_record", None)
        return None if record is None else record.loss_seen

    def step_loss_info(self):
        """The last step's `(loss, seen)` as tensors (float32, bool).

        Usable in-graph (an observer's `after_apply`, a train step wrapper)
        and eagerly (`float(loss)`, `bool(seen)`). `loss` is NaN when `seen`
        is False. Before the optimizer is built: `(NaN, False)`.
        """
        record = getattr(self, "_loss_record", None)
        if record is None:
            return (
                ops.convert_to_tensor(float("nan"), "float32"),
                ops.convert_to_tensor(False),
            )
        return (
            ops.convert_to_tensor(record.step_loss),
            ops.greater(ops.convert_to_tensor(record.loss_seen), 0),
        )

    def _build_observer(self, observer):
        start = len(self._variables)
        observer.build(self, self._trainable_variables)
        new = self._variables[start:]
        self._observer_variables.extend(new)
        self._observer_owned[id(observer)] = list(new)
        keys = self._observer_keys()
        for variable in new:
            key = keys[id(variable)]
            if key in self._pending_observer_values:
                variable.assign(self._pending_observer_values.pop(key))

    def add_observer(self, observer):
        """Registers a `GradientObserver`; builds it now if the optimizer is built.

        Variables created after a train function was traced are only used
        once it is traced again (`model.make_train_function(force=True)`).
        """
        if not isinstance(observer, GradientObserver):
            raise invalid(
                "observer", observer, "a keras_stability.optimizers.GradientObserver"
            )
        if observer in self._observers:
            return observer
        self._observers.append(observer)
        if self.built:
            self._build_observer(observer)
        return observer

    def remove_observer(self, observer):
        """Unregisters `observer` and drops the variables it created.

        The observer keeps its variables (its last statistics stay readable)
        but they are no longer the optimizer's: not saved with it, and not
        computed once the train function is traced again
        (`model.make_train_function(force=True)`).

        Returns:
            Whether `observer` was registered.
        """
        if observer not in self._observers:
            return False
        self._observers.remove(observer)
        owned = {id(v) for v in self._observer_owned.pop(id(observer), [])}
        self._observer_variables = [
            v for v in self._observer_variables if id(v) not in owned
        ]
        self._variables = [v for v in self._variables if id(v) not in owned]
        return True

    @property
    def observers(self):
        return list(self._observers)

    def skip_next(self, n=1):
        """Skips the next `n` steps (host side; the decision runs in-graph).

        Args:
            n: Integer >= 0. Defaults to `1`.
        """
        n = check_nonnegative_int("n", n)
        if not self.built:
            raise ValueError(
                "`skip_next` needs a built optimizer: call it once training has "
                "started, or `optimizer.build(model.trainable_variables)`."
            )
        self.skip_remaining.assign(n)

    def set_trip(self, max_consecutive_nonfinite):
        """Holds back every step, in-graph, after a failure the host must see.

        With a trip set, the guard raises its trip flag (`tripped`) at a step
        whose loss (as seen by `scale_loss`) is non-finite while its
        gradients are finite (an update that would be applied; a step with
        non-finite gradients is skipped anyway), or that makes more than
        `max_consecutive_nonfinite` non-finite steps in a row;
        from that step on every step is skipped (counted in
        `steps_skipped_requested`) until the host calls `clear_trip()`. A
        callback that looks at the guard only every few steps
        (`GradientExplosionDetector`) uses it so that no update gets
        through between its looks once training has gone wrong. The
        decision is taken on the all-reduced values, identical on every
        replica. A runtime setting, not serialized: the limit is a
        variable, so changing it (or turning it off with `None`) needs no
        new trace, but the first `set_trip` on a built guard adds the check
        to the step (trace the train function again,
        `model.make_train_function(force=True)`).

        Args:
            max_consecutive_nonfinite: Integer >= 0, or `None` to turn the
                trip off.

        Returns:
            Whether the step must be traced again (the check is new to it).

        Raises:
            ValueError: For an invalid limit.
        """
        if max_consecutive_nonfinite is not None:
            max_consecutive_nonfinite = check_nonnegative_int(
                "max_consecutive_nonfinite", max_consecutive_nonfinite
            )
        self._trip_limit = (
            -1 if max_consecutive_nonfinite is None else max_consecutive_nonfinite
        )
        record = getattr(self, "_loss_record", None)
        if record is not None:
            record.trip_limit.assign(self._trip_limit)
            self.clear_trip()
        if max_consecutive_nonfinite is None or self._trip_traced:
            return False
        self._trip_traced = True
        return True

    @property
    def tripped(self):
        """The trip flag (an int32 variable, 1 while steps are held back).

        See `set_trip`. `None` before the optimizer is built.
        """
        record = getattr(self, "_loss_record", None)
        return None if record is None else record.tripped

    def clear_trip(self):
        """Lowers the trip flag and forgets the run of non-finite steps (host)."""
        record = getattr(self, "_loss_record", None)
        if record is not None:
            record.tripped.assign(0)
            record.nonfinite_run.assign(0)

    def _trip(self, finite, loss, loss_seen):
        """The trip flag after this step (a bool tensor), updated in-graph."""
        record = self._loss_record
        limit = _keras_internals.read(record.trip_limit)  # one read, two uses
        run = ops.where(finite, 0, ops.add(record.nonfinite_run.value, 1))
        bad_loss = ops.logical_and(loss_seen, ops.logical_not(ops.isfinite(loss)))
        if self.skip_nonfinite:
            # A step with non-finite gradients is skipped here anyway (a NaN
            # batch); only a non-finite loss whose update would be applied
            # needs the host. Tripping on every NaN batch held back the
            # healthy batches after it until the next look.
            bad_loss = ops.logical_and(bad_loss, finite)
        tripped = ops.logical_or(
            ops.greater(record.tripped.value, 0),
            ops.logical_and(
                ops.greater_equal(limit, 0),
                ops.logical_or(bad_loss, ops.greater(run, limit)),
            ),
        )
        record.nonfinite_run.assign(ops.cast(run, "int32"))
        record.tripped.assign(ops.cast(tripped, "int32"))
        return tripped

    def set_clipping(self, clipping):
        """Gives a guard without a clipping policy the one asked for.

        Lets several callbacks each ask for their part of one guard, in any
        order (`keras_stability.optimizers.ensure_guarded`). The policy is
        built at once if the guard is built; trace the train function again
        (`model.make_train_function(force=True)`) for it to act.

        Args:
            clipping: A `keras_stability.clipping` policy, a positive number
                (`GlobalNorm`) or its serialized dict.

        Returns:
            Whether the guard changed (`False` if it already had this policy).

        Raises:
            ValueError: For an invalid policy, if the guard already clips
                with a different one (a policy's state cannot be swapped
                mid-training), or if the inner optimizer clips by itself
                (`clipnorm`, `global_clipnorm`, `clipvalue`).
        """
        policy = clipping_module.get_policy("clipping", clipping)
        if policy is None:
            raise invalid(
                "clipping",
                clipping,
                "a keras_stability.clipping policy or a positive number",
            )
        if self.clipping is not None:
            if _same_config(self.clipping, policy):
                return False
            raise ValueError(
                "Invalid value for argument `clipping`. The optimizer is already a "
                f"GuardedOptimizer with clipping={self.clipping!r}; cannot also "
                f"apply clipping={policy!r}. Received: clipping={clipping!r}"
            )
        _check_no_own_clipping(self.inner_optimizer, policy)
        self.clipping = policy
        if self.built:
            policy.build(self, self._trainable_variables)
        return True

    def set_skip_spikes(self, skip_spikes):
        """Gives a guard without spike skipping the one asked for.

        The counterpart of `set_clipping` for `skip_spikes`.

        Args:
            skip_spikes: `True` (`SpikeSkipping()`, or whatever spike
                skipping the guard has already: `True` asks for spike
                skipping, not for settings), a `SpikeSkipping` (or
                `RobustSpikeSkipping`) or its serialized dict.

        Returns:
            Whether the guard changed.

        Raises:
            ValueError: For an invalid value, or if the guard already skips
                spikes with different settings than the instance given.
        """
        spikes = _get_spike_skipping(skip_spikes)
        if spikes is None:
            raise invalid(
                "skip_spikes",
                skip_spikes,
                "True or a keras_stability.clipping.SpikeSkipping",
            )
        if self.skip_spikes is not None and skip_spikes is True:
            return False  # spike skipping asked for, and there is some
        if self.skip_spikes is not None:
            if _same_config(self.skip_spikes, spikes):
                return False
            raise ValueError(
                "Invalid value for argument `skip_spikes`. The optimizer is already "
                f"a GuardedOptimizer with skip_spikes={self.skip_spikes.get_config()}; "
                f"cannot also apply skip_spikes={spikes.get_config()}. Received: "
                f"skip_spikes={skip_spikes!r}"
            )
        self.skip_spikes = spikes
        if self.built:
            spikes.build(self)
        return True

    def statistics(self):
        """Current statistics as a dict of Python numbers (host read).

        The saved statistics of the class docstring (not `step_loss` and
        `loss_seen`: read those, or `step_loss_info()`, directly).
        """
        if not self.built:
            return {}
        return {name: getattr(self, name).numpy().item() for name in _STAT_NAMES}

    @property
    def variables(self):
        return self._variables[:] + self.inner_optimizer.variables

    def _own_core_variables(self):
        """The guard's own state in the saved (positional, as Keras') layout.

        `build` makes the guard's state, then the clipping policy's, then the
        spike skipping's. A part added to a built guard (`set_clipping`,
        `set_skip_spikes`, in any order) is created after the others; its
        state is still listed in `build`'s place, so a file loads into a
        guard whose parts were added in another order, or at build.
        """
        parts = [
            variable
            for component in (self.clipping, self.skip_spikes)
            if component is not None
            for variable in getattr(component, "state_variables", [])
        ]
        ids = {id(v) for v in self._observer_variables} | {id(v) for v in parts}
        return [v for v in self._variables if id(v) not in ids] + parts

    def _observer_keys(self):
        keys, seen = {}, {}
        for variable in self._observer_variables:
            base = f"observer:{variable.name}"
            seen[base] = seen.get(base, -1) + 1
            keys[id(variable)] = f"{base}:{seen[base]}"
        return keys

    def save_own_variables(self, store):
        # Core state keyed by position, as Keras does; observer state by name,
        # so a file saved with observers loads without them and vice versa.
        core = self._own_core_variables() + self.inner_optimizer.variables
        for i, variable in enumerate(core):
            store[str(i)] = variable.numpy()
        keys = self._observer_keys()
        for variable in self._observer_variables:
            store[keys[id(variable)]] = variable.numpy()

    def load_own_variables(self, store):
        core = self._own_core_variables() + self.inner_optimizer.variables
        numeric = [k for k in store.keys() if k.isdigit()]
        if len(numeric) != len(core):
            warnings.warn(
                f"Skipping variable loading for optimizer '{self.name}', because "
                f"it has {len(core)} variables whereas the saved optimizer has "
                f"{len(numeric)} variables.",
                stacklevel=2,
            )
            return
        for i, variable in enumerate(core):
            variable.assign(store[str(i)])
        keys = self._observer_keys()
        by_key = {keys[id(v)]: v for v in self._observer_variables}
        for key in store.keys():
            if key.isdigit():
                continue
            value = np.array(store[key])  # a copy: the file may close
            if key in by_key:
                by_key[key].assign(value)
            else:
                self._pending_observer_values[key] = value

    # ------------------------------------------------------------- delegation
    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    @property
    def loss_scale_factor(self):
        """The inner optimizer's static loss scale (the guard has none of its own)."""
        inner = self.__dict__.get("inner_optimizer")
        return None if inner is None else inner.loss_scale_factor

    @loss_scale_factor.setter
    def loss_scale_factor(self, value):
        # Keras' LossScaleOptimizer sets `None` on the optimizer it wraps, so
        # that its dynamic scale replaces a static one: passed on, as Keras
        # does for `LossScaleOptimizer(Adam(loss_scale_factor=...))`.
        inner = self.__dict__.get("inner_optimizer")
        if inner is not None:
            inner.loss_scale_factor = value

    def scale_loss(self, loss):
        """The inner optimizer's `scale_loss`; also records `loss` for this step.

        Keras' `train_step` calls it with the step's loss (on each replica,
        divided by the number of replicas) before computing the gradients.
        """
        record = getattr(self, "_loss_record", None)
        if record is not None:
            value = ops.cast(ops.mean(ops.convert_to_tensor(loss)), "float32")
            record.pending.assign(ops.stack([value, ops.ones((), "float32")]))
        return self.inner_optimizer.scale_loss(loss)

    @staticmethod
    def _distribution_strategy_replicas():
        import tensorflow as tf

        return tf.distribute.get_strategy().num_replicas_in_sync

    def _take_pending_loss(self):
        """This replica's `[loss, seen]` since the last `apply`, then clears it."""
        record = getattr(self, "_loss_record", None)
        if record is None:
            return None
        pending = ops.add(record.pending.value, 0.0)  # a snapshot, read before reset
        record.pending.assign(ops.zeros((2,), "float32"))
        return pending

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def apply_gradients(self, grads_and_vars):
        grads, trainable_variables = zip(*grads_and_vars, strict=True)
        self.apply(grads, trainable_variables)
        return self.iterations

    # ------------------------------------------------------------------ step
    def apply(self, grads, trainable_variables=None):
        grads = list(grads)
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "When passing `grads` without `variables`, the optimizer must "
                    "already be built. Call `optimizer.build(trainable_variables)`."
                )
            trainable_variables = self._trainable_variables
        trainable_variables = list(trainable_variables)
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        if len(grads) == 0:
            return
        pending = self._take_pending_loss()
        scale = self.inner_optimizer.loss_scale_factor
        if scale is not None:
            # The inner optimizer's static loss scaling: `scale_loss`
            # multiplied the loss, so unscale here, as Keras' `apply` does,
            # before anything measures the gradients; the inner optimizer
            # then must not unscale them again.
            grads = [g if g is None else g / scale for g in grads]
        with _loss_scale_off(self.inner_optimizer):
            if keras.backend.backend() == "tensorflow":
                self._tf_apply(grads, trainable_variables, pending)
            else:
                self._guarded_apply(grads, trainable_variables, pending)

    def _record_loss(self, pending):
        """Publishes the step's loss; returns `(loss, seen)` tensors."""
        record = getattr(self, "_loss_record", None)
        if pending is None:
            loss = ops.convert_to_tensor(float("nan"), "float32")
            seen = ops.convert_to_tensor(False)
        else:
            seen = ops.greater(pending[1], 0.0)
            loss = ops.where(seen, pending[0], float("nan"))
        if record is None:
            return loss, seen
        record.step_loss.assign(loss)
        record.loss_seen.assign(ops.cast(seen, "int32"))
        return loss, seen

    def _decide(self, grads, variables, pending=None, update=None):
        """Measures `grads`, decides skip/clip, updates the statistics.

        `update` is `None` without gradient accumulation; with it, a bool
        tensor: whether this call is the inner optimizer's update step
        (`grads` are then the accumulated mean, see `_window`). Clipping and
        spikes act, and their policies learn, only on update steps.

        Returns:
            `(skip, norm, threshold, nonfinite_skip)`.
        """

        def on_update(flag):
            return flag if update is None else ops.logical_and(flag, update)

        loss, loss_seen = self._record_loss(pending)
        # One vector of squared norms; split per gradient only for observers.
        stacked = stacked_squared_norms(grads)
        norm = stacked_global_norm(stacked[0])
        finite = ops.isfinite(norm)
        remaining = _keras_internals.read(self.skip_remaining)  # one read
        requested = ops.greater(remaining, 0)
        asked = requested  # by `skip_next`
        held = None
        if self._trip_traced and getattr(self, "_loss_record", None) is not None:
            held = self._trip(finite, loss, loss_seen)
        # Flags known when tracing (no policy, no spike skipping, the
        # `skip_nonfinite` setting) stay Python values: no op for them.
        nonfinite_skip = ops.logical_not(finite) if self.skip_nonfinite else False
        if self.clipping is not None:
            threshold, clip_state = self.clipping.threshold(norm)
        else:
            threshold, clip_state = ops.convert_to_tensor(float("inf")), []
        if self.skip_spikes is not None:
            spike, spike_state = self.skip_spikes.detect(norm)
            spike = on_update(ops.logical_and(spike, finite))
        else:
            spike, spike_state = False, []
        if held is not None:
            # A held step counts as requested (by the host, through the trip).
            requested = ops.logical_or(requested, held)
        other_skip = _or(nonfinite_skip, requested)
        skip = _or(other_skip, spike)
        if self.clipping is not None:
            accept = on_update(ops.logical_and(ops.logical_not(skip), finite))
            self.clipping.commit(clip_state, accept)
            _, clipped = self.clipping.clip(grads, variables, norm, threshold)
            clipped = on_update(ops.logical_and(clipped, ops.logical_not(skip)))
        else:
            clipped = False
        if self.skip_spikes is not None:
            # Spikes are skipped without being recorded; other skips record nothing.
            self.skip_spikes.commit(
                spike_state,
                on_update(ops.logical_and(finite, ops.logical_not(other_skip))),
            )

        def count(flag):
            return ops.cast(flag, "int32")

        def count_in(variable, flag):
            if flag is not False:  # a counter of a flag always false stays
                _keras_internals.assign_add(variable, count(flag))

        requested_skip = (
            requested
            if nonfinite_skip is False
            else ops.logical_and(requested, ops.logical_not(nonfinite_skip))
        )
        spike_skip = (
            False
            if spike is False
            else ops.logical_and(spike, ops.logical_not(other_skip))
        )
        # A snapshot for the observers, read before += 1.
        step = _keras_internals.read(self.step) if self._observers else None
        self.grad_norm.assign(norm)
        if update is None:
            self.clip_threshold.assign(ops.cast(threshold, "float32"))
        else:  # the threshold of the last update step
            self.clip_threshold.assign(
                ops.where(
                    update, ops.cast(threshold, "float32"), self.clip_threshold.value
                )
            )
        count_in(self.steps_clipped, clipped)
        count_in(self.steps_skipped_nonfinite, nonfinite_skip)
        count_in(self.steps_skipped_requested, requested_skip)
        count_in(self.steps_skipped_spike, spike_skip)
        self.last_step_skipped.assign(count(skip))
        self.skip_remaining.assign(ops.maximum(remaining - count(asked), 0))
        _keras_internals.assign_add(self.step, 1)
        if self._observers:
            stats = {
                "global_norm": norm,
                "clip_threshold": ops.cast(threshold, "float32"),
                "skipped": ops.convert_to_tensor(skip),
                "step": step,
                "squared_norms": SquaredNorms.split(stacked, len(grads)),
                "loss": loss,
                "loss_seen": loss_seen,
                "update_step": ops.convert_to_tensor(True)
                if update is None
                else update,
            }
            grads, variables, stats["squared_norms"] = self._observed(
                grads, variables, stats["squared_norms"]
            )
            for observer in self._observers:
                observer.observe(grads, variables, stats)
        return skip, norm, threshold, nonfinite_skip

    def _observed(self, grads, variables, squares=None):
        """`grads`/`variables` over every variable the observers were built on.

        A step may update a subset of the built variables (layers frozen or
        unfrozen during `fit`, as `GradualUnfreezing` does); observers build
        per-variable state once, so they get the whole list, with `None`
        gradients (and squared norms) for the variables not in this step.
        """
        built = self._trainable_variables
        if len(variables) == len(built) and all(
            a is b for a, b in zip(variables, built, strict=True)
        ):
            return grads, variables, squares
        position = {self._var_key(v): i for i, v in enumerate(built)}
        full_grads = [None] * len(built)
        full_squares = [None] * len(built)
        for i, v in enumerate(variables):
            j = position.get(self._var_key(v))
            if j is not None:
                full_grads[j] = grads[i]
                full_squares[j] = None if squares is None else squares[i]
        return full_grads, list(built), full_squares

    def _clip_and_apply(self, grads, variables, norm, threshold):
        if self.clipping is not None:
            grads, _ = self.clipping.clip(grads, variables, norm, threshold)
        self.inner_optimizer.apply(grads, variables)

    def _after_apply(self, variables, skip):
        if self._observers:
            _, variables, _ = self._observed([None] * len(variables), variables)
        for observer in self._observers:
            observer.after_apply(variables, skip)

    def _guarded_apply(self, grads, variables, pending=None):
        """The whole step where every caller sees the same reduced gradients."""
        self._decide_and_apply(
            grads,
            variables,
            pending,
            lambda norm, threshold: self._clip_and_apply(
                grads, variables, norm, threshold
            ),
        )

    def _decide_and_apply(self, grads, variables, pending, apply, strategy=None):
        """Decides on `grads` and, unless the step is skipped, applies it.

        Without gradient accumulation `apply(norm, threshold)` clips and
        applies. With it the decision is taken on `_window`'s gradients and
        `_accumulate_and_apply` applies here, in the current context (under
        `strategy`, cross-replica context: see `merge_calls_inline`).
        """
        window = self._window(grads, variables)
        if window is None:
            skip, norm, threshold, _ = self._decide(grads, variables, pending)

            def apply_fn():
                with _gradients_already_reduced(self.inner_optimizer):
                    apply(norm, threshold)

            ops.cond(skip, lambda: None, apply_fn)
        else:
            skip, norm, threshold, nonfinite_skip = self._decide(
                window.measured, variables, pending, window.update
            )
            # A skipped update drops its window, unless its own micro-batch
            # is what is non-finite: then only that micro-batch is dropped.
            drop = ops.logical_and(window.update, ops.logical_not(nonfinite_skip))

            def accumulate_fn():
                with _gradients_already_reduced(self.inner_optimizer):
                    self._accumulate_and_apply(
                        window, variables, norm, threshold, strategy
                    )

            ops.cond(skip, lambda: self._drop_window(window, drop), accumulate_fn)
        self._after_apply(variables, skip)

    def _window(self, grads, variables):
        """This call's place in the inner optimizer's gradient accumulation.

        `None` without `gradient_accumulation_steps`. Otherwise a `_Window`
        whose `measured` gradients are, on the update step (the N-th call,
        counted by the inner optimizer's raw iterations), the mean Keras
        will update with, `(g + accumulator) / N` computed as Keras does,
        and on the other calls the micro-batch gradient `g`. Gradients are
        made dense (`tf.IndexedSlices` too, as Keras adds them to its dense
        accumulators).
        """
        steps = self.inner_optimizer.gradient_accumulation_steps
        if not steps:
            return None
        iterations = _keras_internals.raw_iterations(self.inner_optimizer)
        update = ops.equal(ops.mod(ops.add(iterations, 1), steps), 0)
        accumulators = _keras_internals.gradient_accumulators(
            self.inner_optimizer, variables
        )
        dense, measured = [], []
        for g, accumulator in zip(grads, accumulators, strict=True):
            if g is not None:
                g = ops.convert_to_tensor(g)
            dense.append(g)
            measured.append(
                None if g is None else ops.where(update, (g + accumulator) / steps, g)
            )
        return _Window(steps, update, dense, measured, accumulators)

    def _accumulate_and_apply(self, window, variables, norm, threshold, strategy):
        """Passes the inner optimizer a micro-batch, or an update on the clipped mean.

        Keras updates with `(g + accumulator) / N`. An update whose mean is
        not clipped gets `g` untouched (Keras' numbers, bit for bit); a
        clipped one gets `N * clipped_mean` over emptied accumulators, so
        Keras updates with `(N * clipped_mean) / N` (exact for N a power of
        two, else within float32 rounding).
        """
        grads = window.grads
        if self.clipping is not None:
            means, clipped = self.clipping.clip(
                window.measured, variables, norm, threshold
            )
            clipped = ops.logical_and(clipped, window.update)
            grads = [
                None if g is None else ops.where(clipped, m * window.steps, g)
                for g, m in zip(grads, means, strict=True)
            ]
            for g, accumulator in zip(grads, window.accumulators, strict=True):
                if g is not None:
                    accumulator.assign(
                        ops.where(clipped, ops.zeros_like(accumulator), accumulator)
                    )
        if strategy is None:
            self.inner_optimizer.apply(grads, variables)
            return
        with _keras_internals.merge_calls_inline(strategy):
            self.inner_optimizer.apply(grads, variables)

    def _drop_window(self, window, drop):
        """Where `drop`: empties the accumulators, goes back to the window's start."""
        for accumulator in _keras_internals.gradient_accumulators(self.inner_optimizer):
            accumulator.assign(
                ops.where(drop, ops.zeros_like(accumulator), accumulator)
            )
        iterations = _keras_internals.raw_iterations(self.inner_optimizer)
        iterations.assign(
            ops.where(drop, ops.subtract(iterations, window.steps - 1), iterations)
        )

    def _tf_apply(self, grads, variables, pending=None):
        """TensorFlow-specific logic: all-reduce first, then decide once.

        Keras' own path clips each replica's gradient and all-reduces inside
        the update. Here the gradients are summed across replicas first (the
        same `ReduceOp.SUM` Keras uses), then, in a merge call, measured and
        decided on replica 0's copy, which equals every other replica's; the
        skip `cond` runs in cross-replica context (DistributionStrategy does
        not allow a `cond` whose branch calls `merge_call` in replica context)
        and the inner optimizer applies the already-reduced gradients on each
        replica with its own all-reduce turned off (with gradient
        accumulation, once, in cross-replica context: see
        `_keras_internals.merge_calls_inline`).
        """
        import tensorflow as tf

        if not tf.distribute.has_strategy():
            self._guarded_apply(grads, variables, pending)
            return
        if tf.distribute.in_cross_replica_context():
            raise ValueError("apply() must be called in a replica context.")
        context = tf.distribute.get_replica_context()
        present = [g for g in grads if g is not None]
        reduced = list(context.all_reduce(tf.distribute.ReduceOp.SUM, present))
        reduced = [None if g is None else reduced.pop(0) for g in grads]
        # The loss needs no collective of its own: each replica's value is
        # its loss divided by the number of replicas.
        replicas = float(self._distribution_strategy_replicas())

        if tf.__internal__.distribute.strategy_supports_no_merge_call():
            # No cross-replica step: each replica publishes its own loss.
            if pending is not None:
                pending = pending * ops.convert_to_tensor([replicas, 1.0])
            self._guarded_apply(reduced, variables, pending)
            return

        def cross_replica(distribution, reduced, variables, pending):
            def first(value):
                return distribution.experimental_local_results(value)[0]

            local = [None if g is None else first(g) for g in reduced]
            local_pending = None
            if pending is not None:
                # The mean over this worker's replicas (all replicas on one
                # machine), summed from their local copies.
                parts = distribution.experimental_local_results(pending)
                total = ops.sum(ops.stack(list(parts)), axis=0)
                local_pending = total * ops.convert_to_tensor(
                    [replicas / len(parts), 1.0]
                )

            def apply(norm, threshold):
                distribution.extended.call_for_each_replica(
                    self._clip_and_apply,
                    args=(reduced, variables, norm, threshold),
                )

            # With gradient accumulation the inner optimizer is applied here,
            # in cross-replica context, to replica 0's copy: Keras' `apply`
            # then chooses accumulate or update in a `cond` whose branches
            # reach `merge_call`, which fails in replica context.
            self._decide_and_apply(
                local, variables, local_pending, apply, strategy=distribution
            )

        context.merge_call(cross_replica, args=(reduced, variables, pending))

    # ---------------------------------------------------------- serialization
    def get_config(self):
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(
                self.inner_optimizer
            ),
            "clipping": None
            if self.clipping is None
            else keras.saving.serialize_keras_object(self.clipping),
            "skip_nonfinite": self.skip_nonfinite,
            "skip_spikes": None
            if self.skip_spikes is None
            else keras.saving.serialize_keras_object(self.skip_spikes),
            "observers": None,  # runtime attachments, not serialized
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(
            config.pop("inner_optimizer"), custom_objects=custom_objects
        )
        for key in ("clipping", "skip_spikes"):
            if isinstance(config.get(key), dict):
                config[key] = keras.saving.deserialize_keras_object(
                    config[key], custom_objects=custom_objects
                )
        return cls(inner, **config)


class _Window:
    """One call's place in gradient accumulation (see `GuardedOptimizer._window`)."""

    def __init__(self, steps, update, grads, measured, accumulators):
        self.steps = steps
        self.update = update
        self.grads = grads
        self.measured = measured
        self.accumulators = accumulators


class _LossRecord:
    """The guard's loss and trip variables, held outside Keras' variable tracking."""

    def __init__(
        self, pending, step_loss, loss_seen, tripped, nonfinite_run, trip_limit
    ):
        self.pending = pending
        self.step_loss = step_loss
        self.loss_seen = loss_seen
        self.tripped = tripped
        self.nonfinite_run = nonfinite_run
        self.trip_limit = trip_limit


def _check_inner_optimizer(inner, clipping=None):
    if not isinstance(inner, keras.optimizers.Optimizer):
        raise ValueError(
            "Invalid value for argument `inner_optimizer`. Expected a Keras 3 "
            "`keras.optimizers.Optimizer` instance. Received: "
            f"inner_optimizer={inner!r}"
        )
    if isinstance(inner, GuardedOptimizer):
        raise ValueError(
            "Invalid value for argument `inner_optimizer`. Expected an optimizer "
            "that is not already a GuardedOptimizer. Received: "
            f"inner_optimizer={inner.name!r}"
        )
    if isinstance(inner, keras.optimizers.LossScaleOptimizer):
        raise ValueError(
            "Invalid value for argument `inner_optimizer`. Expected an optimizer "
            "that is not a LossScaleOptimizer: wrap the other way round, "
            "LossScaleOptimizer(GuardedOptimizer(...)), which `compile` does by "
            "itself under the 'mixed_float16' policy. Received: "
            f"inner_optimizer={inner.name!r}"
        )
    if clipping is not None:
        _check_no_own_clipping(inner)


@contextlib.contextmanager
def _loss_scale_off(inner):
    """Sets `inner.loss_scale_factor` to `None` for the trace inside the block.

    `GuardedOptimizer.apply` unscales the gradients itself; Keras' `apply`
    reads the factor when traced, so the inner optimizer's update does not
    divide by it a second time. The factor is back on exit (in its config,
    for `scale_loss`).
    """
    scale = inner.loss_scale_factor
    if scale is None:
        yield
        return
    inner.loss_scale_factor = None
    try:
        yield
    finally:
        inner.loss_scale_factor = scale


def _own_clipping(inner):
    """`(name, value)` of the inner optimizer's own clipping argument, or `None`."""
    for arg in ("clipnorm", "global_clipnorm", "clipvalue"):
        value = getattr(inner, arg, None)
        if value is not None:
            return arg, value
    return None


def _check_no_own_clipping(inner, clipping=None):
    """Refuses an inner optimizer that clips when the guard clips too.

    `clipping` is the policy `set_clipping` was given, to name in the message;
    `None` from the constructor, whose message is about `inner_optimizer`.
    """
    own = _own_clipping(inner)
    if own is None:
        return
    arg, value = own
    if clipping is not None:
        raise ValueError(
            "Invalid value for argument `clipping`. Expected no clipping policy "
            f"for this GuardedOptimizer: its inner optimizer clips by itself "
            f"({arg}={value!r}); clip in one place, the optimizer's own "
            f"`{arg}` or a policy on an inner optimizer with {arg}=None. "
            f"Received: clipping={clipping!r}"
        )
    raise ValueError(
        "Invalid value for argument `inner_optimizer`. Expected an "
        f"optimizer that does not clip by itself ({arg}=None) when "
        "GuardedOptimizer clips too (a `clipping` policy): clip in one "
        "place, `clipping=GlobalNorm(...)` or the optimizer's own "
        f"`{arg}`. Received: inner_optimizer with {arg}={value!r}"
    )


def _or(a, b):
    """`a or b` for bool tensors, either of which may be the Python `False`."""
    if a is False:
        return b
    if b is False:
        return a
    return ops.logical_or(a, b)


def _get_spike_skipping(value):
    if value is None or value is False:
        return None
    if value is True:
        return SpikeSkipping()
    if isinstance(value, SpikeSkipping):
        return value
    if isinstance(value, dict):
        try:
            spikes = keras.saving.deserialize_keras_object(value)
        except (TypeError, ValueError, KeyError):
            spikes = None
        if isinstance(spikes, SpikeSkipping):
            return spikes
    raise invalid(
        "skip_spikes", value, "None, a bool or a keras_stability.clipping.SpikeSkipping"
    )


def _same_config(a, b):
    return type(a) is type(b) and a.get_config() == b.get_config()
