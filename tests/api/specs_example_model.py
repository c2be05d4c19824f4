"""Argument cases for the Keras example model in `keras_stability.models`
(see `tests/api/arguments.py`)."""

import keras

from keras_stability import models
from tests.api.arguments import Case

CASES = [
    Case(
        models.build_example_model,
        bad={"n_features": [0, -3, 10.0], "n_classes": [1, 0, 10.0]},
    ),
    Case(
        models.compile_example_model,
        kwargs=lambda: {"model": models.build_example_model()},
        bad={
            "model": [None, "model", keras.layers.Dense(3)],
            "optimizer": ["no_such_optimizer", 1e-3, keras.losses.MeanSquaredError()],
        },
    ),
]
EXEMPT = {}
