"""`shrink_transformer` on our char LM (functional model of StableTransformerBlocks)."""

import keras
import numpy as np
import pytest

from keras_stability.layers import StableTransformerBlock
from keras_stability.models import TokenAndPositionEmbedding
from keras_stability.models import build_char_transformer
from keras_stability.pruning import shrink_transformer
from keras_stability.pruning import shrink_transformer_plan

VOCAB, SEQ, HIDDEN, HEADS, HEAD_DIM, FFN = 64, 8, 32, 4, 8, 64


def _char_lm(norm_type="layer", num_blocks=3, seed=0):
    """A tiny char LM; `norm_type="rms"` uses RMS norms everywhere."""
    keras.utils.set_random_seed(seed)
    ids = keras.Input(shape=(SEQ,), dtype="int32", name="ids")
    x = TokenAndPositionEmbedding(VOCAB, SEQ, HIDDEN, name="embedding")(ids)
    for i in range(num_blocks):
        x = StableTransformerBlock(
            num_heads=HEADS,
            intermediate_dim=FFN,
            norm_type=norm_type,
            qk_norm=True,
            layerscale_init=0.5,
            name=f"block_{i}",
        )(x)
    if norm_type == "rms":
        x = keras.layers.RMSNormalization(epsilon=1e-6, name="final_norm")(x)
    else:
        x = keras.layers.LayerNormalization(epsilon=1e-6, name="final_norm")(x)
    logits = keras.layers.Dense(VOCAB, name="logits")(x)
    model = keras.Model(ids, logits)
    # Residual stream of unit scale (as in a trained model), so that the
    # norms' epsilon (not rescaled with the hidden size) is negligible.
    for path in (
        "embedding/token_embedding/embeddings",
        "embedding/position_embedding/embeddings",
    ):
        _edit(model, path, lambda w: w.__imul__(20.0))
    return model


def _ids(n=32, seed=1):
    return np.random.default_rng(seed).integers(0, VOCAB, (n, SEQ)).astype("int32")


def _weight(model, path):
    (v,) = [w for w in model.weights if w.path == path]
    return v


def _edit(model, path, fn):
    v = _weight(model, path)
    value = np.array(v.numpy())
    fn(value)
    v.assign(value)


def _zero_head(model, block, head):
    for name in ("query", "key", "value"):
        _edit(
            model,
            f"{block}/attention/{name}/kernel",
            lambda w: w.__setitem__((slice(None), head), 0),
        )
        _edit(model, f"{block}/attention/{name}/bias", lambda w: w.__setitem__(head, 0))
    _edit(
        model,
        f"{block}/attention/attention_output/kernel",
        lambda w: w.__setitem__(head, 0),
    )


def _zero_unit(model, block, unit):
    _edit(
        model, f"{block}/mlp_in/kernel", lambda w: w.__setitem__((slice(None), unit), 0)
    )
    _edit(model, f"{block}/mlp_in/bias", lambda w: w.__setitem__(unit, 0))
    _edit(model, f"{block}/mlp_out/kernel", lambda w: w.__setitem__(unit, 0))


def _zero_block(model, block):
    for path in (
        f"{block}/attention/attention_output/kernel",
        f"{block}/attention/attention_output/bias",
        f"{block}/mlp_out/kernel",
        f"{block}/mlp_out/bias",
    ):
        _edit(model, path, lambda w: w.fill(0))


def _zero_channel(model, channel, readers=False):
    """Zeroes hidden channel `channel` in every weight that writes the stream.

    With `readers`, also the rows that read it (so every weight of the
    channel but the norm scales is zero, for magnitude ranking).
    """
    col = (Ellipsis, channel)
    writers = [
        "embedding/token_embedding/embeddings",
        "embedding/position_embedding/embeddings",
    ]
    for block in [
        b.name for b in model.layers if isinstance(b, StableTransformerBlock)
    ]:
        writers += [
            f"{block}/attention/attention_output/kernel",
            f"{block}/attention/attention_output/bias",
            f"{block}/mlp_out/kernel",
            f"{block}/mlp_out/bias",
        ]
        if readers:
            for name in ("query", "key", "value"):
                _edit(
                    model,
                    f"{block}/attention/{name}/kernel",
                    lambda w: w.__setitem__(channel, 0),
                )
            _edit(model, f"{block}/mlp_in/kernel", lambda w: w.__setitem__(channel, 0))
    if readers:
        _edit(model, "logits/kernel", lambda w: w.__setitem__(channel, 0))
    for path in writers:
        _edit(model, path, lambda w: w.__setitem__(col, 0))


def _predict(model, x):
    return np.asarray(model(x, training=False))


# -- exactness: removing parts that contribute nothing keeps the logits ---------


@pytest.mark.parametrize("with_data", [False, True], ids=["magnitude", "activation"])
def test_removing_zeroed_heads_keeps_logits(with_data):
    model = _char_lm()
    _zero_head(model, "block_0", 1)
    _zero_head(model, "block_1", 3)
    _zero_head(model, "block_2", 0)
    x = _ids()
    small = shrink_transformer(model, num_heads=3, data=x if with_data else None)
    plan = shrink_transformer_plan(model, num_heads=3, data=x if with_data else None)
    assert [
        list(plan["heads"][b]["keep"]) for b in ("block_0", "block_1", "block_2")
    ] == [
        [0, 2, 3],
        [0, 1, 2],
        [1, 2, 3],
    ]
    assert [
        b.num_heads for b in small.layers if isinstance(b, StableTransformerBlock)
    ] == [3] * 3
    np.testing.assert_allclose(_predict(small, x), _predict(model, x), atol=1e-5)


@pytest.mark.parametrize("with_data", [False, True], ids=["magnitude", "activation"])
def test_removing_zeroed_ffn_units_keeps_logits(with_data):
    model = _char_lm()
    dead = {"block_0": [3, 10, 40], "block_1": [0, 1, 63], "block_2": [7, 8, 9]}
    for block, units in dead.items():
        for u in units:
            _zero_unit(model, block, u)
    x = _ids()
    plan = shrink_transformer_plan(
        model, intermediate_dim=FFN - 3, data=x if with_data else None
    )
    for block, units in dead.items():
        removed = np.setdiff1d(np.arange(FFN), plan["intermediate"][block]["keep"])
        assert list(removed) == units
    small = shrink_transformer(
        model, intermediate_dim=FFN - 3, data=x if with_data else None
    )
    np.testing.assert_allclose(_predict(small, x), _predict(model, x), atol=1e-5)


@pytest.mark.parametrize(
    "data_kind", [None, "cosine", "loss"], ids=["magnitude", "cosine", "loss"]
)
def test_removing_a_zeroed_block_keeps_logits(data_kind):
    model = _char_lm()
    _zero_block(model, "block_1")
    x = _ids()
    kwargs = {}
    if data_kind == "cosine":
        kwargs = {"data": x}
    elif data_kind == "loss":
        # Labels the model predicts: skipping a block that does something
        # makes the loss worse, skipping the zeroed one changes nothing.
        y = _predict(model, x).argmax(-1)
        kwargs = {"data": (x, y), "block_importance": "loss"}
    plan = shrink_transformer_plan(model, num_layers=2, **kwargs)
    assert list(plan["blocks"]["keep"]) == [0, 2]
    assert np.argmin(plan["blocks"]["scores"]) == 1
    small = shrink_transformer(model, num_layers=2, **kwargs)
    assert [b.name for b in small.layers if isinstance(b, StableTransformerBlock)] == [
        "block_0",
        "block_2",
    ]
    np.testing.assert_allclose(_predict(small, x), _predict(model, x), atol=1e-5)


@pytest.mark.parametrize("with_data", [False, True], ids=["magnitude", "activation"])
def test_removing_zero_hidden_channels_keeps_logits_with_rms_norms(with_data):
    model = _char_lm(norm_type="rms")
    for c in (5, 17, 30):
        _zero_channel(model, c, readers=not with_data)
    x = _ids()
    plan = shrink_transformer_plan(
        model, hidden_dim=HIDDEN - 3, data=x if with_data else None
    )
    assert list(np.setdiff1d(np.arange(HIDDEN), plan["hidden"]["keep"])) == [5, 17, 30]
    small = shrink_transformer(
        model, hidden_dim=HIDDEN - 3, data=x if with_data else None
    )
    assert small.get_layer("embedding").hidden_dim == HIDDEN - 3
    np.testing.assert_allclose(_predict(small, x), _predict(model, x), atol=1e-5)


def test_everything_at_once_is_exact_on_zeroed_parts():
    model = _char_lm(norm_type="rms")
    _zero_block(model, "block_2")
    for block in ("block_0", "block_1", "block_2"):
        _zero_head(model, block, 2)
        _zero_unit(model, block, 11)
    _zero_channel(model, 4)
    x = _ids()
    small = shrink_transformer(
        model,
        num_heads=3,
        intermediate_dim=FFN - 1,
        hidden_dim=HIDDEN - 1,
        num_layers=2,
        data=x,
    )
    np.testing.assert_allclose(_predict(small, x), _predict(model, x), atol=1e-5)


# -- ranking --------------------------------------------------------------------


def test_calibration_removes_the_lowest_scores():
    model = _char_lm()
    x = _ids()
    plan = shrink_transformer_plan(
        model, num_heads=2, intermediate_dim=40, hidden_dim=20, num_layers=2, data=x
    )
    assert plan["importance"] == "activation"

    def removed(entry, n_removed):
        lowest = np.argsort(entry["scores"], kind="stable")[:n_removed]
        np.testing.assert_array_equal(
            np.setdiff1d(np.arange(len(entry["scores"])), entry["keep"]),
            np.sort(lowest),
        )

    for block in ("block_0", "block_1", "block_2"):
        removed(plan["heads"][block], 2)
        removed(plan["intermediate"][block], FFN - 40)
    removed(plan["hidden"], HIDDEN - 20)
    removed(plan["blocks"], 1)


def test_magnitude_and_activation_disagree_and_each_removes_its_own_choice():
    # Unit 5 of block_0's FFN has the largest weights but never fires (a large
    # negative bias); unit 9 has the smallest weights but is active. By
    # magnitude 9 goes; by activation 5 goes, and removing it changes
    # nothing, as the activation ranking promised.
    model = _char_lm(num_blocks=1)
    _edit(
        model,
        "block_0/mlp_in/kernel",
        lambda w: w.__setitem__((slice(None), 5), w[:, 5] * 3),
    )
    _edit(model, "block_0/mlp_out/kernel", lambda w: w.__setitem__(5, w[5] * 3))
    _edit(model, "block_0/mlp_in/bias", lambda w: w.__setitem__(5, -1e3))
    _edit(
        model,
        "block_0/mlp_in/kernel",
        lambda w: w.__setitem__((slice(None), 9), w[:, 9] * 0.1),
    )
    _edit(model, "block_0/mlp_out/kernel", lambda w: w.__setitem__(9, w[9] * 0.1))
    _edit(model, "block_0/mlp_in/bias", lambda w: w.__setitem__(9, 0.3))
    x = _ids()
    by_magnitude = shrink_transformer_plan(model, intermediate_dim=FFN - 1)
    by_activation = shrink_transformer_plan(model, intermediate_dim=FFN - 1, data=x)
    drop = lambda plan: list(  # noqa: E731
        np.setdiff1d(np.arange(FFN), plan["intermediate"]["block_0"]["keep"])
    )
    assert drop(by_magnitude) == [9]
    assert drop(by_activation) == [5]
    small = shrink_transformer(model, intermediate_dim=FFN - 1, data=x)
    np.testing.assert_allclose(_predict(small, x), _predict(model, x), atol=1e-5)


# -- the smaller model: sizes, save/load, training ----------------------------


def _count(num_heads, ffn, hidden, blocks):
    d = HEAD_DIM
    attention = (
        3 * (hidden * num_heads * d + num_heads * d) + num_heads * d * hidden + hidden
    )
    block = (
        attention
        + 4 * d
        + 4 * hidden
        + hidden * ffn
        + ffn
        + ffn * hidden
        + hidden
        + 2 * hidden
    )
    return (
        VOCAB * hidden
        + SEQ * hidden
        + blocks * block
        + 2 * hidden
        + hidden * VOCAB
        + VOCAB
    )


def test_parameter_count_is_that_of_the_smaller_config():
    model = _char_lm()
    assert model.count_params() == _count(HEADS, FFN, HIDDEN, 3)
    small = shrink_transformer(
        model, num_heads=2, intermediate_dim=24, hidden_dim=20, num_layers=2
    )
    assert small.count_params() == _count(2, 24, 20, 2)
    blocks = [b for b in small.layers if isinstance(b, StableTransformerBlock)]
    assert [(b.num_heads, b.key_dim, b.intermediate_dim) for b in blocks] == [
        (2, HEAD_DIM, 24)
    ] * 2
    assert _predict(small, _ids()).shape == (32, SEQ, VOCAB)


def test_shrunk_weights_are_the_kept_slices():
    model = _char_lm(num_blocks=2)
    x = _ids()
    plan = shrink_transformer_plan(
        model, num_heads=3, intermediate_dim=50, hidden_dim=28, data=x
    )
    small = shrink_transformer(
        model, num_heads=3, intermediate_dim=50, hidden_dim=28, data=x
    )
    h = plan["hidden"]["keep"]
    heads = plan["heads"]["block_1"]["keep"]
    units = plan["intermediate"]["block_1"]["keep"]
    q = _weight(model, "block_1/attention/query/kernel").numpy()
    np.testing.assert_array_equal(
        _weight(small, "block_1/attention/query/kernel").numpy(), q[h][:, heads]
    )
    w = _weight(model, "block_1/mlp_in/kernel").numpy()
    np.testing.assert_array_equal(
        _weight(small, "block_1/mlp_in/kernel").numpy(), w[h][:, units]
    )
    emb = _weight(model, "embedding/token_embedding/embeddings").numpy()
    np.testing.assert_array_equal(
        _weight(small, "embedding/token_embedding/embeddings").numpy(), emb[:, h]
    )
    # Norm scales over the hidden axis are rescaled by sqrt(hidden / new_hidden).
    gamma = _weight(model, "final_norm/gamma").numpy()
    np.testing.assert_allclose(
        _weight(small, "final_norm/gamma").numpy(),
        gamma[h] * np.sqrt(32 / 28),
        rtol=1e-6,
    )


def test_keep_blocks_keeps_exactly_those_blocks():
    model = _char_lm(num_blocks=3)
    plan = shrink_transformer_plan(model, keep_blocks=[2, 0], data=_ids())
    assert plan["sizes"]["num_layers"] == 2  # inferred from `keep_blocks`
    assert list(plan["blocks"]["keep"]) == [0, 2] and plan["blocks"]["scores"] is None
    small = shrink_transformer(model, num_layers=2, keep_blocks=[2, 0])
    blocks = [layer.name for layer in small.layers if "block" in layer.name]
    assert blocks == ["block_0", "block_2"]
    old = {w.path: w.numpy() for w in model.weights}
    new = {w.path: w.numpy() for w in small.weights}
    assert not [p for p in new if p.startswith("block_1/")]
    assert set(new) == {p for p in old if not p.startswith("block_1/")}
    for path, value in new.items():
        np.testing.assert_array_equal(value, old[path], err_msg=path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"keep_blocks": [0, 0]},
            "Invalid value for argument `keep_blocks`. Expected a list of distinct "
            "non-negative integer block indices. Received: keep_blocks=[0, 0]",
        ),
        ({"keep_blocks": [-1, 1]}, "Received: keep_blocks=[-1, 1]"),
        ({"keep_blocks": [0, 1.0]}, "Received: keep_blocks=[0, 1.0]"),
        ({"keep_blocks": [True]}, "Received: keep_blocks=[True]"),
        ({"keep_blocks": []}, "Received: keep_blocks=[]"),
        ({"keep_blocks": 2}, "Received: keep_blocks=2"),
        (
            {"keep_blocks": [0, 3]},
            "Invalid value for argument `keep_blocks`. Expected distinct block "
            "indices in [0, 2] (the model has 3 blocks). Received: keep_blocks=[0, 3]",
        ),
        (
            {"keep_blocks": [0, 2], "num_layers": 1},
            "Invalid value for argument `num_layers`. Expected `None` or the number "
            "of `keep_blocks` (2: [0, 2]). Received: num_layers=1",
        ),
    ],
)
def test_bad_keep_blocks_raise(kwargs, message):
    for fn in (shrink_transformer, shrink_transformer_plan):
        with pytest.raises(ValueError) as info:
            fn(_char_lm(), **kwargs)
        assert message in str(info.value)


def _load_and_predict(path, x):
    import keras

    import keras_stability  # noqa: F401  (registers the library's classes)

    return np.asarray(keras.saving.load_model(path).predict(x, verbose=0))


def test_keras_round_trip_in_a_fresh_process(tmp_path, fresh_process):
    model = build_char_transformer(
        VOCAB, SEQ, num_blocks=2, hidden_dim=HIDDEN, num_heads=HEADS
    )
    x = _ids()
    small = shrink_transformer(
        model, num_heads=2, intermediate_dim=64, hidden_dim=24, num_layers=1, data=x
    )
    path = str(tmp_path / "small.keras")
    small.save(path)
    np.testing.assert_allclose(
        fresh_process(_load_and_predict, path, x), _predict(small, x), atol=1e-6
    )


def test_short_fit_of_the_shrunk_model():
    model = build_char_transformer(
        VOCAB, SEQ, num_blocks=2, hidden_dim=HIDDEN, num_heads=HEADS
    )
    x = _ids(64)
    y = np.roll(x, -1, axis=1)
    small = shrink_transformer(
        model, num_heads=2, intermediate_dim=64, hidden_dim=24, data=x
    )
    small.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    before = [w.numpy().copy() for w in small.trainable_weights]
    history = small.fit(x, y, batch_size=16, epochs=2, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert any(
        not np.array_equal(b, w.numpy())
        for b, w in zip(before, small.trainable_weights, strict=False)
    )


def test_original_model_is_unchanged():
    model = _char_lm(num_blocks=2)
    before = [w.numpy().copy() for w in model.weights]
    shrink_transformer(model, num_heads=2, hidden_dim=16, num_layers=1, data=_ids())
    for b, w in zip(before, model.weights, strict=False):
        np.testing.assert_array_equal(b, w.numpy())


# -- arguments ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"num_heads": 0},
            "Invalid value for argument `num_heads`. Expected a positive integer or None. Received: num_heads=0",
        ),
        (
            {"num_heads": 5},
            "Invalid value for argument `num_heads`. Expected an integer in [1, 4] (at most the model's 4). Received: num_heads=5",
        ),
        ({"num_heads": 2.0}, "Received: num_heads=2.0"),
        ({"num_heads": True}, "Received: num_heads=True"),
        (
            {"intermediate_dim": 65},
            "Invalid value for argument `intermediate_dim`. Expected an integer in [1, 64]",
        ),
        ({"hidden_dim": "16"}, "Invalid value for argument `hidden_dim`"),
        (
            {"num_layers": 4},
            "Invalid value for argument `num_layers`. Expected an integer in [1, 3]",
        ),
        (
            {"block_importance": "l2"},
            "Invalid value for argument `block_importance`. Expected one of 'cosine', 'loss'. Received: block_importance='l2'",
        ),
        (
            {"batch_size": 0},
            "Invalid value for argument `batch_size`. Expected a positive integer. Received: batch_size=0",
        ),
        (
            {"data": np.zeros((4,), "int32")},
            "Invalid value for argument `data`. Expected inputs of shape (batch, "
            "sequence) (an array or a dict of arrays). Received: data='arrays of "
            "shapes [(4,)]'",
        ),
        (
            {"data": {"tokens": np.zeros((4, 8), "int32")}},
            "Invalid value for argument `data`. Expected inputs the model accepts",
        ),
        (
            {"data": (np.zeros((4, 8), "int32"), np.zeros((3, 8), "int32"))},
            "Invalid value for argument `data`",
        ),
        (
            {
                "num_layers": 2,
                "data": np.zeros((4, 8), "int32"),
                "block_importance": "loss",
            },
            "Invalid value for argument `data`. Expected (x, y) or (x, y, sample_weight) for block_importance='loss'",
        ),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError) as info:
        shrink_transformer(_char_lm(), **kwargs)
    assert message in str(info.value)


def test_unsupported_model_raises():
    mlp = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="Invalid value for argument `model`"):
        shrink_transformer_plan(mlp, num_heads=1)


def test_an_opaque_op_on_the_hidden_axis_is_named_and_other_sizes_still_shrink():
    # A layer the analysis cannot see through (here a flip of the channels)
    # between two blocks: the hidden size cannot shrink, heads still can.
    keras.utils.set_random_seed(0)
    ids = keras.Input(shape=(SEQ,), dtype="int32")
    x = TokenAndPositionEmbedding(VOCAB, SEQ, HIDDEN, name="embedding")(ids)
    x = StableTransformerBlock(num_heads=HEADS, name="block_0")(x)
    x = keras.layers.Lambda(lambda t: keras.ops.flip(t, axis=-1), name="flip")(x)
    x = StableTransformerBlock(num_heads=HEADS, name="block_1")(x)
    model = keras.Model(ids, keras.layers.Dense(VOCAB, name="logits")(x))
    with pytest.raises(ValueError) as info:
        shrink_transformer(model, hidden_dim=16)
    message = str(info.value)
    assert message.startswith(
        "Invalid value for argument `hidden_dim`. Expected the current size (32): "
        "the hidden size cannot shrink because op "
    )
    assert "ReverseV2 has no coupling rule (in layer " in message and "/flip" in message
    small = shrink_transformer(model, num_heads=2, data=_ids())
    assert small.get_layer("block_1").num_heads == 2
