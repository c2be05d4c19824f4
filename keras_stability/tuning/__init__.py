"""Choosing hyperparameters: Keras Tuner helpers (regularization, divergence-safe
trials) and the learning-rate range test."""

from keras_stability.tuning.hypermodel import DivergenceDetector
from keras_stability.tuning.hypermodel import StableHyperModel
from keras_stability.tuning.hyperparameters import CLIPPING_POLICIES
from keras_stability.tuning.hyperparameters import RegularizationSettings
from keras_stability.tuning.hyperparameters import regularization_hyperparameters
from keras_stability.tuning.hyperparameters import with_regularization
from keras_stability.tuning.lr_finder import LearningRateRange
from keras_stability.tuning.lr_finder import find_learning_rate
from keras_stability.tuning.lr_finder import running_median
from keras_stability.tuning.lr_finder import suggest_learning_rate

__all__ = [
    "CLIPPING_POLICIES",
    "DivergenceDetector",
    "LearningRateRange",
    "RegularizationSettings",
    "StableHyperModel",
    "find_learning_rate",
    "regularization_hyperparameters",
    "running_median",
    "suggest_learning_rate",
    "with_regularization",
]
