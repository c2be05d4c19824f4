"""Clipping to a fixed global norm, computed on the all-reduced gradient."""

import keras
from keras import ops

from keras_stability._checks import check_positive
from keras_stability.clipping.base import ClippingPolicy

__all__ = ["GlobalNorm"]


@keras.saving.register_keras_serializable(package="keras_stability")
class GlobalNorm(ClippingPolicy):
    """Rescales the gradients so that their global L2 norm is at most `max_norm`.

    The same maths as `keras.optimizers.Optimizer(global_clipnorm=...)`, but
    used through `GuardedOptimizer` it acts on the all-reduced gradient, so 1
    or N replicas give the same update for the same global batch.

    Args:
        max_norm: Positive float, the largest global norm let through.

    Example:

    ```python
    optimizer = keras_stability.optimizers.GuardedOptimizer(
        keras.optimizers.SGD(0.1), clipping=GlobalNorm(1.0))
    ```
    """

    def __init__(self, max_norm):
        super().__init__()
        self.max_norm = check_positive("max_norm", max_norm)

    def threshold(self, norm):
        del norm
        return ops.convert_to_tensor(self.max_norm, dtype="float32"), []

    def get_config(self):
        return {"max_norm": self.max_norm}
