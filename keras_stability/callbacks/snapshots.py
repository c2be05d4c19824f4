"""Host copies of a model's weights and its optimizer's state.

`GradientExplosionDetector` takes one every `snapshot_freq` healthy steps
(not inside the train step) and restores it exactly on a rollback.
"""

import weakref

import numpy as np

from keras_stability import _keras_internals
from keras_stability.callbacks.lr_scaling import innermost_optimizer

__all__ = ["Snapshot", "optimizer_state_variables"]

# model -> (ids of the variables read, the compiled reader)
_READERS = weakref.WeakKeyDictionary()


def _host_copies(model, variables):
    """Numpy copies of `variables`' values.

    Without a `tf.distribute` strategy, one compiled call reads them all: one
    host round trip instead of one per variable. The reader is traced once
    per model and variable list. Under a strategy each variable is read on
    its own, as `Variable.numpy()` does.
    """
    import keras

    if keras.backend.backend() != "tensorflow" or not variables:
        return [np.array(v.numpy(), copy=True) for v in variables]
    import tensorflow as tf

    strategy = getattr(model, "distribute_strategy", None)
    if strategy is not None and strategy is not tf.distribute.get_strategy():
        return [np.array(v.numpy(), copy=True) for v in variables]
    key = tuple(id(v) for v in variables)
    cached = _READERS.get(model)
    if cached is None or cached[0] != key:
        values = [v.value for v in variables]
        reader = _keras_internals.quiet_tracing_warning(
            tf.function(lambda: [tf.identity(v) for v in values], autograph=False)
        )
        cached = _READERS[model] = (key, reader)
    return [np.array(t, copy=True) for t in cached[1]()]


def optimizer_state_variables(optimizer):
    """The optimizer variables a rollback restores.

    The innermost optimizer's variables (iterations, moments, ...) without
    the learning-rate variable, which a rollback lowers and must not undo.
    Wrapper statistics (skip counters) are not state and are left alone.
    """
    opt = innermost_optimizer(optimizer)
    lr = _keras_internals.learning_rate_object(opt)
    lr_path = getattr(lr, "path", None)
    return [v for v in opt.variables if v is not lr and v.path != lr_path]


def model_optimizers(model):
    """`model.optimizer` and the optimizers in the model's public attributes
    (keras.io's GAN keeps `d_optimizer` and `g_optimizer`), each once."""
    import keras

    found = []
    candidates = [getattr(model, "optimizer", None)] + [
        value for name, value in vars(model).items() if not name.startswith("_")
    ]
    for value in candidates:
        if isinstance(value, keras.optimizers.Optimizer) and not any(
            value is o for o in found
        ):
            found.append(value)
    return found


def _state_variables(model):
    return [
        (i, v)
        for i, opt in enumerate(model_optimizers(model))
        for v in optimizer_state_variables(opt)
    ]


class Snapshot:
    """Exact host copy of `model.weights` and the optimizers' state.

    The state of every optimizer the model holds (`model_optimizers`).

    Args:
        model: The model.
        step: The global step the snapshot was taken after.
        score: Mean raw loss of the steps right after it (lower is better).

    Attributes:
        loss: A raw loss measured at exactly these weights (the first step's
            loss for the weights `fit` started from), or NaN.
        finite: Whether every floating-point weight is finite (a snapshot
            that is not can be restored, but never heals a run).
        typical: The mean raw loss of the steps before it when it became
            the best snapshot, or `None`.
    """

    def __init__(self, model, step=0, score=float("inf")):
        self.step = int(step)
        self.score = float(score)
        weights = list(model.weights)
        keyed = _state_variables(model)
        opt_vars = [v for _, v in keyed]
        values = _host_copies(model, weights + opt_vars)
        self.weights = values[: len(weights)]
        self.optimizer_paths = [(i, v.path) for i, v in keyed]
        self.optimizer_values = values[len(weights) :]
        self.loss = float("nan")
        self.typical = None
        self.finite = self.is_finite()

    def known_loss(self):
        """`score` if the snapshot was scored, else `loss` (NaN if neither)."""
        return self.score if np.isfinite(self.score) else self.loss

    def is_finite(self):
        return all(
            np.all(np.isfinite(w))
            for w in self.weights
            if np.issubdtype(w.dtype, np.floating)
        )

    def to_arrays(self):
        """`(info, arrays)`: the values as `{"w0": ..., "o0": ...}` (model
        weights, optimizer state) and the rest as a JSON-able dict, for a
        backup (`from_arrays`)."""
        arrays = {f"w{i}": w for i, w in enumerate(self.weights)}
        arrays.update({f"o{i}": v for i, v in enumerate(self.optimizer_values)})
        info = {
            "step": self.step,
            "score": self.score,
            "loss": self.loss,
            "typical": self.typical,
            "optimizer_paths": [[i, path] for i, path in self.optimizer_paths],
        }
        return info, arrays

    @classmethod
    def from_arrays(cls, model, info, arrays):
        """The snapshot `to_arrays` gave, or `None` if it does not fit `model`
        (another number or shape of weights)."""
        weights = list(model.weights)
        values = [arrays.get(f"w{i}") for i in range(len(weights))]
        if f"w{len(weights)}" in arrays or any(
            value is None or tuple(value.shape) != tuple(v.shape)
            for value, v in zip(values, weights, strict=True)
        ):
            return None
        paths = [(int(i), str(path)) for i, path in info.get("optimizer_paths", [])]
        optimizer_values = [arrays.get(f"o{i}") for i in range(len(paths))]
        if any(value is None for value in optimizer_values):
            return None
        snapshot = cls.__new__(cls)
        snapshot.step = int(info.get("step", 0))
        snapshot.score = float(info.get("score", "inf"))
        snapshot.loss = float(info.get("loss", "nan"))
        typical = info.get("typical")
        snapshot.typical = None if typical is None else float(typical)
        snapshot.weights = [np.array(v, copy=True) for v in values]
        snapshot.optimizer_paths = paths
        snapshot.optimizer_values = [np.array(v, copy=True) for v in optimizer_values]
        snapshot.finite = snapshot.is_finite()
        return snapshot

    def restore(self, model):
        """Assigns the saved values back (bitwise)."""
        for v, value in zip(model.weights, self.weights, strict=True):
            v.assign(value)
        by_path = dict(zip(self.optimizer_paths, self.optimizer_values, strict=True))
        for i, v in _state_variables(model):
            value = by_path.get((i, v.path))
            # Same shape: a snapshot from a backup (`from_arrays`) may come
            # from an optimizer built on other variables.
            if value is not None and tuple(np.shape(value)) == tuple(v.shape):
                v.assign(value)
