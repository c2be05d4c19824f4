import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_stability.layers import EmbeddingGradientShrink
from tests.helpers import run_layer_test


def test_layer(tmp_path):
    run_layer_test(
        EmbeddingGradientShrink,
        {"alpha": 0.1},
        input_shape=(4, 3, 8),
        expected_output_shape=(4, 3, 8),
        expected_num_trainable_weights=0,
        expected_num_non_trainable_weights=0,
        run_training=False,  # no weights of its own; training is tested below
        fresh_process=True,
        tmp_dir=tmp_path,
    )


def _embedding_grads(alpha, ids, upstream):
    keras.utils.set_random_seed(0)
    embedding = keras.layers.Embedding(20, 8)
    embedding.build((None, None))
    layers = (
        [embedding] if alpha is None else [embedding, EmbeddingGradientShrink(alpha)]
    )
    with tf.GradientTape() as tape:
        h = ids
        for layer in layers:
            h = layer(h)
        loss = tf.reduce_sum(h * upstream)
    grad = tape.gradient(loss, embedding.embeddings.value)
    return np.asarray(h), np.asarray(tf.convert_to_tensor(grad))


@pytest.mark.parametrize("alpha", [0.1, 0.37, 1.0, 0.0])
def test_forward_unchanged_and_gradient_scaled_exactly(alpha):
    rng = np.random.default_rng(0)
    # Distinct ids: each embedding row receives one upstream vector, so the
    # row gradient is not a sum whose rounding depends on the order of terms.
    ids = rng.permutation(20).reshape(4, 5).astype("int32")
    upstream = rng.normal(size=(4, 5, 8)).astype("float32")
    out_plain, grad_plain = _embedding_grads(None, ids, upstream)
    out_shrunk, grad_shrunk = _embedding_grads(alpha, ids, upstream)
    np.testing.assert_array_equal(out_shrunk, out_plain)
    np.testing.assert_array_equal(grad_shrunk, np.float32(alpha) * grad_plain)
    assert np.abs(grad_plain).sum() > 0


def test_gradient_scale_inside_fit():
    # One SGD step moves the embedding alpha times as far as without the layer.
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 10, size=(16, 4)).astype("int32")
    target = rng.normal(size=(16, 4, 6)).astype("float32")
    moves = {}
    for alpha in (None, 0.25):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4,), dtype="int32")
        embedding = keras.layers.Embedding(10, 6)
        h = embedding(inputs)
        if alpha is not None:
            h = EmbeddingGradientShrink(alpha)(h)
        model = keras.Model(inputs, h)
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
        before = embedding.embeddings.numpy().copy()
        model.fit(ids, target, epochs=1, batch_size=16, verbose=0)
        moves[alpha] = embedding.embeddings.numpy() - before
    np.testing.assert_allclose(moves[0.25], 0.25 * moves[None], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), "0.1", True])
def test_alpha_outside_unit_interval_is_rejected(alpha):
    with pytest.raises(ValueError) as info:
        EmbeddingGradientShrink(alpha)
    assert str(info.value) == (
        "Invalid value for argument `alpha`. Expected a number in [0, 1]. "
        f"Received: alpha={alpha!r}"
    )


def test_config_round_trip():
    layer = EmbeddingGradientShrink(alpha=0.2, name="shrink")
    config = layer.get_config()
    assert config["alpha"] == 0.2
    assert EmbeddingGradientShrink.from_config(config).get_config() == config
