"""Optimizer wrappers that act on the gradients inside the compiled step."""

from keras_stability.optimizers.attach import attach_observer
from keras_stability.optimizers.attach import detach_observer
from keras_stability.optimizers.attach import ensure_guarded
from keras_stability.optimizers.attach import strip_guard
from keras_stability.optimizers.guarded_optimizer import GradientObserver
from keras_stability.optimizers.guarded_optimizer import GuardedOptimizer

__all__ = [
    "GradientObserver",
    "GuardedOptimizer",
    "attach_observer",
    "detach_observer",
    "ensure_guarded",
    "strip_guard",
]
