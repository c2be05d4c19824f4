"""AutoClip: clip to a percentile of the history of gradient norms."""

import keras
from keras import ops

from keras_stability import _keras_internals
from keras_stability._checks import check_number
from keras_stability._checks import check_positive_int
from keras_stability.clipping.base import ClippingPolicy
from keras_stability.clipping.base import _scalar_variable
from keras_stability.clipping.base import check_buffer
from keras_stability.clipping.base import check_count
from keras_stability.clipping.base import check_tensor


def _check_percentile(value):
    return check_number("percentile", value, low=0.0, low_open=True, high=100.0)


__all__ = ["AutoClip", "autoclip_threshold", "masked_percentile"]


def masked_percentile(values, count, percentile):
    """`numpy.percentile(values[:count], percentile)` (linear method), in-graph.

    Args:
        values: 1-D float tensor (a fixed-size buffer).
        count: Int scalar, how many leading entries are valid; entries at
            positions `>= count` are ignored. Must be >= 1.
        percentile: Python float in (0, 100].

    Returns:
        A float32 scalar.

    Raises:
        ValueError: If an argument is of the wrong kind or out of range.
    """
    values = check_buffer("values", values)
    count = check_count("count", count)
    percentile = _check_percentile(percentile)
    values = ops.cast(values, "float32")
    size = values.shape[0]
    count = ops.cast(count, "int32")
    valid = ops.less(ops.arange(size, dtype="int32"), count)
    ordered = ops.sort(ops.where(valid, values, float("inf")))
    position = ops.cast(count - 1, "float32") * (percentile / 100.0)
    lower = ops.cast(ops.floor(position), "int32")
    upper = ops.minimum(lower + 1, count - 1)
    low = ops.take(ordered, lower)
    high = ops.take(ordered, upper)
    fraction = position - ops.cast(lower, "float32")
    return low + (high - low) * fraction


def autoclip_threshold(history, count, norm, percentile):
    """Writes `norm` into the ring buffer `history` and returns its percentile.

    Args:
        history: 1-D float32 tensor of size H, the ring buffer.
        count: Int scalar, number of norms recorded so far (may exceed H).
        norm: Float32 scalar, this step's norm.
        percentile: Python float in (0, 100].

    Returns:
        Tuple `(threshold, new_history, new_count)`.

    Raises:
        ValueError: If an argument is of the wrong kind or out of range.
    """
    history = check_buffer("history", history)
    count = check_count("count", count)
    norm = check_tensor("norm", norm)
    percentile = _check_percentile(percentile)
    size = history.shape[0]
    count = ops.cast(count, "int32")
    slot = ops.mod(count, size)
    one_hot = ops.equal(ops.arange(size, dtype="int32"), slot)
    new_history = ops.where(one_hot, ops.cast(norm, "float32"), history)
    new_count = count + 1
    threshold = masked_percentile(new_history, ops.minimum(new_count, size), percentile)
    return threshold, new_history, new_count


@keras.saving.register_keras_serializable(package="keras_stability")
class AutoClip(ClippingPolicy):
    """Clips to the `percentile`-th percentile of past global gradient norms.

    Each step the pre-clip global norm is added to a fixed-size ring buffer of
    the last `history_size` accepted norms (non-finite and skipped steps are not
    recorded), and the gradients are clipped to the given percentile of the
    buffer, the current norm included, as in the reference implementation.

    Args:
        percentile: Float in (0, 100]. Defaults to `10.0`.
        history_size: Integer >= 1, the buffer size. Defaults to `1000`.

    Reference:
        Seetharaman et al., "AutoClip: Adaptive Gradient Clipping for Source
        Separation Networks", MLSP 2020.
    """

    def __init__(self, percentile=10.0, history_size=1000):
        super().__init__()
        self.percentile = _check_percentile(percentile)
        self.history_size = check_positive_int("history_size", history_size)

    def build(self, optimizer, variables):
        del variables
        self.history = _scalar_variable(
            optimizer, "autoclip_history", shape=(self.history_size,)
        )
        self.count = _scalar_variable(optimizer, "autoclip_count", 0, "int32")
        self.state_variables = [self.history, self.count]

    def threshold(self, norm):
        # Each variable read once (`.value` is read again by each op using it).
        threshold, history, count = autoclip_threshold(
            _keras_internals.read(self.history),
            _keras_internals.read(self.count),
            norm,
            self.percentile,
        )
        return threshold, [history, count]

    def get_config(self):
        return {"percentile": self.percentile, "history_size": self.history_size}
