"""`shrink` slices through per-channel activations only, and says when it removes nothing."""

import warnings

import keras
import numpy as np
import pytest

from keras_stability.pruning import shrink
from keras_stability.pruning import shrink_plan
from tests.pruning.test_shrink import _unit_masked

X = np.random.default_rng(0).normal(size=(16, 12)).astype("float32")


def _hidden(activation, as_layer=False):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12,))
    if as_layer:
        h = keras.layers.Dense(16, name="d1")(inputs)
        h = keras.layers.Activation(activation, name="act")(h)
    else:
        h = keras.layers.Dense(16, activation=activation, name="d1")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="d2")(h))


@pytest.mark.parametrize("as_layer", [False, True], ids=["in Dense", "Activation"])
@pytest.mark.parametrize("activation", ["softmax", "log_softmax", "glu", "sparsemax"])
def test_an_activation_that_mixes_channels_is_not_sliced(activation, as_layer):
    # Slicing through a softmax renormalises the kept units: the smaller
    # model would not compute what the unit-masked one does (0.16 apart).
    model = _hidden(activation, as_layer)
    with pytest.raises(
        ValueError,
        match=rf"to layer '(d1|act)' \(its activation '{activation}' mixes the channels\)",
    ):
        shrink(model, 0.5)


def test_a_custom_activation_is_not_sliced():
    model = _hidden(lambda x: x / keras.ops.sum(x, axis=-1, keepdims=True))
    with pytest.raises(ValueError, match="its activation '<lambda>' mixes"):
        shrink_plan(model, 0.5)


@pytest.mark.parametrize("as_layer", [False, True], ids=["in Dense", "Activation"])
@pytest.mark.parametrize("activation", ["gelu", "silu", "selu", "hard_sigmoid"])
def test_per_channel_activations_still_shrink_to_the_unit_masked_model(
    activation, as_layer
):
    model = _hidden(activation, as_layer)
    plan = shrink_plan(model, 0.5)
    small = shrink(model, 0.5)
    assert [len(g["keep"]) for g in plan] == [8]
    assert small.get_layer("d1").units == 8
    np.testing.assert_allclose(
        small.predict(X, verbose=0),
        _unit_masked(model, plan).predict(X, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_a_copy_from_which_nothing_is_removed_is_warned_about():
    shared = keras.layers.Dense(16, activation="relu")
    a, b = keras.Input((12,)), keras.Input((12,))
    h = keras.layers.Concatenate()([shared(a), shared(b)])
    model = keras.Model([a, b], keras.layers.Dense(1)(h))
    with pytest.warns(UserWarning, match="removed nothing from model .* no group"):
        same = shrink(model, 0.5)
    assert same.count_params() == model.count_params()

    with pytest.warns(UserWarning, match=r"round\(fraction \* channels\) is 0"):
        shrink(_hidden("relu"), 0.01)  # 16 units: round(0.16) = 0


def test_no_warning_when_channels_are_removed_or_none_are_asked_for():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (
            shrink(_hidden("relu"), 0.5).count_params() < _hidden("relu").count_params()
        )
        shrink(_hidden("relu"), 0.0)  # a copy, as asked
