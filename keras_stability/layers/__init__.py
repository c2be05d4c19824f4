"""Layers that keep deep and transformer models trainable."""

from keras_stability.layers.embedding_gradient_shrink import EmbeddingGradientShrink
from keras_stability.layers.embedding_gradient_shrink import shrink_gradient
from keras_stability.layers.residual import Residual
from keras_stability.layers.residual import deepnorm_constants
from keras_stability.layers.transformer import QKNormMultiHeadAttention
from keras_stability.layers.transformer import StableTransformerBlock
from keras_stability.layers.z_loss import ZLoss
from keras_stability.layers.z_loss import z_loss

__all__ = [
    "EmbeddingGradientShrink",
    "QKNormMultiHeadAttention",
    "Residual",
    "StableTransformerBlock",
    "ZLoss",
    "deepnorm_constants",
    "shrink_gradient",
    "z_loss",
]
