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

Hook for an optimizer wrapper: `Pruner.after_apply(variables, skipped)` does
the same work, for wrappers that call observers in-graph after each update
instead (e.g. a guarded optimizer that may skip a step). Use one or the other:
call `pruner.detach()` first (takes the constraints off, keeps masks and
step), then register `pruner.after_apply`, or the step advances twice.
"""

import keras
from keras import ops

from keras_stability.pruning import masks as masks_lib
from keras_stability.pruning.schedules import call_schedule

__all__ = ["MaskConstraint", "Pruner", "find_pruner"]


class Pruner:
    """Masks and pruning step of one pruned model, updated inside `optimizer.apply`.

    Built by `prune_low_magnitude`; users read it with `find_pruner(model)`.

    Args:
        variables: List of weight variables to prune, in the order the model
            lists its trainable variables.
        pruning_schedule: Callable `step -> (should_prune, sparsity)`.
        sparsity_m_by_n: `None` or a pair `(m, n)` for N:M masks.
        block_size: Pair `(height, width)`; `(1, 1)` for element-wise masks.
        block_pooling_type: `"AVG"` or `"MAX"` pooling of blocks.
        global_ranking: Rank all weights together (one threshold) instead
            of layer by layer.
    """

    def __init__(
        self,
        variables,
        pruning_schedule,
        sparsity_m_by_n=None,
        block_size=(1, 1),
        block_pooling_type="AVG",
        global_ranking=False,
    ):
        self.variables = list(variables)
        self.pruning_schedule = pruning_schedule
        self.sparsity_m_by_n = sparsity_m_by_n
        self.block_size = tuple(block_size)
        self.block_pooling_type = block_pooling_type
        self.global_ranking = global_ranking
        with _strategy_scope(self.variables[0]):
            # `only_first_replica`: every replica computes the same values
            # from the same (synchronised) weights; the first one is written.
            self.step = keras.Variable(
                0,
                dtype="int64",
                trainable=False,
                aggregation="only_first_replica",
                name="pruning_step",
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
            return [masks_lib.m_by_n_mask(v, self.sparsity_m_by_n) for v in values]
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
        self.update_masks(remask_others=False, skipped=skipped)
        self.apply_masks()

    def target_sparsity(self):
        """The schedule's sparsity at the current step, as a float tensor."""
        return call_schedule(self.pruning_schedule, self.step.value)[1]

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
            self.pruner.update_masks(remask_others=True)
        return w * self.pruner.masks[self.index]

    def get_config(self):
        # Holds variables; never part of a layer config (it is set on the
        # variable only), so there is nothing to serialise.
        return {}


def find_pruner(model):
    """Returns the `Pruner` of a model pruned by `prune_low_magnitude`, or `None`."""
    for variable in model.weights:
        constraint = getattr(variable, "constraint", None)
        while constraint is not None:
            if isinstance(constraint, MaskConstraint):
                return constraint.pruner
            constraint = getattr(constraint, "inner", None)
    return None


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
