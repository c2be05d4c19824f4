"""Small reference models used by the demo, notebooks and benchmarks."""

from keras_stability.models.char_lm import TokenAndPositionEmbedding
from keras_stability.models.char_lm import build_char_transformer
from keras_stability.models.char_lm import generate

__all__ = ["TokenAndPositionEmbedding", "build_char_transformer", "generate"]
