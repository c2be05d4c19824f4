"""Callbacks you add to `model.fit`."""

from keras_stability.callbacks.gradual_unfreezing import GradualUnfreezing
from keras_stability.callbacks.weight_decay_scheduler import WeightDecayScheduler

__all__ = [
    "GradualUnfreezing",
    "WeightDecayScheduler",
]
