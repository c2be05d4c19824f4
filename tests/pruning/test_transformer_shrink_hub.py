"""`shrink_transformer` on keras-hub GPT-2, Gemma and Llama (tiny configs from scratch)."""

import keras
import numpy as np
import pytest

from keras_stability.pruning import shrink_transformer
from keras_stability.pruning import shrink_transformer_plan
from tests.hub_models import tiny_gemma
from tests.hub_models import tiny_gpt2
from tests.hub_models import tiny_llama

keras_hub = pytest.importorskip("keras_hub")  # the `hub` extra; `make test` installs it

VOCAB, SEQ = 64, 8


def _inputs(n=16, seed=1):
    rng = np.random.default_rng(seed)
    mask = np.ones((n, SEQ), "int32")
    mask[: n // 2, -2:] = 0  # some padding
    return {
        "token_ids": rng.integers(0, VOCAB, (n, SEQ)).astype("int32"),
        "padding_mask": mask,
    }


def _gpt2(num_layers=2, seed=0):
    return tiny_gpt2(
        VOCAB, num_layers=num_layers, num_heads=4, sequence_length=16, seed=seed
    )


def _gemma(num_layers=2, seed=0):
    model = tiny_gemma(VOCAB, num_layers=num_layers, seed=seed)
    # Random RMS-norm scales, so that rescaling them is visible.
    rng = np.random.default_rng(seed)
    for w in model.weights:
        if w.path.endswith("norm/scale") or w.path.endswith("normalization/scale"):
            w.assign(rng.normal(0, 0.3, w.shape))
    return model


def _edit(model, path, fn):
    (v,) = [w for w in model.weights if w.path == path]
    value = np.array(v.numpy())
    fn(value)
    v.assign(value)


def _zero(index):
    return lambda w: w.__setitem__(index, 0)


def _predict(model, x):
    return np.asarray(model(x, training=False))


def _same_logits(a, b, x):
    np.testing.assert_allclose(_predict(a, x), _predict(b, x), atol=1e-5)


# -- GPT-2 ------------------------------------------------------------------------


@pytest.mark.parametrize("with_data", [False, True], ids=["magnitude", "activation"])
def test_gpt2_zeroed_ffn_units_and_block_removed_exactly(with_data):
    model = _gpt2(num_layers=3)
    layer = "transformer_layer_{}/feedforward_{}"
    for k, units in ((0, [2, 60]), (1, [0, 33]), (2, [7, 8])):
        for u in units:
            _edit(
                model,
                layer.format(k, "intermediate_dense/kernel"),
                _zero((slice(None), u)),
            )
            _edit(model, layer.format(k, "intermediate_dense/bias"), _zero(u))
            _edit(model, layer.format(k, "output_dense/kernel"), _zero(u))
    for path in (
        "self_attention/attention_output/kernel",
        "self_attention/attention_output/bias",
        "feedforward_output_dense/kernel",
        "feedforward_output_dense/bias",
    ):
        _edit(model, f"transformer_layer_1/{path}", lambda w: w.fill(0))
    x = _inputs()
    data = x if with_data else None
    plan = shrink_transformer_plan(model, intermediate_dim=62, num_layers=2, data=data)
    assert list(plan["blocks"]["keep"]) == [0, 2]
    removed = np.setdiff1d(
        np.arange(64), plan["intermediate"]["transformer_layer_2"]["keep"]
    )
    assert list(removed) == [7, 8]
    small = shrink_transformer(model, intermediate_dim=62, num_layers=2, data=data)
    assert isinstance(small, keras_hub.models.GPT2CausalLM)
    assert (small.backbone.num_layers, small.backbone.intermediate_dim) == (2, 62)
    _same_logits(small, model, x)


def test_gpt2_heads_shrink_with_the_hidden_size():
    model = _gpt2()
    with pytest.raises(ValueError) as info:
        shrink_transformer(model, num_heads=2)
    assert str(info.value).startswith(
        "Invalid value for argument `num_heads`. Expected num_heads * head_dim == "
        "hidden_dim: GPT2Backbone derives head_dim = hidden_dim // num_heads"
    )
    small = shrink_transformer(
        model, num_heads=2, hidden_dim=16, intermediate_dim=40, data=_inputs()
    )
    config = small.backbone.get_config()
    assert (config["num_heads"], config["hidden_dim"], config["intermediate_dim"]) == (
        2,
        16,
        40,
    )
    reference = keras_hub.models.GPT2Backbone.from_config(config)
    assert small.count_params() == reference.count_params() < model.count_params()
    assert _predict(small, _inputs()).shape == (16, SEQ, VOCAB)


# -- Gemma (grouped-query attention, gated FFN, RMS norms, tied embedding) ----


@pytest.mark.parametrize("with_data", [False, True], ids=["magnitude", "activation"])
def test_gemma_zeroed_kv_group_units_channels_removed_exactly(with_data):
    model = _gemma()
    attention = "decoder_block_{}/attention/{}/kernel"
    for k, group in ((0, 1), (1, 0)):
        heads = [2 * group, 2 * group + 1]  # query heads sharing key/value head `group`
        _edit(model, attention.format(k, "key"), _zero(group))
        _edit(model, attention.format(k, "value"), _zero(group))
        _edit(model, attention.format(k, "query"), _zero(heads))
        _edit(model, attention.format(k, "attention_output"), _zero(heads))
        for u in (3, 30):
            _edit(
                model, f"decoder_block_{k}/ffw_gating/kernel", _zero((slice(None), u))
            )
            _edit(
                model, f"decoder_block_{k}/ffw_gating_2/kernel", _zero((slice(None), u))
            )
            _edit(model, f"decoder_block_{k}/ffw_linear/kernel", _zero(u))
    channels = [6, 20]
    _edit(model, "token_embedding/embeddings", _zero((slice(None), channels)))
    for k in (0, 1):
        _edit(
            model, attention.format(k, "attention_output"), _zero((Ellipsis, channels))
        )
        _edit(
            model, f"decoder_block_{k}/ffw_linear/kernel", _zero((Ellipsis, channels))
        )
        if not with_data:  # also the rows that read them, for the weight norms
            for name in ("query", "key", "value"):
                _edit(model, attention.format(k, name), _zero((slice(None), channels)))
            for name in ("ffw_gating", "ffw_gating_2"):
                _edit(model, f"decoder_block_{k}/{name}/kernel", _zero(channels))
    x = _inputs()
    data = x if with_data else None
    kwargs = dict(num_heads=2, intermediate_dim=60, hidden_dim=30, data=data)
    plan = shrink_transformer_plan(model, **kwargs)
    assert list(plan["heads"]["decoder_block_0"]["keep"]) == [0]
    assert list(plan["heads"]["decoder_block_1"]["keep"]) == [1]
    assert list(
        np.setdiff1d(np.arange(32), plan["intermediate"]["decoder_block_0"]["keep"])
    ) == [3, 30]
    assert list(np.setdiff1d(np.arange(32), plan["hidden"]["keep"])) == channels
    small = shrink_transformer(model, **kwargs)
    config = small.backbone.get_config()
    assert (
        config["num_query_heads"],
        config["num_key_value_heads"],
        config["intermediate_dim"],
        config["hidden_dim"],
        config["head_dim"],
    ) == (2, 1, 60, 30, 8)
    _same_logits(small, model, x)


def test_gemma_block_removal_and_parameter_count():
    model = _gemma(num_layers=3)
    for name in ("attention/attention_output/kernel", "ffw_linear/kernel"):
        _edit(model, f"decoder_block_2/{name}", lambda w: w.fill(0))
    x = _inputs()
    small = shrink_transformer(model, num_layers=2, intermediate_dim=32, data=x)
    reference = keras_hub.models.GemmaBackbone.from_config(small.backbone.get_config())
    assert small.count_params() == reference.count_params()
    # Gemma: tied 64x32 embedding, per block 4 query + 2 key/value heads of
    # 8 on a 32 stream, a gated FFN of 32 // 2 = 16 units, 2 norm scales.
    per_block = (4 + 2 + 2) * 32 * 8 + 4 * 8 * 32 + 3 * 32 * 16 + 2 * 32
    assert small.count_params() == 64 * 32 + 2 * per_block + 32
    plan = shrink_transformer_plan(model, num_layers=2, data=x)
    assert list(plan["blocks"]["keep"]) == [0, 1]


def test_gemma_heads_are_removed_in_key_value_groups():
    with pytest.raises(ValueError) as info:
        shrink_transformer_plan(_gemma(), num_heads=3)
    assert "Invalid value for argument `num_heads`. Expected a multiple of 2" in str(
        info.value
    )


# -- Llama ------------------------------------------------------------------------


def test_llama_shrinks_heads_hidden_ffn_and_blocks():
    model = tiny_llama()
    x = _inputs()
    small = shrink_transformer(
        model, num_heads=2, hidden_dim=16, intermediate_dim=24, num_layers=1, data=x
    )
    config = small.backbone.get_config()
    assert (
        config["num_query_heads"],
        config["num_key_value_heads"],
        config["hidden_dim"],
        config["intermediate_dim"],
        config["num_layers"],
    ) == (2, 1, 16, 24, 1)
    reference = keras_hub.models.LlamaBackbone.from_config(config)
    assert small.count_params() == reference.count_params()
    assert np.all(np.isfinite(_predict(small, x)))


# -- save, reload, train ----------------------------------------------------------


def _load_and_predict(path, x):
    import keras
    import keras_hub  # noqa: F401  (registers keras-hub's classes)

    import keras_stability  # noqa: F401

    return np.asarray(keras.saving.load_model(path)(x, training=False))


@pytest.mark.parametrize("family", ["gpt2", "gemma"])
def test_keras_round_trip_in_a_fresh_process_and_short_fit(
    family, tmp_path, fresh_process
):
    model = _gpt2() if family == "gpt2" else _gemma()
    x = _inputs()
    sizes = {
        "gpt2": dict(num_heads=2, hidden_dim=16),
        "gemma": dict(num_heads=2, hidden_dim=24),
    }
    small = shrink_transformer(
        model, intermediate_dim=32, num_layers=1, data=x, **sizes[family]
    )
    path = str(tmp_path / "small.keras")
    small.save(path)
    np.testing.assert_allclose(
        fresh_process(_load_and_predict, path, x), _predict(small, x), atol=1e-5
    )
    small.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=False)
    y = np.roll(x["token_ids"], -1, axis=1)
    history = small.fit(
        x,
        y,
        sample_weight=x["padding_mask"],
        batch_size=8,
        epochs=2,
        shuffle=False,
        verbose=0,
    )
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_a_bare_backbone_shrinks_to_a_backbone():
    model = _gpt2().backbone
    x = _inputs()
    small = shrink_transformer(model, intermediate_dim=16, num_heads=2, hidden_dim=16)
    assert isinstance(small, keras_hub.models.GPT2Backbone)
    assert _predict(small, x).shape == (16, SEQ, 16)


@pytest.mark.parametrize("family", ["gpt2", "gemma"])
def test_generation_runs_on_the_shrunk_causal_lm(family):
    model = _gpt2() if family == "gpt2" else _gemma()
    sizes = {"gpt2": dict(num_heads=2, hidden_dim=16), "gemma": dict(num_heads=2)}
    small = shrink_transformer(model, num_layers=1, **sizes[family])
    prompt = {
        "token_ids": np.array([[5, 6, 7, 0, 0, 0, 0, 0]], "int32"),
        "padding_mask": np.array([[1, 1, 1, 0, 0, 0, 0, 0]], "int32"),
    }
    out = small.generate(prompt, max_length=SEQ, stop_token_ids=None)
    assert out["token_ids"].shape == (1, SEQ)
    np.testing.assert_array_equal(out["token_ids"][0, :3], [5, 6, 7])
    assert out["padding_mask"].all()
