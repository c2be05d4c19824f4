"""Callbacks for `model.fit`."""

from keras_stability.callbacks.adaptive_clipping import AdaptiveClipping

__all__ = ["AdaptiveClipping"]
