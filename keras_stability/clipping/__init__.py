"""Gradient clipping policies: pure numeric cores plus serializable policies.

Use them through `keras_stability.optimizers.GuardedOptimizer(clipping=...)`
or the `keras_stability.callbacks.AdaptiveClipping` callback.
"""

import math

import keras

from keras_stability._checks import invalid
from keras_stability._checks import is_number
from keras_stability.clipping.agc import AGC
from keras_stability.clipping.agc import adaptive_clip
from keras_stability.clipping.agc import unitwise_norm
from keras_stability.clipping.autoclip import AutoClip
from keras_stability.clipping.autoclip import autoclip_threshold
from keras_stability.clipping.autoclip import masked_percentile
from keras_stability.clipping.base import ClippingPolicy
from keras_stability.clipping.base import clip_by_global_norm
from keras_stability.clipping.base import global_norm
from keras_stability.clipping.base import is_finite
from keras_stability.clipping.base import scale_gradients
from keras_stability.clipping.global_clip import GlobalNorm
from keras_stability.clipping.spike import RobustSpikeSkipping
from keras_stability.clipping.spike import SpikeSkipping
from keras_stability.clipping.spike import robust_spike_step
from keras_stability.clipping.spike import spike_step
from keras_stability.clipping.zclip import ZClip
from keras_stability.clipping.zclip import zclip_step

__all__ = [
    "AGC",
    "AutoClip",
    "ClippingPolicy",
    "GlobalNorm",
    "RobustSpikeSkipping",
    "SpikeSkipping",
    "ZClip",
    "adaptive_clip",
    "autoclip_threshold",
    "clip_by_global_norm",
    "get",
    "global_norm",
    "is_finite",
    "masked_percentile",
    "robust_spike_step",
    "scale_gradients",
    "spike_step",
    "unitwise_norm",
    "zclip_step",
]


def get(identifier):
    """Returns a `ClippingPolicy` from a policy, its serialized dict or `None`.

    A positive number (also a NumPy one) means `GlobalNorm(number)`.

    Args:
        identifier: A `ClippingPolicy`, a positive number, the dict of
            `keras.saving.serialize_keras_object(policy)`, or `None`.

    Returns:
        The `ClippingPolicy`, or `None`.

    Raises:
        ValueError: For anything else.
    """
    return get_policy("identifier", identifier)


def get_policy(name, value):
    """`get`, naming the argument `name` in its error (e.g. `clipping`)."""
    if value is None or isinstance(value, ClippingPolicy):
        return value
    if is_number(value) and math.isfinite(value) and value > 0:
        return GlobalNorm(float(value))
    if isinstance(value, dict):
        try:
            policy = keras.saving.deserialize_keras_object(value)
        except (TypeError, ValueError, KeyError):
            policy = None
        if isinstance(policy, ClippingPolicy):
            return policy
    raise invalid(
        name,
        value,
        "a keras_stability.clipping policy (GlobalNorm, AutoClip, ZClip, AGC), "
        "a positive number or None",
    )
