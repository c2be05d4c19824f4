import keras
import numpy as np
import pytest

from keras_stability.layers import ZLoss
from keras_stability.layers import z_loss
from tests.helpers import run_layer_test


def _reference(logits, coefficient):
    logits = np.asarray(logits, "float64")
    m = logits.max(-1, keepdims=True)
    log_z = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    return coefficient * np.mean(log_z**2)


def test_layer(tmp_path):
    out = run_layer_test(
        ZLoss,
        {"coefficient": 1e-3},
        input_shape=(4, 10),
        expected_output_shape=(4, 10),
        expected_num_trainable_weights=0,
        expected_num_losses=1,
        fresh_process=True,
        tmp_dir=tmp_path,
    )
    np.testing.assert_array_equal(out["output"].shape, (4, 10))


@pytest.mark.parametrize("shape", [(8, 10), (2, 5, 7)])
def test_z_loss_equals_formula(shape):
    logits = np.random.default_rng(0).normal(scale=4.0, size=shape).astype("float32")
    expected = _reference(logits, 1e-4)
    np.testing.assert_allclose(float(z_loss(logits, 1e-4)), expected, rtol=1e-5)
    layer = ZLoss()
    y = layer(logits)
    np.testing.assert_array_equal(np.asarray(y), logits)
    assert len(layer.losses) == 1
    np.testing.assert_allclose(float(layer.losses[0]), expected, rtol=1e-5)


def test_z_loss_is_zero_when_normaliser_is_one():
    probs = np.random.default_rng(0).dirichlet(np.ones(6), size=5)
    assert float(z_loss(np.log(probs).astype("float32"))) == pytest.approx(
        0.0, abs=1e-10
    )


def test_z_loss_in_float16_is_computed_in_float32():
    logits = np.random.default_rng(0).normal(scale=3.0, size=(4, 10))
    value = z_loss(logits.astype("float16"), 1e-4)
    assert value.dtype == "float32"
    np.testing.assert_allclose(
        float(value), _reference(logits.astype("float16"), 1e-4), rtol=1e-4
    )


def test_composes_with_compile_loss():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.integers(0, 5, size=32).astype("int32")
    inputs = keras.Input((6,))
    dense = keras.layers.Dense(
        5, kernel_initializer=keras.initializers.RandomNormal(stddev=2.0)
    )
    logits = ZLoss(coefficient=0.01)(dense(inputs))
    model = keras.Model(inputs, logits)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer="sgd", loss=ce)
    reported = model.evaluate(x, y, batch_size=32, verbose=0)
    out = np.asarray(model.predict(x, verbose=0))
    expected = float(ce(y, out)) + _reference(out, 0.01)
    np.testing.assert_allclose(reported, expected, rtol=1e-5)
    history = model.fit(x, y, epochs=2, batch_size=32, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


def test_z_loss_gradient_pulls_log_z_to_zero():
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    inputs = keras.Input((4,))
    logits = ZLoss(coefficient=1.0)(
        keras.layers.Dense(8, bias_initializer=keras.initializers.Constant(3.0))(inputs)
    )
    model = keras.Model(inputs, logits)
    # Zero data loss: only the z-loss trains.
    model.compile(
        optimizer=keras.optimizers.SGD(1.0),
        loss=lambda y_true, y_pred: 0.0 * keras.ops.sum(y_pred),
    )
    before = _reference(model.predict(x, verbose=0), 1.0)
    model.fit(x, np.zeros((64, 8), "float32"), epochs=10, batch_size=64, verbose=0)
    after = _reference(model.predict(x, verbose=0), 1.0)
    assert after < 0.1 * before


@pytest.mark.parametrize("coefficient", [-1e-4, float("inf"), None])
def test_bad_coefficient(coefficient):
    with pytest.raises(ValueError) as info:
        ZLoss(coefficient)
    assert str(info.value) == (
        "Invalid value for argument `coefficient`. Expected a number >= 0. "
        f"Received: coefficient={coefficient!r}"
    )


def test_config_round_trip():
    layer = ZLoss(coefficient=2e-4, axis=1)
    config = layer.get_config()
    assert (config["coefficient"], config["axis"]) == (2e-4, 1)
    assert ZLoss.from_config(config).get_config() == config


def test_float32_logits_stay_float32_under_mixed_float16():
    # The mixed-precision guide ends the model on a float32 layer; ZLoss on
    # those logits must not cast them back to float16 (softmax and z-loss
    # would then run on rounded logits).
    logits = np.random.default_rng(0).normal(scale=30.0, size=(4, 10))
    logits = logits.astype("float32")
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        inputs = keras.Input((10,))
        outputs = ZLoss(1e-2)(keras.layers.Dense(10, dtype="float32")(inputs))
        assert keras.backend.standardize_dtype(outputs.dtype) == "float32"
        layer = ZLoss(1e-2)
        y = layer(logits)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert keras.backend.standardize_dtype(y.dtype) == "float32"
    np.testing.assert_array_equal(np.asarray(y), logits)
    np.testing.assert_allclose(
        float(layer.losses[0]), _reference(logits, 1e-2), rtol=1e-6
    )


def test_padded_positions_are_left_out_like_the_compiled_loss():
    # Embedding(mask_zero=True) masks the padding out of the compiled loss;
    # the z-loss must leave it out too, or it changes with the padding length.
    keras.utils.set_random_seed(0)
    ids = keras.Input((None,), dtype="int32")
    init = keras.initializers.RandomNormal(stddev=5.0)
    h = keras.layers.Embedding(20, 8, mask_zero=True, embeddings_initializer=init)(ids)
    dense = keras.layers.Dense(20)
    model = keras.Model(ids, ZLoss(1.0)(dense(h)))
    tokens = np.array([[1, 2, 3]])
    model(tokens)
    unpadded = float(model.losses[0])
    model(np.pad(tokens, ((0, 0), (0, 6))))
    padded = float(model.losses[0])
    logits = np.asarray(dense(model.layers[1](tokens)))
    np.testing.assert_allclose(unpadded, _reference(logits, 1.0), rtol=1e-5)
    np.testing.assert_allclose(padded, unpadded, rtol=1e-5)
    mask = np.array([[True, False, True]])
    np.testing.assert_allclose(
        float(z_loss(logits, 1.0, mask=mask)),
        _reference(logits[:, [0, 2]], 1.0),
        rtol=1e-5,
    )


@pytest.mark.parametrize("axis", [3, -3])
def test_axis_outside_the_logits_is_a_value_error_naming_it(axis):
    # Was TensorFlow's "Invalid reduction dimension" from inside the loss.
    logits = np.zeros((2, 5), "float32")
    with pytest.raises(ValueError, match="argument `axis`.*rank 2"):
        z_loss(logits, axis=axis)
    model = keras.Sequential([keras.Input((5,)), ZLoss(axis=axis)])
    with pytest.raises(ValueError, match="argument `axis`.*rank 2"):
        model(logits)
