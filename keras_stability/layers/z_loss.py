"""`ZLoss`: PaLM's auxiliary loss that keeps the softmax normaliser near 1."""

import keras
from keras import ops

from keras_stability._checks import check_int
from keras_stability._checks import check_number

__all__ = ["ZLoss", "z_loss"]


def z_loss(logits, coefficient=1e-4, axis=-1, mask=None):
    """`coefficient * mean(log(Z) ** 2)` with `log Z = logsumexp(logits, axis)`.

    Computed in float32 (or wider) whatever the dtype of `logits`, so it is
    safe under mixed precision.

    Args:
        logits: Tensor of unnormalised log-probabilities.
        coefficient: Weight of the loss, >= 0. Defaults to `1e-4`.
        axis: Class axis. Defaults to `-1`.
        mask: Boolean tensor shaped as `logits` without `axis` (a Keras
            padding mask); the mean runs over its `True` positions only, as
            Keras' losses do. Defaults to `None` (every position).

    Returns:
        Scalar tensor.

    Raises:
        ValueError: If `coefficient` is not a number >= 0 or `axis` is not
            an axis of `logits`.
    """
    coefficient = check_number("coefficient", coefficient, low=0.0)
    axis = check_int("axis", axis)
    logits = ops.convert_to_tensor(logits)
    rank = len(logits.shape)
    if not -rank <= axis < rank:
        raise ValueError(
            f"Invalid value for argument `axis`. Expected an axis of the "
            f"logits, which have rank {rank} (from {-rank} to {rank - 1}). "
            f"Received: axis={axis}"
        )
    if logits.dtype in ("float16", "bfloat16"):
        logits = ops.cast(logits, "float32")
    log_z = ops.logsumexp(logits, axis=axis)
    coefficient = ops.cast(coefficient, log_z.dtype)
    if mask is None:
        return coefficient * ops.mean(ops.square(log_z))
    weights = ops.cast(mask, log_z.dtype)
    return coefficient * ops.divide_no_nan(
        ops.sum(weights * ops.square(log_z)), ops.sum(weights)
    )


@keras.saving.register_keras_serializable(package="keras_stability")
class ZLoss(keras.layers.Layer):
    """Passes logits through and adds `coefficient * mean(log(Z) ** 2)` as a loss.

    PaLM adds this auxiliary loss to the output logits so that the log of the
    softmax normaliser `Z` stays close to 0, which they found increases the
    stability of training. Put the layer on the logits; they pass through
    unchanged, in their own dtype (under `mixed_float16`, float32 logits stay
    float32), and the loss is computed in float32. The loss goes
    through `add_loss`, so it is added to whatever `compile(loss=...)` is used
    (for example `SparseCategoricalCrossentropy(from_logits=True)`) and shows
    in the `loss` that `fit` and `evaluate` report. Under a padding mask
    (`Embedding(mask_zero=True)`) it averages over the unmasked positions,
    as the compiled loss does, and passes the mask on.

    Args:
        coefficient: Weight of the loss, >= 0. Defaults to `1e-4`.
        axis: Class axis of the logits. Defaults to `-1`.
        **kwargs: Base `Layer` arguments (`name`, `dtype`, ...).

    Raises:
        ValueError: If `coefficient` is negative or not a number, or `axis`
            is not an integer.

    Example:

    >>> inputs = keras.Input(shape=(16,))
    >>> logits = ZLoss(1e-4)(keras.layers.Dense(10)(inputs))
    >>> model = keras.Model(inputs, logits)
    >>> model.compile("adam", keras.losses.SparseCategoricalCrossentropy(
    ...     from_logits=True))

    Reference:
        Chowdhery et al., "PaLM: Scaling Language Modeling with Pathways",
        2022, section 5.
    """

    def __init__(self, coefficient=1e-4, axis=-1, **kwargs):
        # A pass-through: the logits keep their dtype (float32 logits stay
        # float32 under a mixed policy, as the mixed-precision guide wants).
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.coefficient = check_number("coefficient", coefficient, low=0.0)
        self.axis = check_int("axis", axis)
        self.supports_masking = True
        self.built = True

    def call(self, inputs, mask=None):
        self.add_loss(z_loss(inputs, self.coefficient, self.axis, mask=mask))
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_output_spec(self, inputs, mask=None):
        return keras.KerasTensor(inputs.shape, dtype=inputs.dtype)

    def get_config(self):
        config = super().get_config()
        config.update({"coefficient": self.coefficient, "axis": self.axis})
        return config
