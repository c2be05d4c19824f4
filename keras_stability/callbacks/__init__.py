"""Callbacks you add to `model.fit`."""

from keras_stability.callbacks.adaptive_clipping import AdaptiveClipping
from keras_stability.callbacks.gradual_unfreezing import GradualUnfreezing
from keras_stability.callbacks.weight_decay_scheduler import WeightDecayScheduler

__all__ = [
    "AdaptiveClipping",
    "GradualUnfreezing",
    "WeightDecayScheduler",
]
