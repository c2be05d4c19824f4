"""Regularizers for fine-tuning."""

from keras_stability.regularizers.l2sp import L2SP
from keras_stability.regularizers.l2sp import l2sp_penalty

__all__ = ["L2SP", "l2sp_penalty"]
