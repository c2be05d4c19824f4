"""Gradient clipping policies: pure numeric cores plus serializable policies.

Use them through `keras_stability.optimizers.GuardedOptimizer(clipping=...)`
or the `keras_stability.callbacks.AdaptiveClipping` callback.
"""

import keras

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
from keras_stability.clipping.spike import SpikeSkipping
from keras_stability.clipping.spike import spike_step
from keras_stability.clipping.zclip import ZClip
from keras_stability.clipping.zclip import zclip_step

__all__ = [
    "AGC",
    "AutoClip",
    "ClippingPolicy",
    "GlobalNorm",
    "SpikeSkipping",
    "ZClip",
    "adaptive_clip",
    "autoclip_threshold",
    "clip_by_global_norm",
    "get",
    "global_norm",
    "is_finite",
    "masked_percentile",
    "scale_gradients",
    "spike_step",
    "unitwise_norm",
    "zclip_step",
]


def get(identifier):
    """Returns a `ClippingPolicy` from a policy, its serialized dict or `None`.

    A positive number means `GlobalNorm(number)`.

    Raises:
        ValueError: For anything else.
    """
    if identifier is None or isinstance(identifier, ClippingPolicy):
        return identifier
    if isinstance(identifier, (int, float)) and not isinstance(identifier, bool):
        return GlobalNorm(identifier)
    if isinstance(identifier, dict):
        policy = keras.saving.deserialize_keras_object(identifier)
        if isinstance(policy, ClippingPolicy):
            return policy
    raise ValueError(
        "Invalid value for argument `clipping`. Expected a "
        "keras_stability.clipping policy (GlobalNorm, AutoClip, ZClip, AGC), "
        f"a positive number or None. Received: clipping={identifier!r}"
    )
