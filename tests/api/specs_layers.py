"""Argument cases for layers, regularizers, diagnostics, tuning, datasets, models,
distillation and pruning (see `tests/api/arguments.py`)."""

from keras_stability import layers
from tests.api.arguments import Case

CASES = [
    Case(layers.ZLoss, bad={"coefficient": [-1e-4]}, config=True),
]
EXEMPT = {}
