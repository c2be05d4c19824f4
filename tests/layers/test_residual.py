import warnings

import keras
import numpy as np
import pytest

from keras_stability.layers import Residual
from keras_stability.layers import deepnorm_constants
from tests.helpers import run_layer_test


def _mlp_block(width=8):
    return keras.Sequential(
        [keras.layers.Dense(16, activation="relu"), keras.layers.Dense(width)],
        name="mlp_block",
    )


def _x(shape=(4, 8), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def test_layer_rezero_pre_norm(tmp_path):
    run_layer_test(
        Residual,
        {"block": _mlp_block(), "norm": "pre", "scale": "rezero"},
        input_shape=(4, 8),
        expected_output_shape=(4, 8),
        # 2 Dense x (kernel, bias) + LayerNorm (gamma, beta) + rezero scalar.
        expected_num_trainable_weights=7,
        expected_num_non_trainable_weights=0,
        fresh_process=True,
        tmp_dir=tmp_path,
    )


def test_layer_layerscale_post_rms_sequence(tmp_path):
    run_layer_test(
        Residual,
        {
            "block": keras.layers.Dense(8),
            "norm": "post",
            "scale": "layerscale",
            "norm_type": "rms",
            "layerscale_init": 0.1,
        },
        input_shape=(3, 5, 8),
        expected_output_shape=(3, 5, 8),
        # Dense (2) + RMSNormalization scale (1) + LayerScale vector (1).
        expected_num_trainable_weights=4,
        fresh_process=True,
        tmp_dir=tmp_path,
    )


def test_rezero_is_identity_at_initialisation():
    keras.utils.set_random_seed(0)
    x = _x((16, 8))
    inputs = keras.Input((8,))
    h = inputs
    for _ in range(6):
        h = Residual(_mlp_block(), scale="rezero")(h)
    model = keras.Model(inputs, h)
    np.testing.assert_array_equal(np.asarray(model(x)), x)
    # No normalization either: still exactly the identity.
    layer = Residual(_mlp_block(), norm=None, scale="rezero")
    np.testing.assert_array_equal(np.asarray(layer(x)), x)


def test_rezero_scalar_learns_and_leaves_identity():
    keras.utils.set_random_seed(0)
    x = _x((32, 8))
    layer = Residual(_mlp_block(), scale="rezero")
    model = keras.Sequential([keras.Input((8,)), layer])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, 2.0 * x + 1.0, epochs=1, batch_size=32, verbose=0)
    assert float(layer.branch_scale.numpy()) != 0.0
    assert not np.allclose(np.asarray(model(x)), x)


def test_layerscale_scales_the_branch_per_channel():
    keras.utils.set_random_seed(0)
    x = _x()
    block = keras.layers.Dense(8)
    layer = Residual(block, norm="pre", scale="layerscale", layerscale_init=1e-2)
    y = np.asarray(layer(x))
    assert layer.branch_scale.shape == (8,)
    expected = x + 1e-2 * np.asarray(block(layer.norm_layer(x)))
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)


def test_deepnorm_upweights_the_skip_before_post_norm():
    keras.utils.set_random_seed(0)
    x = _x()
    block = keras.layers.Dense(8)
    layer = Residual(block, norm="post", scale="deepnorm", depth=8)
    y = np.asarray(layer(x))
    alpha, beta = deepnorm_constants(8)
    assert alpha == pytest.approx(2.0) and beta == pytest.approx(8**-0.5)
    z = alpha * x + np.asarray(block(x))
    mean, var = z.mean(-1, keepdims=True), z.var(-1, keepdims=True)
    np.testing.assert_allclose(
        y, (z - mean) / np.sqrt(var + 1e-6), rtol=1e-4, atol=1e-5
    )


def test_no_scale_no_norm_is_plain_sum():
    x = _x()
    block = keras.layers.Dense(8)
    y = np.asarray(Residual(block, norm=None)(x))
    np.testing.assert_allclose(y, x + np.asarray(block(x)), rtol=1e-6, atol=1e-6)


def test_block_changing_feature_shape_is_rejected():
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `block`\. Expected a layer that keeps the feature shape \(8,\).*projection to 8 features.*output shape \(4, 4\)",
    ):
        Residual(keras.layers.Dense(4))(_x())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"norm": "middle"},
            "Invalid value for argument `norm`. Expected one of 'pre', 'post', None. Received: norm='middle'",
        ),
        (
            {"scale": "fixup"},
            "Invalid value for argument `scale`. Expected one of None, 'rezero', 'layerscale', 'deepnorm'. Received: scale='fixup'",
        ),
        (
            {"norm_type": "batch"},
            "Invalid value for argument `norm_type`. Expected one of 'layer', 'rms'. Received: norm_type='batch'",
        ),
        (
            {"scale": "layerscale", "layerscale_init": -1e-4},
            "Invalid value for argument `layerscale_init`. Expected a positive number. Received: layerscale_init=-0.0001",
        ),
        (
            {"scale": "deepnorm"},
            "Invalid value for argument `depth`. Expected the number of residual layers",
        ),
        (
            {"scale": "deepnorm", "depth": 0},
            "Invalid value for argument `depth`. Expected a positive integer. Received: depth=0",
        ),
        (  # was silently ignored
            {"depth": 12},
            "Invalid value for argument `depth`. Expected None: only scale='deepnorm'",
        ),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError) as info:
        Residual(keras.layers.Dense(8), **kwargs)
    assert message in str(info.value)


def test_block_must_be_a_layer():
    with pytest.raises(
        ValueError,
        match="Invalid value for argument `block`. Expected a Keras layer or model",
    ):
        Residual(lambda x: x)


def test_config_round_trip_keeps_block():
    layer = Residual(
        _mlp_block(), norm="post", scale="deepnorm", depth=4, norm_type="rms"
    )
    config = layer.get_config()
    revived = Residual.from_config(config)
    assert revived.get_config() == config
    assert isinstance(revived.block, keras.Sequential)
    assert [type(sub) for sub in revived.block.layers] == [keras.layers.Dense] * 2


def test_functional_sub_model_block_saves_and_loads(tmp_path):
    keras.utils.set_random_seed(0)
    i = keras.Input((8,))
    sub = keras.Model(
        i,
        keras.layers.Dense(8)(keras.layers.Dense(16, activation="relu")(i)),
        name="sub",
    )
    inputs = keras.Input((8,))
    model = keras.Model(
        inputs, Residual(sub, scale="layerscale", layerscale_init=0.5)(inputs)
    )
    x = _x()
    path = str(tmp_path / "residual_sub_model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )


def test_custom_layer_without_compute_output_shape():
    class Double(keras.layers.Layer):
        def call(self, x):
            return 2.0 * x

    x = _x()
    np.testing.assert_allclose(
        np.asarray(Residual(Double(), norm=None)(x)), 3.0 * x, rtol=1e-6
    )


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_dtype_argument_reaches_the_normalization(norm):
    # A float32 residual under mixed_float16 gave float16 outputs with
    # norm="post": its normalization followed the global policy.
    x = np.random.default_rng(0).normal(size=(2, 8)).astype("float32")
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = Residual(
            keras.layers.Dense(8, dtype="float32"), norm=norm, dtype="float32"
        )
        y = layer(x)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert keras.backend.standardize_dtype(y.dtype) == "float32"
    assert layer.norm_layer.dtype_policy.name == "float32"


@pytest.mark.parametrize("norm_type", ["layer", "rms"])
def test_a_padding_mask_reaches_the_block_and_the_next_layer(norm_type):
    # Before, `norm_type="rms"` dropped the mask in its norm (Keras warned
    # it "will destroy the mask information"): the block and the pooling
    # after the Residual saw the pads.
    keras.utils.set_random_seed(0)
    ids = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(20, 8, mask_zero=True)(ids)
    h = Residual(keras.layers.Dense(8), norm="pre", norm_type=norm_type)(h)
    model = keras.Model(ids, keras.layers.GlobalAveragePooling1D()(h))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        short = np.asarray(model(np.array([[1, 2, 3, 0]])))
        long = np.asarray(model(np.array([[1, 2, 3, 0, 0, 0, 0]])))
    np.testing.assert_allclose(short, long, atol=1e-6)
    # Without the mask the pads count in the mean.
    h = keras.layers.Embedding(20, 8)(ids)
    h = Residual(keras.layers.Dense(8), norm="pre", norm_type=norm_type)(h)
    model = keras.Model(ids, keras.layers.GlobalAveragePooling1D()(h))
    short = np.asarray(model(np.array([[1, 2, 3, 0]])))
    long = np.asarray(model(np.array([[1, 2, 3, 0, 0, 0, 0]])))
    assert np.abs(short - long).max() > 1e-3
