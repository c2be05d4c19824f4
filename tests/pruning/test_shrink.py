import keras
import numpy as np
import pytest

from keras_stability import pruning
from keras_stability.pruning import shrink
from keras_stability.pruning import shrink_plan


def _mlp():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu", name="h1"),
            keras.layers.Dense(12, activation="tanh", name="h2"),
            keras.layers.Dropout(0.1),
            keras.layers.Dense(3, name="out"),
        ]
    )


def _residual_cnn():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", name="c1")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.ReLU()(h)
    r = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c2")(h)
    h = keras.layers.Add()([h, r])
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Conv2D(6, 1, activation="sigmoid", name="c3")(h)
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(5, name="out")(h)
    model = keras.Model(inputs, outputs)
    bn = model.get_layer("bn")
    rng = np.random.default_rng(1)
    bn.set_weights(
        [
            rng.uniform(0.5, 2, 8),
            rng.normal(size=8),
            rng.normal(size=8),
            rng.uniform(0.5, 2, 8),
        ]
    )
    return model


def _unit_masked(model, plan):
    """The original with the removed channels' inputs to their consumers zeroed."""
    masked = keras.models.clone_model(model)
    masked.set_weights(model.get_weights())
    for group in plan:
        removed = np.setdiff1d(np.arange(group["channels"]), group["keep"])
        for name, spatial in group["consumers"]:
            layer = masked.get_layer(name)
            rows = (np.arange(spatial)[:, None] * group["channels"] + removed).reshape(
                -1
            )
            kernel = layer.kernel.numpy()
            index = [slice(None)] * kernel.ndim
            index[-2] = rows
            kernel[tuple(index)] = 0.0
            layer.kernel.assign(kernel)
    return masked


def test_shrink_mlp_removes_units_and_matches_the_unit_masked_model():
    model = _mlp()
    plan = shrink_plan(model, 0.5)
    assert [g["producers"] for g in plan] == [["h1"], ["h2"]]
    small = shrink(model, 0.5)
    assert isinstance(small, keras.Sequential)
    assert [layer.units for layer in small.layers if hasattr(layer, "units")] == [
        8,
        6,
        3,
    ]
    assert (
        small.count_params()
        == (8 * 8 + 8) + (8 * 6 + 6) + (6 * 3 + 3)
        < model.count_params()
    )
    # The kept units are those with the largest L1 norm of incoming weights.
    h1 = np.abs(model.get_layer("h1").kernel.numpy()).sum(axis=0)
    assert set(plan[0]["keep"]) == set(np.argsort(-h1)[:8])
    x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
    np.testing.assert_allclose(
        small.predict(x, verbose=0),
        _unit_masked(model, plan).predict(x, verbose=0),
        rtol=1e-5,
        atol=1e-5,
    )
    # And not equal to the original: something was removed.
    assert not np.allclose(small.predict(x, verbose=0), model.predict(x, verbose=0))


def test_shrink_conv_bn_residual_flatten():
    model = _residual_cnn()
    plan = shrink_plan(model, 0.5, criterion="l2")
    by_producers = {tuple(g["producers"]): g for g in plan}
    # c1 and c2 are tied by the residual Add; c3 feeds the Dense through Flatten.
    assert set(by_producers) == {("c1", "c2"), ("c3",)}
    assert by_producers[("c1", "c2")]["norms"] == ["bn"]
    small = shrink(model, 0.5, criterion="l2")
    assert small.get_layer("c1").filters == small.get_layer("c2").filters == 4
    assert small.get_layer("c3").filters == 3
    assert small.get_layer("out").kernel.shape == (16 * 3, 5)
    assert small.count_params() < model.count_params() / 2
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(
        small.predict(x, verbose=0),
        _unit_masked(model, plan).predict(x, verbose=0),
        rtol=1e-4,
        atol=1e-5,
    )


def test_fraction_zero_is_a_copy_and_pruned_models_shrink():
    model = _mlp()
    x = np.random.default_rng(0).normal(size=(8, 8)).astype("float32")
    same = shrink(model, 0.0)
    assert same.count_params() == model.count_params()
    np.testing.assert_allclose(
        same.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6
    )
    pruning.prune_low_magnitude(model, pruning.ConstantSparsity(0.5, 0, frequency=1))
    small = shrink(model, 0.25)
    assert pruning.find_pruner(small) is None
    assert pruning.find_pruner(model) is not None  # the original is untouched


def test_shrink_errors_name_the_problem():
    with pytest.raises(ValueError, match="Received: fraction=1.0"):
        shrink(_mlp(), 1.0)
    with pytest.raises(ValueError, match="Received: criterion='l3'"):
        shrink(_mlp(), 0.5, criterion="l3")
    inputs = keras.Input((8,))
    h = keras.layers.Dense(6, name="d")(inputs)
    h = keras.layers.LayerNormalization(name="ln")(h)
    model = keras.Model(inputs, keras.layers.Dense(2)(h))
    with pytest.raises(
        ValueError, match="feeding them to layer 'ln', which `shrink` cannot slice"
    ):
        shrink(model, 0.5)

    inputs = keras.Input((8,))
    shared = keras.layers.Dense(8, name="shared")
    h = keras.layers.Dense(8, name="first")(inputs)
    h = shared(shared(h))
    model = keras.Model(inputs, keras.layers.Dense(2)(h))
    with pytest.raises(ValueError, match="to layer 'shared'"):
        shrink(model, 0.5)

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(4)

        def call(self, x):
            return self.d(x)

    net = Net()
    net(np.zeros((1, 3), "float32"))
    with pytest.raises(
        ValueError, match="Expected a Sequential or functional Keras model"
    ):
        shrink(net, 0.5)
