"""AGC: unit-wise adaptive gradient clipping for Keras' (..., in, out) layout."""

import keras
import numpy as np
from keras import ops

from keras_stability._checks import check_bool
from keras_stability._checks import check_positive
from keras_stability._checks import invalid
from keras_stability.clipping.base import ClippingPolicy
from keras_stability.clipping.base import check_gradients
from keras_stability.clipping.base import check_tensor

__all__ = ["AGC", "adaptive_clip", "unitwise_norm"]


def unitwise_norm(x):
    """L2 norm per output unit, broadcastable against `x`.

    Keras kernels are laid out `(..., in, out)` (Dense `(in, out)`, Conv2D
    `(h, w, in, out)`, Embedding `(vocab, dim)`), so the norm reduces over every
    axis but the last. Scalars and vectors (biases, normalization parameters)
    get the norm of the whole tensor.

    Args:
        x: Tensor.

    Returns:
        Float32 tensor of rank `x.ndim` (size 1 on the reduced axes).

    Raises:
        ValueError: If `x` is not a tensor.
    """
    x = check_tensor("x", x)
    x = ops.cast(x, "float32")
    ndim = len(x.shape)
    if ndim <= 1:
        return ops.sqrt(ops.sum(ops.square(x), keepdims=True))
    return ops.sqrt(ops.sum(ops.square(x), axis=tuple(range(ndim - 1)), keepdims=True))


def adaptive_clip(grads, params, clip_factor, epsilon=1e-3, apply_to=None):
    """Unit-wise adaptive gradient clipping (pure).

    For each unit, the gradient's norm is limited to
    `clip_factor * max(unitwise_norm(param), epsilon)`.

    Args:
        grads: List of gradient tensors (or `None`).
        params: List of the matching parameter tensors.
        clip_factor: Positive float.
        epsilon: Positive float, floor of the parameter norm.
            Defaults to `1e-3`.
        apply_to: Optional list of bools, which entries to clip (others pass
            through). Defaults to `None` (all).

    Returns:
        Tuple `(clipped_grads, clipped)` where `clipped` is a bool scalar,
        true if any unit was clipped.

    Raises:
        ValueError: If an argument is of the wrong kind or out of range, or
            the lists differ in length.
    """
    grads = check_gradients("grads", grads)
    params = check_gradients("params", params, length=len(grads))
    if any(p is None for p in params):
        raise invalid("params", params, "a list of tensors (no None)")
    clip_factor = check_positive("clip_factor", clip_factor)
    epsilon = check_positive("epsilon", epsilon)
    if apply_to is None:
        apply_to = [True] * len(grads)
    elif not (
        isinstance(apply_to, (list, tuple))
        and len(apply_to) == len(grads)
        and all(isinstance(a, (bool, np.bool_)) for a in apply_to)
    ):
        raise invalid(
            "apply_to",
            apply_to,
            f"None or a list of {len(grads)} bools (one per gradient)",
        )
    out = []
    flags = []
    for g, p, use in zip(grads, params, apply_to, strict=True):
        if g is None or not use:
            out.append(g)
            continue
        g = ops.convert_to_tensor(g)
        max_norm = ops.maximum(unitwise_norm(p), epsilon) * clip_factor
        g_norm = unitwise_norm(g)
        clip = ops.greater(g_norm, max_norm)
        scale = ops.where(clip, max_norm / ops.maximum(g_norm, 1e-6), 1.0)
        out.append(ops.multiply(g, ops.cast(scale, g.dtype)))
        flags.append(ops.any(clip))
    if not flags:
        return out, ops.convert_to_tensor(False)
    return out, ops.any(ops.stack(flags))


def _key(variable):
    return getattr(variable, "path", None) or variable.name


@keras.saving.register_keras_serializable(package="keras_stability")
class AGC(ClippingPolicy):
    """Adaptive gradient clipping, unit by unit, relative to the weight norm.

    Each output unit's gradient norm is limited to `clip_factor` times the
    unit's weight norm (floored at `epsilon`). By default biases and normalization
    parameters (variables of rank <= 1) and the final layer's kernel (the last
    variable of rank >= 2 the optimizer is built with) are not clipped, as the
    paper recommends. The `clip_threshold` statistic reports `clip_factor`.

    Args:
        clip_factor: Positive float. Defaults to `0.01`.
        epsilon: Positive float, floor of the weight norm. Defaults to `1e-3`.
        exclude_vectors: Whether to leave variables of rank <= 1 unclipped.
            Defaults to `True`.
        exclude_final_layer: Whether to leave the final kernel unclipped.
            Defaults to `True`.

    Reference:
        Brock et al., "High-Performance Large-Scale Image Recognition Without
        Normalization", ICML 2021.
    """

    def __init__(
        self,
        clip_factor=0.01,
        epsilon=1e-3,
        exclude_vectors=True,
        exclude_final_layer=True,
    ):
        super().__init__()
        self.clip_factor = check_positive("clip_factor", clip_factor)
        self.epsilon = check_positive("epsilon", epsilon)
        self.exclude_vectors = check_bool("exclude_vectors", exclude_vectors)
        self.exclude_final_layer = check_bool(
            "exclude_final_layer", exclude_final_layer
        )
        self._excluded = set()

    def build(self, optimizer, variables):
        del optimizer
        self.state_variables = []
        self._excluded = set()
        if self.exclude_final_layer:
            kernels = [v for v in variables if len(v.shape) >= 2]
            if kernels:
                self._excluded.add(_key(kernels[-1]))

    def applies_to(self, variable):
        """Whether AGC clips this variable.

        Keras' LoRA factors (`enable_lora`: `lora_kernel_a`, `lora_kernel_b`,
        ...) are never clipped: `lora_kernel_b` starts at zero, where the
        unit-wise limit `clip_factor * epsilon` would keep it from moving.
        """
        if variable.name.startswith("lora_"):
            return False
        if self.exclude_vectors and len(variable.shape) <= 1:
            return False
        return _key(variable) not in self._excluded

    def threshold(self, norm):
        del norm
        return ops.convert_to_tensor(self.clip_factor, dtype="float32"), []

    def clip(self, grads, variables, norm, threshold):
        del norm, threshold
        params = [ops.convert_to_tensor(v) for v in variables]
        return adaptive_clip(
            grads,
            params,
            self.clip_factor,
            self.epsilon,
            [self.applies_to(v) for v in variables],
        )

    def get_config(self):
        return {
            "clip_factor": self.clip_factor,
            "epsilon": self.epsilon,
            "exclude_vectors": self.exclude_vectors,
            "exclude_final_layer": self.exclude_final_layer,
        }
