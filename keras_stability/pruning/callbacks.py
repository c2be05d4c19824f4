"""`UpdatePruningStep`: TF-MOT's callback, accepted for ported code, and the fit checks.

Our pruning advances its step inside the compiled train step, and a run
restored from a backup continues its step from the optimizer's by itself
(see `keras_stability.pruning.pruner`), so TF-MOT's mandatory callback
changes nothing in training here. It exists so that code written for TF-MOT
runs with only its import changed, and it (like `PruningSummaries`) reports
what can only be seen around a `fit`: a `fit` too short for the schedule to
reach its target, and a schedule that returned a sparsity outside [0, 1) in
training.
"""

import warnings

import keras

from keras_stability._checks import is_integer
from keras_stability.pruning.pruner import find_pruners

__all__ = ["UpdatePruningStep", "fit_steps"]


def fit_steps(params):
    """Optimizer steps of a `fit` from its callbacks' `params`, or `None`.

    `epochs * steps` when both are known (`steps` is unknown for a dataset
    of unknown length without `steps_per_epoch`).
    """
    params = params or {}
    epochs, steps = params.get("epochs"), params.get("steps")
    if is_integer(epochs) and is_integer(steps):
        return int(epochs) * int(steps)
    return None


def check_fit_begin(callback, pruner):
    """Warns if the coming `fit` ends before the schedule reaches its target."""
    pruner.warn_if_fit_too_short(fit_steps(callback.params), key=callback.params)


def check_fit_end(callback, pruner):
    """Raises on a refused schedule value; warns if the target was missed."""
    pruner.check_schedule_output()
    pruner.warn_if_target_missed(key=callback.params)


@keras.saving.register_keras_serializable(package="keras_stability")
class UpdatePruningStep(keras.callbacks.Callback):
    """TF-MOT's `UpdatePruningStep`, accepted for ported code; training needs no callback.

    `keras_stability.pruning` updates the pruning step and the masks inside
    the compiled train step, and a run restored from a backup continues its
    step from the optimizer's `iterations` by itself, so training is the
    same with or without this callback. Keeping it (as the TF-MOT pruning
    guide does) costs nothing and adds two checks:

    - at the start of `fit`, a warning if the `fit` (epochs x steps per
      epoch, when known) ends before the schedule's `end_step`, e.g.
      `end_step=1000` in a 50-step `fit`, which would end far below the
      target sparsity, or if no pruning step falls within the `fit`;
    - at the end of each epoch and of `fit`, an error if the schedule
      returned a sparsity outside [0, 1) (refused in the train step), and at
      the end of `fit` a warning if the masks are below the target sparsity.

    (With `run_eagerly=True` it also resumes a restored run at the first
    batch, before any update, which the pruner itself only sees after the
    first update; compiled, the pruner resumes before it by itself.)

    On a model that is not pruned it warns (and does nothing else): with
    TF-MOT a pruned model reloaded from a file is still pruned, here it is
    a plain model that would train dense until pruned again.

    Example:

    ```python
    from keras_stability import pruning

    model = pruning.prune_low_magnitude(model, pruning.PolynomialDecay(
        initial_sparsity=0.5, final_sparsity=0.8, begin_step=0, end_step=end_step))
    model.fit(x, y, epochs=2, callbacks=[pruning.UpdatePruningStep()])
    ```
    """

    def __init__(self):
        super().__init__()
        self._pruners = []
        self._resume = []

    def on_train_begin(self, logs=None):
        # One pruner per separately pruned layer (TF-MOT's clone_function).
        self._pruners = find_pruners(self.model) if self.model is not None else []
        self._resume = list(self._pruners)
        for pruner in self._pruners:
            check_fit_begin(self, pruner)
        if not self._pruners and self.model is not None:
            # With TF-MOT a reloaded pruned model is still pruned; here
            # `load_model` gives a plain model, which would train dense.
            warnings.warn(
                f"UpdatePruningStep: {self.model.name!r} is not pruned, so this "
                "training will not keep or raise its sparsity. A model saved "
                "during pruning comes back from `keras.models.load_model` as a "
                "plain Keras model: call `prune_low_magnitude(model, schedule, "
                "initial_step=model.optimizer.iterations)` on it to continue.",
                stacklevel=2,
            )

    def on_train_batch_begin(self, batch, logs=None):
        # Once a fit, after every callback's `on_train_begin` (where
        # `keras.callbacks.BackupAndRestore` restores, in any order in the
        # list). Only matters for a train step run eagerly: a compiled one
        # resumes when it is traced (`Pruner.check_restored`), and then
        # this finds the pruner already stepped and changes nothing.
        pruners, self._resume = self._resume, []
        optimizer = getattr(self.model, "optimizer", None)
        for pruner in pruners if optimizer is not None else ():
            pruner.resume(optimizer.iterations)

    def on_epoch_end(self, epoch=None, logs=None, batch=None):
        # TF-MOT names the first argument `batch`, and its guide's custom
        # training loop calls `on_epoch_end(batch=...)`: accept both names.
        del epoch, batch
        for pruner in self._pruners:
            pruner.check_schedule_output()

    def on_train_end(self, logs=None):
        for pruner in self._pruners:
            check_fit_end(self, pruner)

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
