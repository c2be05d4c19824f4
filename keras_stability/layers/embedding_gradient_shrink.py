"""`EmbeddingGradientShrink`: identity forward, gradient scaled by `alpha`."""

import keras
from keras import ops

from keras_stability._checks import check_number

__all__ = ["EmbeddingGradientShrink", "shrink_gradient"]


def shrink_gradient(x, alpha):
    """Returns `x` unchanged while scaling the gradient flowing back by `alpha`.

    Computes `stop_gradient(x) + alpha * (x - stop_gradient(x))`: the second
    term is exactly zero in the forward pass (so the output equals `x` bit for
    bit) and its derivative with respect to `x` is `alpha`.

    Args:
        x: Tensor.
        alpha: Gradient multiplier, a number in [0, 1].

    Returns:
        Tensor equal to `x`.

    Raises:
        ValueError: If `alpha` is not a number in [0, 1].
    """
    alpha = check_number("alpha", alpha, low=0.0, high=1.0)
    frozen = ops.stop_gradient(x)
    return frozen + ops.cast(alpha, x.dtype) * (x - frozen)


@keras.saving.register_keras_serializable(package="keras_stability")
class EmbeddingGradientShrink(keras.layers.Layer):
    """Leaves the forward pass unchanged and scales the gradient by `alpha`.

    GLM-130B put this after the word embedding: the embedding layer's
    gradients were orders of magnitude larger than the rest early in
    training and caused loss spikes; shrinking them with `alpha = 0.1`
    removed most spikes. Place the layer right after `keras.layers.Embedding`
    (or any layer whose gradient should shrink).

    Args:
        alpha: Gradient multiplier in [0, 1]; `1` is a no-op, `0` freezes
            what is upstream. Defaults to `0.1`.
        **kwargs: Base `Layer` arguments (`name`, `dtype`, ...).

    Raises:
        ValueError: If `alpha` is not a number in [0, 1].

    Example:

    >>> ids = keras.Input(shape=(8,), dtype="int32")
    >>> x = keras.layers.Embedding(100, 16)(ids)
    >>> x = EmbeddingGradientShrink(alpha=0.1)(x)

    Reference:
        Zeng et al., "GLM-130B: An Open Bilingual Pre-trained Model", 2022.
    """

    def __init__(self, alpha=0.1, **kwargs):
        super().__init__(**kwargs)
        self.alpha = check_number("alpha", alpha, low=0.0, high=1.0)
        self.supports_masking = True
        self.built = True

    def call(self, inputs):
        return shrink_gradient(inputs, self.alpha)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"alpha": self.alpha})
        return config
