import warnings

import keras
import numpy as np
import pytest

from keras_stability.callbacks import ActivationMonitor
from keras_stability.callbacks.activation_monitor import activation_kind
from keras_stability.diagnostics import dead_fraction
from keras_stability.diagnostics import saturated_fraction


def _model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu", name="relu_dense"),
            keras.layers.Dense(6, activation="sigmoid", name="sig_dense"),
            keras.layers.Dense(5, name="linear"),
            keras.layers.Activation("tanh", name="tanh_act"),
            keras.layers.Dense(3, name="head"),
        ]
    )
    model.compile("sgd", "mse")
    return model


def test_activation_kind():
    layers = {layer.name: activation_kind(layer) for layer in _model().layers}
    assert layers == {
        "relu_dense": "relu",
        "sig_dense": "sigmoid",
        "linear": None,
        "tanh_act": "tanh",
        "head": None,
    }
    assert activation_kind(keras.layers.ReLU()) == "relu"


def test_fractions_match_reference_and_reach_logs():
    model = _model()
    relu = model.get_layer("relu_dense")
    kernel, bias = relu.get_weights()
    bias[:3] = -100.0  # 3 of 8 units dead on any reasonable input
    relu.set_weights([kernel, bias])
    sig = model.get_layer("sig_dense")
    k, b = sig.get_weights()
    b[:2] = 50.0  # 2 of 6 sigmoid units saturated high
    sig.set_weights([k, b])
    probe = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    monitor = ActivationMonitor(probe, log_fractions=True, warn_fraction=0.3, verbose=1)
    x = np.random.default_rng(1).normal(size=(32, 4)).astype("float32")
    y = np.zeros((32, 3), "float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, y, epochs=1, verbose=0, callbacks=[monitor])
    # Reference: the same fractions computed from the layer outputs directly.
    h1 = keras.ops.convert_to_numpy(relu(probe))
    h2 = keras.ops.convert_to_numpy(sig(h1))
    assert monitor.report["relu_dense"]["fraction"] == pytest.approx(dead_fraction(h1))
    assert monitor.report["relu_dense"]["fraction"] >= 3 / 8
    assert monitor.report["sig_dense"]["fraction"] == pytest.approx(
        saturated_fraction(h2, "sigmoid")
    )
    assert monitor.report["sig_dense"]["fraction"] >= 2 / 6
    assert set(monitor.report) == {"relu_dense", "sig_dense", "tanh_act"}
    assert history.history["dead_fraction/relu_dense"] == [
        monitor.report["relu_dense"]["fraction"]
    ]
    assert "saturated_fraction/sig_dense" in history.history
    message = " ".join(str(w.message) for w in caught)
    assert "relu_dense (relu): " in message and "dead units" in message
    text = monitor.summary(print_to_stdout=False)
    assert "sig_dense (sigmoid)" in text and "Remedies" in text


def test_check_freq_and_config_round_trip():
    model = _model()
    probe = np.zeros((4, 4), "float32")
    monitor = ActivationMonitor(probe, check_freq=2, verbose=0)
    x = np.ones((8, 4), "float32")
    model.fit(x, np.zeros((8, 3)), epochs=4, verbose=0, callbacks=[monitor])
    assert len(monitor.history["relu_dense"]) == 2
    config = monitor.get_config()
    again = ActivationMonitor.from_config(config).get_config()
    assert again.keys() == config.keys() and again["check_freq"] == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"check_freq": 0},
            "Invalid value for argument `check_freq`. Expected a positive integer. Received: check_freq=0",
        ),
        ({"saturation_epsilon": 0.7}, "Received: saturation_epsilon=0.7"),
        ({"probe_data": None}, "Received: probe_data=None"),
    ],
)
def test_invalid_arguments(kwargs, message):
    kwargs = {"probe_data": np.zeros((2, 4)), **kwargs}
    with pytest.raises(ValueError) as info:
        ActivationMonitor(**kwargs)
    assert message in str(info.value)


class _FeedForwardBlock(keras.layers.Layer):
    """keras.io's transformer block, its feed-forward part: a nested Sequential."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.ffn = keras.Sequential(
            [
                keras.layers.Dense(
                    6,
                    activation="relu",
                    bias_initializer=keras.initializers.Constant(-100.0),
                    name="ffn_relu",
                ),
                keras.layers.Dense(4),
            ]
        )

    def call(self, x):
        return x + self.ffn(x)


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(5, activation="sigmoid", name="sub_sigmoid")
        self.head = keras.layers.Dense(1)

    def call(self, x):
        return self.head(self.hidden(x))


def test_nested_layers_are_checked_and_their_call_is_left_as_it_was():
    # Before, only `model.layers` were probed: a dead ReLU in a nested
    # Sequential, a `Residual` or a custom block's feed-forward was never
    # reported, and the summary said "no checks yet" after a check.
    from keras_stability.layers import Residual

    keras.utils.set_random_seed(0)
    dead = keras.layers.Dense(
        8,
        activation="relu",
        bias_initializer=keras.initializers.Constant(-100.0),
        name="dead_in_block",
    )
    inputs = keras.Input((4,))
    h = keras.Sequential([dead, keras.layers.Dense(4)], name="block")(inputs)
    h = Residual(keras.layers.Dense(4, activation="tanh", name="res_tanh"))(h)
    h = _FeedForwardBlock()(h)
    model = keras.Model(inputs, keras.layers.Dense(1)(h))
    probe = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    report = ActivationMonitor(probe).check(model)
    assert set(report) == {"dead_in_block", "res_tanh", "ffn_relu"}
    assert report["dead_in_block"] == {"kind": "relu", "fraction": 1.0}
    assert report["ffn_relu"] == {"kind": "relu", "fraction": 1.0}
    assert report["res_tanh"]["kind"] == "tanh" and report["res_tanh"]["fraction"] < 1
    # The layers' own `call` is back: the model computes as before.
    assert all("call" not in vars(layer) for layer in model._flatten_layers())
    before = np.asarray(model(probe))
    ActivationMonitor(probe).check(model)
    np.testing.assert_array_equal(np.asarray(model(probe)), before)


def test_a_subclassed_model_is_checked_and_a_model_without_such_layers_says_so():
    keras.utils.set_random_seed(0)
    model = _Subclassed()
    probe = np.ones((8, 3), "float32")
    model(probe)
    report = ActivationMonitor(probe).check(model)
    assert list(report) == ["sub_sigmoid"]
    linear = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    monitor = ActivationMonitor(probe)
    assert monitor.summary(False) == "ActivationMonitor: no checks yet."
    assert monitor.check(linear) == {}
    assert "no ReLU, sigmoid or tanh layer" in monitor.summary(False)
