"""Host copies of a model's weights and its optimizer's state.

`GradientExplosionDetector` takes one every `snapshot_every` healthy steps
(not inside the train step) and restores it exactly on a rollback.
"""

import numpy as np

from keras_stability.callbacks.lr_scaling import innermost_optimizer

__all__ = ["Snapshot", "optimizer_state_variables"]


def optimizer_state_variables(optimizer):
    """The optimizer variables a rollback restores.

    The innermost optimizer's variables (iterations, moments, ...) without
    the learning-rate variable, which a rollback lowers and must not undo.
    Wrapper statistics (skip counters) are not state and are left alone.
    """
    opt = innermost_optimizer(optimizer)
    lr = getattr(opt, "_learning_rate", None)
    lr_path = getattr(lr, "path", None)
    return [v for v in opt.variables if v is not lr and v.path != lr_path]


class Snapshot:
    """Exact host copy of `model.weights` and the optimizer state.

    Args:
        model: The model.
        step: The global step the snapshot was taken after.
        score: Mean raw loss of the steps right after it (lower is better).
    """

    def __init__(self, model, step=0, score=float("inf")):
        self.step = int(step)
        self.score = float(score)
        self.weights = [np.array(v.numpy(), copy=True) for v in model.weights]
        opt_vars = optimizer_state_variables(model.optimizer) if model.optimizer else []
        self.optimizer_paths = [v.path for v in opt_vars]
        self.optimizer_values = [np.array(v.numpy(), copy=True) for v in opt_vars]

    def is_finite(self):
        return all(
            np.all(np.isfinite(w)) for w in self.weights if np.issubdtype(w.dtype, np.floating)
        )

    def restore(self, model):
        """Assigns the saved values back (bitwise)."""
        for v, value in zip(model.weights, self.weights, strict=True):
            v.assign(value)
        by_path = dict(zip(self.optimizer_paths, self.optimizer_values, strict=True))
        for v in optimizer_state_variables(model.optimizer):
            if v.path in by_path:
                v.assign(by_path[v.path])
