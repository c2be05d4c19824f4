"""The Keras example everybody knows, with its two usual defects fixed.

The example trains a `Sequential` of Dense(128, relu), Dense(64, relu),
Dense(10) with `SparseCategoricalCrossentropy` and Adam(1e-3), then calls
`loss, accuracy = model.evaluate(...)`. As usually written it has two
defects, fixed in `compile_example_model`:

1. the last layer outputs logits, so the loss needs `from_logits=True`;
2. `evaluate` returns an accuracy only if `metrics=["accuracy"]` is compiled.

The demo (`python -m keras_stability demo`), the README, the notebooks and
the benchmarks start from this model.
"""

import keras

from keras_stability._checks import check_int
from keras_stability._checks import invalid


def build_example_model(n_features=10, n_classes=10):
    """Builds the Keras example's model: an MLP that outputs logits.

    `Dense(128, relu) -> Dense(64, relu) -> Dense(n_classes)` on
    `n_features` inputs, named `"keras_example"`; uncompiled (see
    `compile_example_model`).

    Args:
        n_features: Number of input features. Defaults to `10`.
        n_classes: Number of classes (units of the logits layer). Defaults
            to `10`.

    Returns:
        A built, uncompiled `keras.Sequential`.

    Raises:
        ValueError: If `n_features` is not a positive integer or `n_classes`
            is not an integer >= 2.

    Example:

    >>> model = build_example_model(n_features=64)
    >>> model.output_shape
    (None, 10)
    """
    n_features = check_int("n_features", n_features, low=1)
    n_classes = check_int("n_classes", n_classes, low=2)
    return keras.Sequential(
        [
            keras.Input(shape=(n_features,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(n_classes),
        ],
        name="keras_example",
    )


def compile_example_model(model, optimizer=None):
    """Compiles a classifier the way the Keras example should be compiled.

    The loss is `SparseCategoricalCrossentropy(from_logits=True)` (the model
    outputs logits) and `"accuracy"` is compiled as a metric, so
    `loss, accuracy = model.evaluate(x, y)` works.

    Args:
        model: The `keras.Model` to compile, e.g. from `build_example_model`.
        optimizer: A `keras.optimizers.Optimizer` instance (such as a
            `GuardedOptimizer`), an optimizer name Keras knows (`"sgd"`), or
            `None` for `Adam(learning_rate=1e-3)`. Defaults to `None`.

    Returns:
        `model`, compiled.

    Raises:
        ValueError: If `model` is not a `keras.Model` or `optimizer` is not an
            optimizer, an optimizer's name or `None`.

    Example:

    >>> model = compile_example_model(build_example_model())
    >>> model.loss.from_logits
    True
    """
    if not isinstance(model, keras.Model):
        raise invalid("model", model, "a keras.Model")
    what = "a keras.optimizers.Optimizer, an optimizer name or None"
    if optimizer is None:
        optimizer = keras.optimizers.Adam(learning_rate=1e-3)
    elif isinstance(optimizer, str):
        try:
            optimizer = keras.optimizers.get(optimizer)
        except ValueError:
            raise invalid("optimizer", optimizer, what) from None
    elif not isinstance(optimizer, keras.optimizers.Optimizer):
        raise invalid("optimizer", optimizer, what)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model
