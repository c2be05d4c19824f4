"""Callbacks you add to `model.fit`, and two parts they are built on.

`LayerGradientStats` is a gradient observer for
`GuardedOptimizer(observers=[...])` (`GradientMonitor` is the callback that
shows its values in the logs), and `ScaledSchedule` a learning-rate schedule
(what a rollback leaves on a schedule). Neither goes in `fit`'s `callbacks`:
passed there, each raises a `ValueError` that says where it goes.
"""

from keras_stability.callbacks.activation_monitor import ActivationMonitor
from keras_stability.callbacks.adaptive_clipping import AdaptiveClipping
from keras_stability.callbacks.explosion_detector import GradientExplosionDetector
from keras_stability.callbacks.gradient_monitor import GradientMonitor
from keras_stability.callbacks.gradual_unfreezing import GradualUnfreezing
from keras_stability.callbacks.layer_gradient_stats import LayerGradientStats
from keras_stability.callbacks.lr_scaling import ScaledSchedule
from keras_stability.callbacks.weight_decay_scheduler import WeightDecayScheduler

__all__ = [
    "ActivationMonitor",
    "AdaptiveClipping",
    "GradientExplosionDetector",
    "GradientMonitor",
    "GradualUnfreezing",
    "LayerGradientStats",
    "ScaledSchedule",
    "WeightDecayScheduler",
]
