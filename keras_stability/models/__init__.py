"""Small reference models used by the demo, notebooks and benchmarks."""

from keras_stability.models.char_lm import VARIANTS
from keras_stability.models.char_lm import TokenAndPositionEmbedding
from keras_stability.models.char_lm import build_char_transformer
from keras_stability.models.char_lm import generate
from keras_stability.models.char_lm import train_char_lm
from keras_stability.models.example import build_example_model
from keras_stability.models.example import compile_example_model

__all__ = [
    "VARIANTS",
    "TokenAndPositionEmbedding",
    "build_char_transformer",
    "build_example_model",
    "compile_example_model",
    "generate",
    "train_char_lm",
]
