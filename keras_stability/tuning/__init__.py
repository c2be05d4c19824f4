"""Keras Tuner helpers: regularization hyperparameters and divergence-safe trials."""

from keras_stability.tuning.hypermodel import DivergenceDetector
from keras_stability.tuning.hypermodel import StableHyperModel
from keras_stability.tuning.hyperparameters import CLIPPING_POLICIES
from keras_stability.tuning.hyperparameters import RegularizationSettings
from keras_stability.tuning.hyperparameters import regularization_hyperparameters
from keras_stability.tuning.hyperparameters import with_regularization

__all__ = [
    "CLIPPING_POLICIES",
    "DivergenceDetector",
    "RegularizationSettings",
    "StableHyperModel",
    "regularization_hyperparameters",
    "with_regularization",
]
