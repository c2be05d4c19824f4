"""Pure gradient-norm maths shared by the clipping policies, and their base class.

The functions here know nothing of Keras training: they take lists of gradient
tensors (entries may be `None`) and return tensors, so they run unchanged under
`tf.function`, XLA and inside a `tf.distribute` replica or merge function.
Norms are always computed in float32, whatever the gradient dtype.
"""

import keras
import numpy as np
from keras import ops

from keras_stability._checks import check_int
from keras_stability._checks import check_number
from keras_stability._checks import invalid
from keras_stability._checks import is_integer
from keras_stability._checks import is_number

__all__ = [
    "ClippingPolicy",
    "clip_by_global_norm",
    "global_norm",
    "is_finite",
    "squared_norms",
    "scale_gradients",
]


def _values(g):
    # `tf.IndexedSlices` (embedding gradients) carry their entries in `.values`.
    return g.values if hasattr(g, "indices") and hasattr(g, "values") else g


def _scale(g, scale):
    if g is None:
        return None
    if hasattr(g, "indices") and hasattr(g, "values"):
        values = ops.multiply(g.values, ops.cast(scale, g.values.dtype))
        return type(g)(values, g.indices, g.dense_shape)
    return ops.multiply(g, ops.cast(scale, g.dtype))


def squared_norms(grads):
    """Squared L2 norm of each gradient, in float32.

    Args:
        grads: List of tensors; `None` entries give `None`.

    Returns:
        List of float32 scalars (or `None`), one per entry of `grads`. For a
        `tf.IndexedSlices` it is the sum of squares of its `values`. The
        list is a `SquaredNorms`, which also keeps them stacked.
    """
    return SquaredNorms.split(stacked_squared_norms(grads), len(grads))


def stacked_squared_norms(grads):
    """The squared norms of `squared_norms`, as one float32 vector.

    Args:
        grads: List of tensors; `None` entries are left out.

    Returns:
        `(stacked, present)`: the vector of the squared norms of the entries
        that are not `None` (`None` if all are) and their indices.
    """
    present = [i for i, g in enumerate(grads) if g is not None]
    if not present:
        return None, present
    values = [ops.cast(_values(grads[i]), "float32") for i in present]
    if keras.backend.backend() == "tensorflow":
        # One fused kernel per tensor (`L2Loss` = sum(x^2) / 2, no temporary
        # the size of the gradient) and one multiply for all: fewer ops in
        # the compiled step than square + sum per tensor.
        import tensorflow as tf

        return 2.0 * tf.stack([tf.nn.l2_loss(v) for v in values]), present
    return ops.stack([ops.sum(ops.square(v)) for v in values]), present


class SquaredNorms(list):
    """The list `squared_norms` returns, with its entries also stacked.

    A plain list of float32 scalars (or `None`), one per gradient, whose
    `stacked` attribute is the vector they were split from (the entries
    that are not `None`, at the indices `present`; `None` when all are).
    Code that only sums them (`global_norm`, per-layer sums) uses the
    vector, with no op to stack them again.
    """

    def __init__(self, entries, stacked, present):
        super().__init__(entries)
        self.stacked = stacked
        self.present = list(present)

    @classmethod
    def split(cls, stacked_and_present, length):
        """The `SquaredNorms` of `length` gradients from `stacked_squared_norms`."""
        stacked, present = stacked_and_present
        entries = [None] * length
        if present:
            # `ops.unstack` is `tf.unstack` on TensorFlow: one op for all.
            for i, square in zip(present, ops.unstack(stacked), strict=True):
                entries[i] = square
        return cls(entries, stacked, present)


def global_norm(grads, squares=None):
    """Global L2 norm of a list of gradients, in float32.

    Args:
        grads: List of tensors; `None` entries are ignored.
        squares: Their `squared_norms`, if already computed, or `None`.
            Defaults to `None`.

    Returns:
        A float32 scalar. It is `inf` or `nan` when any entry is, and `0.0`
        for an empty list.

    Raises:
        ValueError: If `grads` is not a list of tensors, or `squares` not
            `None` or a list as long.
    """
    grads = check_gradients("grads", grads)
    if isinstance(squares, SquaredNorms) and len(squares) == len(grads):
        return stacked_global_norm(squares.stacked)
    if squares is not None:
        squares = check_gradients("squares", squares, length=len(grads))
    if squares is None:
        squares = squared_norms(grads)
    squares = [s for s in squares if s is not None]
    if not squares:
        return ops.convert_to_tensor(0.0, dtype="float32")
    return ops.sqrt(ops.sum(ops.stack(squares)))


def is_finite(grads):
    """Whether every entry of every gradient is finite, as a bool scalar.

    Args:
        grads: List of tensors; `None` entries are ignored.

    Returns:
        A bool scalar tensor.

    Raises:
        ValueError: If `grads` is not a list of tensors.
    """
    grads = check_gradients("grads", grads)
    checks = [ops.all(ops.isfinite(_values(g))) for g in grads if g is not None]
    if not checks:
        return ops.convert_to_tensor(True)
    return ops.all(ops.stack(checks))


def scale_gradients(grads, scale):
    """Multiplies every gradient by a scalar, keeping `None` entries.

    Args:
        grads: List of tensors (or `tf.IndexedSlices`) and `None`.
        scale: Scalar tensor or number.

    Returns:
        The scaled list, each entry in its own dtype.

    Raises:
        ValueError: If `grads` is not a list of tensors, or `scale` is not a
            tensor or a finite number.
    """
    grads = check_gradients("grads", grads)
    scale = check_scalar("scale", scale)
    return [_scale(g, scale) for g in grads]


def clip_by_global_norm(grads, max_norm, norm=None):
    """Rescales `grads` so that their global norm is at most `max_norm`.

    Gradients whose global norm is already at most `max_norm` are returned
    unchanged (scale exactly 1). Unlike `keras.optimizers`' version, a
    non-finite norm does not turn every gradient into NaN: the scale is
    then 1 and the caller decides what to do (GuardedOptimizer skips the step).

    Args:
        grads: List of tensors; `None` entries are kept.
        max_norm: Positive number, or a scalar tensor.
        norm: Optional precomputed `global_norm(grads)`. Defaults to `None`.

    Returns:
        Tuple `(clipped_grads, norm)` where `norm` is the float32 pre-clip norm.

    Raises:
        ValueError: If `grads` is not a list of tensors, `max_norm` is not a
            positive number or a tensor, or `norm` is not a tensor or `None`.
    """
    grads = check_gradients("grads", grads)
    max_norm = check_scalar("max_norm", max_norm, low=0.0, low_open=True)
    norm = check_tensor("norm", norm, allow_none=True)
    if norm is None:
        norm = global_norm(grads)
    max_norm = ops.cast(max_norm, "float32")
    clip = ops.logical_and(ops.isfinite(norm), ops.greater(norm, max_norm))
    scale = ops.where(clip, max_norm / ops.where(clip, norm, 1.0), 1.0)
    return scale_gradients(grads, scale), norm


class ClippingPolicy:
    """Base class of the clipping policies used by `GuardedOptimizer`.

    A policy is a plain serializable object. `GuardedOptimizer.build` calls
    `build(optimizer, variables)`, where the policy creates its state with
    `optimizer.add_variable` (so the state is saved with the optimizer). Each
    step the optimizer calls, in order:

    1. `threshold(norm)` -> `(threshold, new_state)`: reads the state, returns
       the float32 threshold for this step and the candidate new state values
       (a list matching `state_variables`), without assigning anything;
    2. `commit(new_state, accept)`: assigns the new state where `accept`
       (a bool scalar: the step is finite and not skipped), the old one
       otherwise;
    3. `clip(grads, variables, norm, threshold)` -> `(grads, clipped)`.

    Subclasses that clip by the global norm only implement `build` and
    `threshold`.
    """

    def __init__(self):
        self.state_variables = []

    def build(self, optimizer, variables):
        """Creates the policy's state variables on `optimizer`."""
        del optimizer, variables
        self.state_variables = []

    def threshold(self, norm):
        """Returns `(threshold, new_state)` for this step's pre-clip `norm`."""
        raise NotImplementedError

    def commit(self, new_state, accept):
        """Assigns `new_state` to the state variables where `accept` is true."""
        for variable, value in zip(self.state_variables, new_state, strict=True):
            variable.assign(
                ops.where(accept, ops.cast(value, variable.dtype), variable.value)
            )

    def clip(self, grads, variables, norm, threshold):
        """Clips `grads` to `threshold`; returns `(grads, clipped_flag)`."""
        del variables
        clipped, _ = clip_by_global_norm(grads, threshold, norm=norm)
        flag = ops.logical_and(ops.isfinite(norm), ops.greater(norm, threshold))
        return clipped, flag

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{self.__class__.__name__}({args})"


def is_tensor_like(value):
    """Whether `value` can stand for a tensor argument: a tensor, a variable,
    a NumPy array or scalar, or a number (never a `bool` or a string)."""
    if isinstance(value, (bool, np.bool_, str, bytes)) or value is None:
        return False
    if is_number(value) or isinstance(value, (np.ndarray, np.generic, keras.Variable)):
        return True
    if ops.is_tensor(value):
        return True
    # `tf.IndexedSlices` (embedding gradients) and other tensor types.
    return hasattr(value, "dtype") and hasattr(value, "shape")


def check_tensor(name, value, allow_none=False):
    """Returns `value` if it is tensor-like (see `is_tensor_like`)."""
    if value is None and allow_none:
        return None
    if not is_tensor_like(value):
        raise invalid(
            name, value, "a tensor or a number" + (" or None" if allow_none else "")
        )
    return value


def check_scalar(name, value, low=None, low_open=False, high=None, high_open=False):
    """A tensor passes as it is; a Python/NumPy number must be in range."""
    if is_number(value):
        return check_number(
            name, value, low=low, low_open=low_open, high=high, high_open=high_open
        )
    return check_tensor(name, value)


def check_count(name, value):
    """An integer (>= 0) or an integer tensor (its value is only known in-graph)."""
    if is_integer(value):
        return check_int(name, value, low=0)
    if is_tensor_like(value) and not is_number(value):
        return value
    raise invalid(name, value, "a non-negative integer or an integer tensor")


def stacked_global_norm(stacked):
    """`global_norm` from the vector of `stacked_squared_norms` (`None`: 0.0)."""
    if stacked is None:
        return ops.convert_to_tensor(0.0, dtype="float32")
    return ops.sqrt(ops.sum(stacked))


def check_gradients(name, grads, length=None):
    """Returns `grads` as a list if it is a list or tuple of tensors / `None`s."""
    ok = isinstance(grads, (list, tuple)) and all(
        g is None or is_tensor_like(g) for g in grads
    )
    if ok and length is not None and len(grads) != length:
        raise invalid(name, grads, f"a list of {length} entries (one per gradient)")
    if not ok:
        raise invalid(name, grads, "a list of tensors (entries may be None)")
    return list(grads)


def check_buffer(name, value):
    """A 1-D tensor of static size >= 1 (a ring buffer)."""
    shape = getattr(value, "shape", None) if is_tensor_like(value) else None
    if shape is None or len(shape) != 1 or not shape[0]:
        raise invalid(name, value, "a 1-D tensor of static size >= 1")
    return value


def _scalar_variable(optimizer, name, value=0.0, dtype="float32", shape=()):
    return optimizer.add_variable(
        shape=shape,
        initializer=keras.initializers.Constant(value),
        dtype=dtype,
        aggregation="only_first_replica",
        name=name,
    )
