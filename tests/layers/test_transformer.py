import warnings

import keras
import numpy as np
import pytest

from keras_stability.layers import QKNormMultiHeadAttention
from keras_stability.layers import StableTransformerBlock
from tests.helpers import run_layer_test


def _x(shape=(2, 6, 8), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def test_layer_pre_norm_qk_norm_layerscale(tmp_path):
    out = run_layer_test(
        StableTransformerBlock,
        {
            "num_heads": 2,
            "qk_norm": True,
            "layerscale_init": 1e-3,
            "intermediate_dim": 16,
        },
        input_shape=(2, 6, 8),
        expected_output_shape=(2, 6, 8),
        # 2 norms x 2 + attention (q, k, v, o) x 2 + q/k LayerNorm x 2
        # + MLP 2 x 2 + 2 LayerScale vectors.
        expected_num_trainable_weights=22,
        expected_num_non_trainable_weights=0,
        fresh_process=True,
        tmp_dir=tmp_path,
    )
    assert isinstance(out["layer"].attention, QKNormMultiHeadAttention)


def test_layer_post_norm_rms_plain_attention(tmp_path):
    out = run_layer_test(
        StableTransformerBlock,
        {"num_heads": 4, "norm": "post", "norm_type": "rms", "dropout": 0.1},
        input_shape=(2, 6, 8),
        expected_output_shape=(2, 6, 8),
        # 2 RMS scales + attention 8 + MLP 4.
        expected_num_trainable_weights=14,
        fresh_process=False,
        tmp_dir=tmp_path,
    )
    assert type(out["layer"].attention) is keras.layers.MultiHeadAttention
    assert out["layer"].mlp_in.units == 32


@pytest.mark.parametrize("qk_norm", [False, True])
def test_causal_mask_hides_the_future(qk_norm):
    keras.utils.set_random_seed(0)
    block = StableTransformerBlock(num_heads=2, qk_norm=qk_norm)
    x = _x()
    y = np.asarray(block(x))
    x2 = x.copy()
    x2[:, 3:] = _x(seed=1)[:, 3:]
    y2 = np.asarray(block(x2))
    np.testing.assert_allclose(y2[:, :3], y[:, :3], rtol=1e-5, atol=1e-5)
    assert not np.allclose(y2[:, 3:], y[:, 3:])


def test_non_causal_block_sees_the_future():
    keras.utils.set_random_seed(0)
    block = StableTransformerBlock(num_heads=2, causal=False)
    x = _x()
    x2 = x.copy()
    x2[:, 3:] = _x(seed=1)[:, 3:]
    assert not np.allclose(np.asarray(block(x2))[:, :3], np.asarray(block(x))[:, :3])


def _scale_query_key(block, factor):
    for dense in (block.attention._query_dense, block.attention._key_dense):
        for w in dense.weights:
            w.assign(w * factor)


def test_qk_norm_makes_attention_invariant_to_query_key_scale():
    keras.utils.set_random_seed(0)
    x = _x()
    normed = StableTransformerBlock(num_heads=2, qk_norm=True, norm_type="rms")
    plain = StableTransformerBlock(num_heads=2, qk_norm=False)
    y_normed, y_plain = np.asarray(normed(x)), np.asarray(plain(x))
    _scale_query_key(normed, 30.0)
    _scale_query_key(plain, 30.0)
    # Normalized queries and keys do not see the scale: same output.
    np.testing.assert_allclose(np.asarray(normed(x)), y_normed, rtol=1e-4, atol=1e-4)
    # Without QK-norm the logits grow 900x and the output changes.
    assert np.abs(np.asarray(plain(x)) - y_plain).max() > 1e-2


def test_layerscale_start_makes_block_near_identity():
    keras.utils.set_random_seed(0)
    x = _x()
    block = StableTransformerBlock(num_heads=2, layerscale_init=1e-6)
    y = np.asarray(block(x))
    assert np.abs(y - x).max() < 1e-4
    np.testing.assert_allclose(
        block.attention_scale.numpy(), np.full(8, 1e-6, "float32")
    )


@pytest.mark.slow
def test_block_trains_as_a_tiny_language_model():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    # Next token = (token + 1) mod 11: a learnable causal task.
    ids = rng.integers(0, 11, size=(64, 1)) + np.arange(9)[None, :]
    ids = ids % 11
    x, y = ids[:, :-1], ids[:, 1:]
    inputs = keras.Input((8,), dtype="int32")
    h = keras.layers.Embedding(11, 16)(inputs)
    h = StableTransformerBlock(num_heads=2, qk_norm=True, layerscale_init=0.1)(h)
    logits = keras.layers.Dense(11)(h)
    model = keras.Model(inputs, logits)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(x, y, epochs=15, batch_size=32, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"num_heads": 0},
            "Invalid value for argument `num_heads`. Expected a positive integer. Received: num_heads=0",
        ),
        (
            {"num_heads": 2, "norm": None},
            "Invalid value for argument `norm`. Expected one of 'pre', 'post'. Received: norm=None",
        ),
        (
            {"num_heads": 2, "dropout": 1.0},
            "Invalid value for argument `dropout`. Expected a number in [0, 1). Received: dropout=1.0",
        ),
        (
            {"num_heads": 2, "layerscale_init": 0.0},
            "Invalid value for argument `layerscale_init`. Expected a positive number. Received: layerscale_init=0.0",
        ),
        (
            {"num_heads": 2, "norm_type": "batch"},
            "Invalid value for argument `norm_type`. Expected one of 'layer', 'rms'. Received: norm_type='batch'",
        ),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError) as info:
        StableTransformerBlock(**kwargs)
    assert message in str(info.value)


def test_heads_must_divide_hidden_size():
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `num_heads`\. Expected a divisor of the hidden size 8, or pass `key_dim`\. Received: num_heads=3",
    ):
        StableTransformerBlock(num_heads=3)(_x())
    assert StableTransformerBlock(num_heads=3, key_dim=4)(_x()).shape == (2, 6, 8)


def test_qk_norm_attention_config_round_trip():
    layer = QKNormMultiHeadAttention(
        num_heads=2, key_dim=4, norm_type="layer", epsilon=1e-5
    )
    config = layer.get_config()
    revived = QKNormMultiHeadAttention.from_config(config)
    assert revived.get_config() == config
    assert revived.norm_type == "layer" and revived.epsilon == 1e-5


def test_qk_norm_attention_reads_configs_saved_with_norm_epsilon():
    config = QKNormMultiHeadAttention(num_heads=2, key_dim=4).get_config()
    config["norm_epsilon"] = config.pop("epsilon")
    config["norm_epsilon"] = 1e-3
    assert QKNormMultiHeadAttention.from_config(config).epsilon == 1e-3


@pytest.mark.parametrize("argument", ["qk_norm", "causal"])
def test_booleans_are_not_coerced(argument):
    with pytest.raises(ValueError) as info:
        StableTransformerBlock(num_heads=2, **{argument: "False"})
    assert str(info.value) == (
        f"Invalid value for argument `{argument}`. Expected a bool (True or False). "
        f"Received: {argument}='False'"
    )


@pytest.mark.parametrize(
    "global_policy, policy",
    [("mixed_float16", "float32"), ("float32", "mixed_bfloat16")],
)
@pytest.mark.parametrize("qk_norm", [False, True])
def test_dtype_argument_other_than_the_global_policy(global_policy, policy, qk_norm):
    # `dtype=` on the block reaches its normalizations too: with the global
    # policy there, a float32 block under mixed_float16 added float16 norms'
    # output to float32 and crashed.
    x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype("float32")
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(global_policy)
    try:
        block = StableTransformerBlock(2, qk_norm=qk_norm, dtype=policy)
        y = block(x)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    compute = keras.dtype_policies.get(policy).compute_dtype
    assert keras.backend.standardize_dtype(y.dtype) == compute
    norms = [block.attention_norm, block.mlp_norm]
    if qk_norm:
        norms += [block.attention._query_norm, block.attention._key_norm]
    assert [n.dtype_policy.name for n in norms] == [policy] * len(norms)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_mask_passes_through_to_pooling(causal):
    # Embedding(mask_zero=True) -> block -> GlobalAveragePooling1D: the
    # attention already honours the mask; the block must hand it on too, or
    # the pooling averages padded positions (and Keras warns the mask is lost).
    keras.utils.set_random_seed(0)
    ids = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(20, 8, mask_zero=True)(ids)
    h = StableTransformerBlock(2, causal=causal)(h)
    model = keras.Model(ids, keras.layers.GlobalAveragePooling1D()(h))
    short = model(np.array([[1, 2, 3, 0]]))
    long = model(np.array([[1, 2, 3, 0, 0, 0, 0]]))
    np.testing.assert_allclose(np.asarray(short), np.asarray(long), atol=1e-6)


@pytest.mark.parametrize("norm_type", ["layer", "rms"])
@pytest.mark.parametrize("causal", [False, True])
def test_left_padding_never_reaches_the_real_tokens(norm_type, causal):
    # Left-padded batches: without a position embedding the outputs at the
    # real tokens cannot depend on how many pads precede them if the pads
    # are masked keys. Before, `norm_type="rms"` lost the mask in its
    # pre-norm (Keras' RMSNormalization drops it) and differed by 0.5.
    keras.utils.set_random_seed(0)
    ids = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(50, 16, mask_zero=True)(ids)
    h = StableTransformerBlock(2, norm_type=norm_type, causal=causal)(h)
    model = keras.Model(ids, h)
    real = [7, 3, 41, 12, 9, 30]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "will destroy the mask" warning
        four = np.asarray(model(np.array([[0] * 4 + real])))[0, 4:]
        two = np.asarray(model(np.array([[0] * 2 + real])))[0, 2:]
    np.testing.assert_allclose(four, two, atol=1e-5)
    # The pads do change the outputs when the mask is not given.
    unmasked = keras.Model(
        ids,
        StableTransformerBlock(2, norm_type=norm_type, causal=causal)(
            keras.layers.Embedding(50, 16)(ids)
        ),
    )
    four = np.asarray(unmasked(np.array([[0] * 4 + real])))[0, 4:]
    two = np.asarray(unmasked(np.array([[0] * 2 + real])))[0, 2:]
    assert np.abs(four - two).max() > 1e-3
