"""Pruning state and its in-graph update: masks and step in variables.

No wrapper layers. `prune_low_magnitude` builds one `Pruner` per pruned model;
it holds a mask variable per pruned weight and the pruning step, and it puts a
`MaskConstraint` on each pruned variable. Keras optimizers call a variable's
`constraint` inside `optimizer.apply`, right after the update, in the compiled
step (`tf.function`, XLA, every replica under tf.distribute). So:

- the first pruned variable's constraint advances the step, asks the schedule
  whether to prune and, if so (`ops.cond`, no host work), recomputes every
  mask and multiplies every pruned weight by its new mask;
- every pruned variable's constraint returns the variable times its mask, so
  weights are masked after every update whatever order the optimizer visits
  the variables in.

This works the same for Sequential, functional and subclassed models, single
layers, the Distiller's student and any Keras optimizer. Masks never change
outside `optimizer.apply`, that is outside training steps. A model's config is
left untouched (the constraint lives on the variable, not in the layer
config), so a saved `.keras` file is a plain Keras model with the zeros in it.

The step and masks are not saved with the weights; the optimizer's
`iterations` is. So when the train step is traced (once per compiled train
function; every step when run eagerly), the first pruned variable's
constraint checks on the host, before any update, whether the weights and
the optimizer were restored under a pruner that has not stepped yet
(`keras.callbacks.BackupAndRestore`, `load_weights` into a compiled model):
then the step continues from the optimizer's `iterations` and the masks
from the restored zeros (`Pruner.resume`), with or without a callback. If
restored zeros come without the optimizer's count (`load_weights` before the
optimizer was built), it warns that the schedule starts over.

Hook for an optimizer wrapper: `Pruner.after_apply(variables, skipped)` does
the same work, for wrappers that call observers in-graph after each update
instead (e.g. a guarded optimizer that may skip a step). Use one or the other:
call `pruner.detach()` first (takes the constraints off, keeps masks and
step), then register `pruner.after_apply`, or the step advances twice.
"""

import warnings

import keras
import numpy as np
from keras import ops

from keras_stability import _keras_internals
from keras_stability._checks import check_bool
from keras_stability._checks import check_choice
from keras_stability._checks import check_int
from keras_stability._checks import check_layer
from keras_stability._checks import invalid
from keras_stability._checks import is_integer
from keras_stability.pruning import masks as masks_lib
from keras_stability.pruning.schedules import call_schedule
from keras_stability.pruning.schedules import last_pruning_step
from keras_stability.pruning.schedules import next_pruning_step
from keras_stability.pruning.schedules import previous_pruning_step
from keras_stability.pruning.schedules import sparsity_at
from keras_stability.pruning.schedules import steps_to_target
from keras_stability.pruning.schedules import valid_sparsity
from keras_stability.pruning.schedules import validate_schedule

__all__ = [
    "MaskConstraint",
    "Pruner",
    "check_pruning_arguments",
    "find_pruner",
    "find_pruners",
    "reset_train_function",
]

# A final sparsity this far below the target counts as "not reached" (TF-MOT's
# schedules may end between two pruning steps, a hair below their target).
_SHORTFALL_TOLERANCE = 5e-3


def _check_pair(name, value):
    """A pair of positive integers (NumPy integers too), as a tuple of ints."""
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(is_integer(v) and v > 0 for v in value)
    ):
        raise invalid(name, value, "a pair of positive integers")
    return int(value[0]), int(value[1])


def check_pruning_arguments(
    pruning_schedule, sparsity_m_by_n, block_size, block_pooling_type, global_ranking
):
    """Checks the pruning options shared by `prune_low_magnitude` and `Pruner`.

    Returns:
        `(sparsity_m_by_n, block_size, block_pooling_type, global_ranking)`,
        normalised (tuples of ints, a bool).

    Raises:
        ValueError: Naming the argument, on a bad value or combination.
    """
    validate_schedule(pruning_schedule)
    if sparsity_m_by_n is not None:
        sparsity_m_by_n = masks_lib.validate_m_by_n(sparsity_m_by_n)
    block_size = _check_pair("block_size", block_size)
    block_pooling_type = check_choice(
        "block_pooling_type", block_pooling_type, ("AVG", "MAX")
    )
    global_ranking = check_bool("global_ranking", global_ranking)
    if global_ranking and (sparsity_m_by_n is not None or block_size != (1, 1)):
        raise ValueError(
            "Invalid value for argument `global_ranking`. Expected False when "
            "`sparsity_m_by_n` or `block_size` is set. Received: "
            f"global_ranking=True, sparsity_m_by_n={sparsity_m_by_n}, "
            f"block_size={block_size}"
        )
    if sparsity_m_by_n is not None and block_size != (1, 1):
        raise ValueError(
            "Invalid value for argument `block_size`. Expected (1, 1) with "
            f"`sparsity_m_by_n`. Received: block_size={block_size}"
        )
    return sparsity_m_by_n, block_size, block_pooling_type, global_ranking


class Pruner:
    """Masks and pruning step of one pruned model, updated inside `optimizer.apply`.

    Built by `prune_low_magnitude`; users read it with `find_pruner(model)`.

    Besides the masks and the step it keeps, in variables updated in the
    train step: `last_sparsity`, the sparsity of the last mask update (-1
    before the first), and `refused_step` / `refused_sparsity`, the first
    step where the schedule returned a sparsity outside [0, 1) (0 if never).
    Such a value is refused: the masks stay as they were.

    Args:
        variables: Non-empty list of weight variables to prune, in the order
            the model lists its trainable variables.
        pruning_schedule: Callable `step -> (should_prune, sparsity)`.
        sparsity_m_by_n: `None` or a pair `(m, n)` for N:M masks.
            Defaults to `None`.
        block_size: Pair `(height, width)`; `(1, 1)` for element-wise masks.
            Defaults to `(1, 1)`.
        block_pooling_type: `"AVG"` or `"MAX"` pooling of blocks.
            Defaults to `"AVG"`.
        global_ranking: Rank all weights together (one threshold) instead
            of layer by layer. Defaults to `False`.
        input_axes: `None` or one axis per variable: the input axis N:M
            groups run along (`masks.m_by_n_mask`); `None` for -2 each.
            Defaults to `None`.
        initial_step: Non-negative integer, the step to start from (to
            continue a pruning run). Defaults to `0`.

    Raises:
        ValueError: On a bad argument (as `prune_low_magnitude`).
    """

    def __init__(
        self,
        variables,
        pruning_schedule,
        sparsity_m_by_n=None,
        block_size=(1, 1),
        block_pooling_type="AVG",
        global_ranking=False,
        input_axes=None,
        initial_step=0,
    ):
        if (
            not isinstance(variables, (list, tuple))
            or not variables
            or not all(isinstance(v, keras.Variable) for v in variables)
        ):
            raise invalid("variables", variables, "a non-empty list of Keras variables")
        (
            sparsity_m_by_n,
            block_size,
            block_pooling_type,
            global_ranking,
        ) = check_pruning_arguments(
            pruning_schedule,
            sparsity_m_by_n,
            block_size,
            block_pooling_type,
            global_ranking,
        )
        self.variables = list(variables)
        self.pruning_schedule = pruning_schedule
        self.sparsity_m_by_n = sparsity_m_by_n
        self.block_size = block_size
        self.block_pooling_type = block_pooling_type
        self.global_ranking = global_ranking
        if input_axes is None:
            input_axes = [-2] * len(variables)
        if len(input_axes) != len(variables) or not all(
            isinstance(a, int) and -len(v.shape) <= a < len(v.shape)
            for a, v in zip(input_axes, variables, strict=False)
        ):
            raise invalid("input_axes", input_axes, "None or one axis of each variable")
        self.input_axes = list(input_axes)
        initial_step = check_int("initial_step", initial_step, low=0)
        self.initial_step = initial_step
        # The optimizer's update count when pruning began (`prune_low_magnitude`
        # sets it): a run restored from a backup (weights and optimizer, not
        # this step) continues from it (`resume`).
        self.start_iterations = 0
        self._warned = {}
        self._warned_unmasked = False
        self._stepped = False  # seen stepped by `check_restored`
        with _strategy_scope(self.variables[0]):
            # `only_first_replica`: every replica computes the same values
            # from the same (synchronised) weights; the first one is written.
            self.step = keras.Variable(
                initial_step,
                dtype="int64",
                trainable=False,
                aggregation="only_first_replica",
                name="pruning_step",
            )
            scalar = dict(trainable=False, aggregation="only_first_replica")
            self.last_sparsity = keras.Variable(
                -1.0, dtype="float32", name="pruning_last_sparsity", **scalar
            )
            self.refused_step = keras.Variable(
                0, dtype="int64", name="pruning_refused_step", **scalar
            )
            self.refused_sparsity = keras.Variable(
                0.0, dtype="float32", name="pruning_refused_sparsity", **scalar
            )
            # Start from the weights' own zeros: a fresh model keeps
            # everything, a reloaded pruned model keeps its sparsity.
            self.masks = [
                keras.Variable(
                    ops.cast(ops.not_equal(v, 0), v.dtype),
                    dtype=v.dtype,
                    trainable=False,
                    aggregation="only_first_replica",
                    name=f"{v.name}_mask",
                )
                for v in self.variables
            ]
        for index, variable in enumerate(self.variables):
            variable.constraint = MaskConstraint(self, index, variable.constraint)

    def compute_masks(self, sparsity):
        """New masks for the current weights at `sparsity` (tensors, not assigned)."""
        values = [ops.convert_to_tensor(v) for v in self.variables]
        if self.sparsity_m_by_n is not None:
            return [
                masks_lib.m_by_n_mask(v, self.sparsity_m_by_n, axis)
                for v, axis in zip(values, self.input_axes, strict=True)
            ]
        if self.global_ranking:
            return masks_lib.global_magnitude_masks(values, sparsity)
        if self.block_size != (1, 1):
            return [
                masks_lib.block_magnitude_mask(
                    v, sparsity, self.block_size, self.block_pooling_type
                )
                for v in values
            ]
        return [masks_lib.magnitude_mask(v, sparsity) for v in values]

    def update_masks(self, remask_others=True, skipped=False):
        """Advances the step and recomputes the masks if the schedule says so.

        Args:
            remask_others: Also multiply the weights other than the first by
                their new masks on a pruning step (the first one's constraint
                returns its masked value itself). Defaults to `True`.
            skipped: Bool or boolean scalar tensor; if true the update was
                skipped, and neither the step nor the masks change. Defaults
                to `False`.
        """
        advance = ops.logical_not(ops.convert_to_tensor(skipped, dtype="bool"))
        self.step.assign_add(ops.cast(advance, "int64"))
        should_prune, sparsity = call_schedule(self.pruning_schedule, self.step.value)
        should_prune = ops.logical_and(should_prune, advance)
        if self.sparsity_m_by_n is None:
            # Refuse a sparsity outside [0, 1) (1.0 would keep one weight per
            # layer); record the first such step for the host to report.
            valid = valid_sparsity(sparsity)
            first_refusal = ops.logical_and(
                ops.logical_and(should_prune, ops.logical_not(valid)),
                ops.equal(self.refused_step.value, 0),
            )
            self.refused_step.assign(
                ops.where(first_refusal, self.step.value, self.refused_step.value)
            )
            self.refused_sparsity.assign(
                ops.where(first_refusal, sparsity, self.refused_sparsity.value)
            )
            should_prune = ops.logical_and(should_prune, valid)
            applied = sparsity
        else:
            m, n = self.sparsity_m_by_n
            applied = ops.convert_to_tensor(m / n, dtype="float32")
        self.last_sparsity.assign(
            ops.where(should_prune, applied, self.last_sparsity.value)
        )
        if _in_strategy_replica_context():
            # tf.distribute forbids writes inside control flow in a replica
            # context: compute under `cond`, write unconditionally.
            new_masks = ops.cond(
                should_prune,
                lambda: self.compute_masks(sparsity),
                lambda: [ops.convert_to_tensor(m) for m in self.masks],
            )
            for mask, new_mask in zip(self.masks, new_masks, strict=True):
                mask.assign(new_mask)
            if remask_others:
                self.apply_masks(skip_index=0)
            return

        def prune():
            for mask, new_mask in zip(
                self.masks, self.compute_masks(sparsity), strict=True
            ):
                mask.assign(new_mask)
            if remask_others:
                self.apply_masks(skip_index=0)
            return ops.convert_to_tensor(True)

        # Masks (and the weights they zero) are written on pruning steps only.
        ops.cond(should_prune, prune, lambda: ops.convert_to_tensor(False))

    def apply_masks(self, skip_index=None):
        """Multiplies each pruned weight by its mask (in place)."""
        for index, (variable, mask) in enumerate(
            zip(self.variables, self.masks, strict=True)
        ):
            if index != skip_index:
                variable.assign(variable * mask)

    def after_apply(self, variables=None, skipped=False):
        """Observer hook for optimizer wrappers: one pruning step after an update.

        Args:
            variables: The variables just updated (unused; the pruner knows
                its own). Defaults to `None`.
            skipped: Bool or boolean scalar tensor; a skipped update does
                not advance the pruning step. Defaults to `False`.
        """
        del variables
        self.check_restored()
        self.update_masks(remask_others=False, skipped=skipped)
        self.apply_masks()

    def resume(self, iterations):
        """Continues the pruning step from an optimizer restored under it.

        A backup (`keras.callbacks.BackupAndRestore`, this library's) or a
        weights file loaded into a compiled model brings back the weights
        and the optimizer of an interrupted run, not this pruner's step and
        masks: its step would start over (the schedule again from its
        start, ending below the target) and its masks, made from the fresh
        weights, would let the pruned weights grow back. If this pruner has
        not stepped yet and `iterations` (the restored optimizer's) is past
        `start_iterations`, the step becomes `initial_step` plus the updates
        made since, and the masks are made again from the restored weights'
        zeros. Otherwise nothing changes. `check_restored` calls it when
        the train step is traced, so a `fit` needs no callback for this.

        Args:
            iterations: The optimizer's update count now (an integer or an
                integer scalar variable, e.g. `model.optimizer.iterations`).

        Returns:
            The new step, or `None` if nothing changed.
        """
        iterations = int(_keras_internals.to_numpy(iterations))
        ahead = iterations - self.start_iterations
        if not self._fresh() or ahead <= 0:
            return None
        with _strategy_scope(self.step):
            self.step.assign(self.initial_step + ahead)
            zeros = size = 0
            for variable, mask in zip(self.variables, self.masks, strict=True):
                kept = np.asarray(_keras_internals.to_numpy(variable)) != 0
                mask.assign(kept.astype(mask.dtype))
                zeros += int(kept.size - kept.sum())
                size += int(kept.size)
            if zeros:
                # As if the masks had been computed at that sparsity.
                self.last_sparsity.assign(zeros / size)
        return self.initial_step + ahead

    def check_restored(self):
        """Host check before the first update: a restored run continues.

        Called by the first pruned variable's constraint (and `after_apply`)
        when the train step is traced, on the host (`tf.init_scope`): it
        reads and writes the variables' values before the traced step first
        runs. Only a pruner that has not stepped yet does anything:

        - if the optimizer applying the update has a restored step count
          (`iterations` past `start_iterations`), it calls `resume`;
        - otherwise, if at least 1% of the pruned weights are zeros that
          the masks keep (weights loaded after pruning, e.g.
          `load_weights` into a model whose optimizer was not built yet,
          which Keras then leaves at 0 updates), it warns that the schedule
          starts over.

        A train step run eagerly (`run_eagerly=True`) calls it after the
        first update, when the restored zeros are gone: then only the step
        continues, with a warning (`UpdatePruningStep` resumes it exactly,
        at the first batch).

        Returns:
            The new step if the run was resumed, else `None`.
        """
        if self._stepped or keras.backend.backend() != "tensorflow":
            return None
        import tensorflow as tf

        optimizer = _keras_internals.applying_optimizer()
        traced = tf.inside_function()
        with tf.init_scope():
            if not self._fresh():
                self._stepped = True  # the step only grows: never again
                return None
            iterations = None
            if optimizer is not None:
                iterations = int(_keras_internals.to_numpy(optimizer.iterations))
                step = (
                    self.resume(iterations)
                    if traced
                    else self._resume_step_eagerly(iterations)
                )
                if step is not None:
                    return step
            if traced:
                self._warn_if_unmasked_zeros(iterations)
        return None

    def _resume_step_eagerly(self, iterations):
        """`resume` after the first update: the step only, with a warning."""
        ahead = iterations - self.start_iterations
        if ahead <= 0:
            return None
        step = self.initial_step + ahead
        with _strategy_scope(self.step):
            self.step.assign(step)
        warnings.warn(
            "The pruned model's weights and optimizer were restored (the "
            f"optimizer has taken {iterations} updates) and its train step "
            "runs eagerly (`run_eagerly=True`), where the pruning constraint "
            "first runs after the first update: the pruning step continues "
            f"from {step}, but the restored zeros have moved by then, so the "
            "masks could not be restored and pruned weights can grow back "
            "until the next pruning step. For an exact resume, add "
            "`keras_stability.pruning.UpdatePruningStep()` to the callbacks "
            "(it resumes at the first batch, before any update) or do not "
            "run eagerly.",
            stacklevel=2,
        )
        return step

    def _fresh(self):
        """Whether this pruner has neither stepped nor computed a mask."""
        step = int(_keras_internals.to_numpy(self.step))
        last = float(_keras_internals.to_numpy(self.last_sparsity))
        return step == self.initial_step and last < 0

    def _warn_if_unmasked_zeros(self, iterations):
        if self._warned_unmasked:
            return
        zeros = size = 0
        for variable, mask in zip(self.variables, self.masks, strict=True):
            value = np.asarray(_keras_internals.to_numpy(variable))
            kept = np.asarray(_keras_internals.to_numpy(mask)) != 0
            zeros += int(np.sum((value == 0) & kept))
            size += int(value.size)
        if zeros / max(size, 1) < 0.01:
            return
        self._warned_unmasked = True
        count = "" if iterations is None else f" (it has taken {iterations} updates)"
        warnings.warn(
            f"The pruned weights are {zeros / size:.0%} zeros that the pruning "
            "masks do not hold: weights loaded after `prune_low_magnitude` "
            "(e.g. `model.load_weights` of a checkpoint of a pruning run), "
            "without the optimizer's step count"
            f"{count}. The pruning step starts at {self.initial_step}, so the "
            "schedule starts over and those zeros can grow back. To continue "
            "the run, build the optimizer before loading the weights "
            "(`model.optimizer.build(model.trainable_variables)`): "
            "`load_weights` then restores its `iterations`, from which "
            "pruning continues. Or load the weights first and prune with "
            "`prune_low_magnitude(model, schedule, initial_step=...)`.",
            stacklevel=2,
        )

    def target_sparsity(self):
        """The schedule's sparsity at the current step, as a float tensor."""
        return call_schedule(self.pruning_schedule, self.step.value)[1]

    # ------------------------------------------------------ host-side checks
    def check_schedule_output(self):
        """Raises if the schedule returned a sparsity outside [0, 1) in training.

        Such a value was refused in the train step (the masks stayed as they
        were); this reports it on the host, where an error can be raised.

        Raises:
            ValueError: Naming `pruning_schedule`, the value and the step.
        """
        step = int(_keras_internals.to_numpy(self.refused_step))
        if step:
            value = float(_keras_internals.to_numpy(self.refused_sparsity))
            raise ValueError(
                "Invalid value for argument `pruning_schedule`. Expected a "
                "sparsity in [0, 1) at every step. Received: "
                f"pruning_schedule={self.pruning_schedule!r} giving "
                f"sparsity={value} at step={step} (refused: the masks were "
                "left unchanged at that step)"
            )

    def target(self):
        """`(step, sparsity, what)` where the schedule reaches its target, or `None`.

        See `schedules.steps_to_target`; with N:M masks the sparsity is
        `m / n`.
        """
        found = steps_to_target(self.pruning_schedule)
        if found is not None and self.sparsity_m_by_n is not None:
            m, n = self.sparsity_m_by_n
            found = (found[0], m / n, found[2])
        return found

    def warn_if_fit_too_short(self, fit_steps, key=None):
        """Warns if a `fit` of `fit_steps` steps ends before the schedule's target.

        Args:
            fit_steps: Optimizer steps of the coming `fit` (epochs x steps
                per epoch), or `None` if unknown (then nothing is checked).
            key: An object identifying the `fit` (its callbacks' `params`)
                so that several callbacks warn once. Defaults to `None`.

        Returns:
            The warning text, or `None` if the schedule can reach its target.
        """
        found = self.target()
        step = int(_keras_internals.to_numpy(self.step))
        if fit_steps is None or found is None or self._already_warned(key, step):
            return None
        last = step + int(fit_steps)
        end, target, what = found
        if last >= end:
            return None
        pruned_at = previous_pruning_step(self.pruning_schedule, last)
        upcoming = next_pruning_step(self.pruning_schedule, step)
        if upcoming is not None and (pruned_at is None or pruned_at <= step):
            # TF-MOT's default `frequency=100` in a short `fit`.
            masks = float(_keras_internals.to_numpy(self.last_sparsity))
            state = (
                "the model ends it unpruned"
                if masks < 0
                else f"the masks stay at sparsity {masks:.4g}"
            )
            message = (
                "The pruning schedule has no pruning step within this `fit`: "
                f"the `fit` runs {fit_steps} steps, to step {last}, and the "
                f"schedule's next pruning step is step {upcoming} (pruning "
                "steps are `begin_step + k * frequency`, counting optimizer "
                "updates from 1), so the masks are not updated in this `fit` "
                f"and {state}. The schedule reaches its target sparsity "
                f"{target:.4g} at step {end} ({what}). Use a smaller "
                "`frequency` or train for more steps."
            )
        else:
            if pruned_at is None:
                where = "where the schedule's sparsity is only"
                reached = sparsity_at(self.pruning_schedule, last)
            else:
                where = f"whose last pruning step, {pruned_at}, prunes to only"
                reached = sparsity_at(self.pruning_schedule, pruned_at)
            message = (
                f"The pruning schedule reaches its target sparsity {target:.4g} "
                f"at step {end} ({what}), but this `fit` runs {fit_steps} steps, "
                f"to step {last}, {where} {reached:.4g}. Make the schedule "
                f"reach its target by step {last} or train for more steps."
            )
        self._warn(message, key, step)
        return message

    def warn_if_target_missed(self, key=None):
        """Warns if the masks are below the schedule's target sparsity now.

        Compares the sparsity of the last mask update with the target (the
        schedule's final sparsity, or for a plain callable its sparsity at
        the current step).

        Args:
            key: As in `warn_if_fit_too_short`. Defaults to `None`.

        Returns:
            The warning text, or `None` if the target is reached.
        """
        step = int(_keras_internals.to_numpy(self.step))
        if self._already_warned(key, step):
            # Warned at the start of this fit: the end is covered too (and a
            # `strip_pruning` right after it need not repeat it).
            self._warned["step"] = step
            return None
        last = float(_keras_internals.to_numpy(self.last_sparsity))
        found = self.target()
        if found is None:
            target = sparsity_at(self.pruning_schedule, step)
            where = f"asks for sparsity {target:.4g} at step {step}"
        else:
            end, target, what = found
            where = f"reaches its target sparsity {target:.4g} at step {end} ({what})"
        if last >= target - _SHORTFALL_TOLERANCE:
            return None
        state = (
            "no mask was computed yet"
            if last < 0
            else f"the masks were last computed at sparsity {last:.4g}"
        )
        last_turn = last_pruning_step(self.pruning_schedule)
        if found is not None and last_turn is not None and last_turn < found[0]:
            # Training longer does not help: the pruning steps skip end_step.
            fix = (
                f"Its last pruning step is {last_turn}, where its sparsity is "
                f"{sparsity_at(self.pruning_schedule, last_turn):.4g}: make "
                "`end_step - begin_step` a multiple of `frequency` for the "
                "schedule to prune at `end_step`."
            )
        else:
            fix = (
                "Make the schedule reach its target within the training steps "
                "or train for more steps."
            )
        message = (
            f"The pruning schedule {where}, but at pruning step {step} {state}. {fix}"
        )
        self._warn(message, key, step)
        return message

    def _already_warned(self, key, step):
        """Once per `fit` (same `key`) and once per step (e.g. strip after fit)."""
        same_fit = key is not None and self._warned.get("key") is key
        return same_fit or self._warned.get("step") == step

    def _warn(self, message, key, step):
        self._warned = {"key": key, "step": step}
        warnings.warn(message, stacklevel=3)

    def detach(self):
        """Applies the masks one last time and restores the original constraints."""
        self.apply_masks()
        for variable in self.variables:
            constraint = variable.constraint
            if isinstance(constraint, MaskConstraint) and constraint.pruner is self:
                variable.constraint = constraint.inner


class MaskConstraint(keras.constraints.Constraint):
    """Variable constraint multiplying a weight by its pruning mask.

    Set by `prune_low_magnitude` on each pruned variable; the constraint of
    the first pruned variable also runs the pruner's step (see module doc).
    A constraint the variable had before is applied first.

    Args:
        pruner: The owning `Pruner`.
        index: Position of the variable in `pruner.variables`.
        inner: The variable's previous constraint or `None`.
    """

    def __init__(self, pruner, index, inner=None):
        self.pruner = pruner
        self.index = index
        self.inner = inner

    def __call__(self, w):
        if self.inner is not None:
            w = self.inner(w)
        if self.index == 0:
            self.pruner.check_restored()
            self.pruner.update_masks(remask_others=True)
        return w * self.pruner.masks[self.index]

    def get_config(self):
        # Holds variables; never part of a layer config (it is set on the
        # variable only), so there is nothing to serialise.
        return {}


def find_pruner(model):
    """Returns the `Pruner` of a model pruned by `prune_low_magnitude`, or `None`.

    Args:
        model: A Keras layer or model.

    Returns:
        The `Pruner`, or `None` if `model` is not pruned.

    Raises:
        ValueError: If `model` is not a Keras layer or model.
    """
    pruners = find_pruners(model)
    return pruners[0] if pruners else None


def find_pruners(model):
    """All the `Pruner`s of a model, in the order of its weights.

    A model has several when its layers were pruned separately (TF-MOT's
    `clone_model(..., clone_function=...)` pattern, or one schedule per
    layer).

    Args:
        model: A Keras layer or model.

    Returns:
        List of `Pruner`s, empty if `model` is not pruned.

    Raises:
        ValueError: If `model` is not a Keras layer or model.
    """
    check_layer("model", model)
    found = []
    for variable in model.weights:
        constraint = getattr(variable, "constraint", None)
        while constraint is not None:
            if isinstance(constraint, MaskConstraint):
                if not any(p is constraint.pruner for p in found):
                    found.append(constraint.pruner)
                break
            constraint = getattr(constraint, "inner", None)
    return found


def reset_train_function(model):
    """Drops a model's compiled train step, so that the next `fit` traces it again.

    Keras reads each variable's `constraint` when it traces the train step
    and keeps the traced function (`model.train_function`) until the model
    is compiled again. Putting the mask constraints on (`prune_low_magnitude`)
    or taking them off (`strip_pruning`) after a `fit` would otherwise not
    reach the next `fit`: it would train dense, or keep masking and stepping
    the detached pruner. The evaluation and prediction functions read no
    constraint and are kept.

    Args:
        model: A Keras model or layer (a layer has no train step: nothing to do).
    """
    if (
        isinstance(model, keras.Model)
        and getattr(model, "train_function", None) is not None
    ):
        model.train_function = None


def _in_strategy_replica_context():
    """True inside `strategy.run` of a tf.distribute strategy (TF backend only)."""
    import tensorflow as tf

    return tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context()


def _strategy_scope(variable):
    """Scope of the tf.distribute strategy that owns `variable` (TF backend only)."""
    import contextlib

    import tensorflow as tf

    if tf.distribute.has_strategy():
        return contextlib.nullcontext()
    value = getattr(variable, "_value", None)
    if isinstance(value, tf.distribute.DistributedValues):
        return value.distribute_strategy.scope()
    return contextlib.nullcontext()
