"""Optimizer wrappers that act on the gradients inside the compiled step."""

from keras_stability.optimizers.guarded_optimizer import GradientObserver
from keras_stability.optimizers.guarded_optimizer import GuardedOptimizer
from keras_stability.optimizers.guarded_optimizer import ensure_guarded

__all__ = ["GradientObserver", "GuardedOptimizer", "ensure_guarded"]
