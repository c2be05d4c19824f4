"""`sparse_storage` of a keras-hub `CausalLM`: a file that loads, and loads again.

A `CausalLM` calls its backbone, then the backbone's `token_embedding` again
(reversed) as its LM head. That layer has two owners, which `load_model`
rebuilt as two layers, one without weights, until the copy inlined the
backbone's graph.
"""

import os

import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import keras  # noqa: E402

from keras_stability import pruning  # noqa: E402
from keras_stability._keras_internals import flatten_layers  # noqa: E402
from tests.helpers import run_in_subprocess  # noqa: E402
from tests.hub_models import tiny_gemma  # noqa: E402
from tests.hub_models import tiny_gpt2  # noqa: E402
from tests.hub_models import tiny_llama  # noqa: E402
from tests.pruning.test_sparse_storage import _assert_same_weights  # noqa: E402
from tests.pruning.test_sparse_storage import _nested_keys  # noqa: E402
from tests.pruning.test_sparse_storage import _sparse_storage_quietly  # noqa: E402
from tests.pruning.test_sparse_storage import _zero_kernels  # noqa: E402

VOCAB = 64
LENGTH = 16

# family: (tiny CausalLM, prefix of its blocks, kernels in its blocks)
FAMILIES = {
    # Per block: query, key, value, attention output, FFN in and out.
    "gpt2": (lambda: tiny_gpt2(VOCAB), "transformer_layer_", 12),
    # Per block: query, key, value, attention output, gate, up, down.
    "gemma": (lambda: tiny_gemma(VOCAB), "decoder_block_", 14),
}


def _inputs():
    rng = np.random.default_rng(0)
    return {
        "token_ids": rng.integers(1, VOCAB, (2, LENGTH)).astype("int32"),
        "padding_mask": np.ones((2, LENGTH), "int32"),
    }


def _pruned(family, int8):
    """The tiny CausalLM of `family`, its blocks' kernels 80% zeros, maybe int8."""
    build, prefix, kernels = FAMILIES[family]
    model = build()
    assert _zero_kernels(model, prefix=prefix) == kernels
    if int8:
        pruning.quantize(model)
    return model


def _token_embeddings(model):
    return [
        layer
        for layer in flatten_layers(model, include_self=False)
        if layer.name == "token_embedding"
    ]


@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_causal_lm_copy_reloads_exactly_saves_again_and_is_smaller(
    tmp_path, family, int8
):
    model = _pruned(family, int8)
    x = _inputs()
    pred = model.predict(x, verbose=0)
    dense = os.path.join(tmp_path, "dense.keras")
    model.save(dense)

    copy, _ = _sparse_storage_quietly(model)
    np.testing.assert_array_equal(copy.predict(x, verbose=0), pred)
    path = os.path.join(tmp_path, "sparse.keras")
    copy.save(path)
    bitmaps = [f for f, keys in _nested_keys(path).items() if "0_bitmap" in keys]
    assert len(bitmaps) == FAMILIES[family][2]

    loaded = keras.saving.load_model(path)
    # One tied embedding (input and LM head), with its weights.
    assert len(_token_embeddings(loaded)) == 1
    _assert_same_weights(model, loaded)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), pred)
    assert os.path.getsize(path) < os.path.getsize(dense)

    again = os.path.join(tmp_path, "again.keras")
    loaded.save(again)
    assert len(_nested_keys(again)) == len(_nested_keys(path))
    reloaded = keras.saving.load_model(again)
    _assert_same_weights(model, reloaded)
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), pred)


def load_and_predict(path, x):
    """In a fresh process that imports keras_stability: weights and predictions."""
    import keras

    import keras_stability  # noqa: F401  (registers the layers)

    model = keras.saving.load_model(path)
    return model.get_weights(), np.asarray(model.predict(x, verbose=0))


def test_int8_gpt2_causal_lm_copy_loads_in_a_fresh_process(tmp_path):
    model = _pruned("gpt2", int8=True)
    path = os.path.join(tmp_path, "gpt2.keras")
    _sparse_storage_quietly(model)[0].save(path)
    x = _inputs()
    weights, pred = run_in_subprocess(load_and_predict, path, x, n_cpu_devices=1)
    for old, new in zip(model.get_weights(), weights, strict=True):
        assert old.dtype == new.dtype
        np.testing.assert_array_equal(new, old)
    np.testing.assert_array_equal(pred, model.predict(x, verbose=0))


def test_layer_shared_with_a_nested_functional_model_is_stored_once(tmp_path):
    # The CausalLM pattern in plain Keras: `shared` inside `inner`, then
    # called again by the outer graph. Keras' own `.keras` file of `outer`
    # does not load either.
    keras.utils.set_random_seed(0)
    shared = keras.layers.Dense(8, name="shared")
    x_in = keras.Input((8,), name="x")
    inner = keras.Model(x_in, keras.layers.Dense(8, name="hidden")(shared(x_in)))
    y_in = keras.Input((8,), name="y")
    outer = keras.Model(y_in, shared(inner(y_in)), name="outer")
    kernel = shared.kernel.numpy()
    kernel[np.random.default_rng(0).random(kernel.shape) < 0.8] = 0.0
    shared.kernel.assign(kernel)
    x = np.random.default_rng(1).normal(size=(4, 8)).astype("float32")

    copy = pruning.sparse_storage(outer)
    assert [layer.name for layer in copy.layers] == ["y", "shared", "hidden"]
    path = os.path.join(tmp_path, "outer.keras")
    copy.save(path)
    assert sum("0_bitmap" in keys for keys in _nested_keys(path).values()) == 1
    loaded = keras.saving.load_model(path)
    assert type(loaded.get_layer("shared")).__name__ == "SparseStorageDense"
    _assert_same_weights(outer, loaded)
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), outer.predict(x, verbose=0)
    )


def test_layer_shared_with_a_nested_sequential_is_refused(tmp_path):
    shared = keras.layers.Dense(4, name="shared")
    inner = keras.Sequential([keras.Input((4,)), shared], name="inner")
    inputs = keras.Input((4,))
    outer = keras.Model(inputs, shared(inner(inputs)), name="outer")
    with pytest.raises(
        ValueError,
        match=(
            r"argument `model`\. .* layer `shared` belongs to `outer` and "
            r"`inner`, so a saved copy would load it twice, once without "
            r"weights\. Received: model=<Functional name=outer"
        ),
    ):
        pruning.sparse_storage(outer)


@pytest.mark.parametrize(
    "case, message",
    [
        ("same_name", r'The name "hidden" is used 2 times in the model'),
        ("training", r"called with arguments other than its inputs .*'training'"),
    ],
    ids=["same_name", "training"],
)
def test_nested_model_that_cannot_be_inlined_is_refused(case, message):
    shared = keras.layers.Dense(4, name="shared")
    x_in = keras.Input((4,), name="x")
    inner = keras.Model(
        x_in, keras.layers.Dense(4, name="hidden")(shared(x_in)), name="inner"
    )
    y_in = keras.Input((4,), name="y")
    if case == "same_name":  # Another `hidden` in the outer graph.
        outputs = keras.layers.Dense(4, name="hidden")(shared(inner(y_in)))
    else:
        outputs = shared(inner(y_in, training=True))
    outer = keras.Model(y_in, outputs, name="outer")
    with pytest.raises(
        ValueError,
        match=(
            r"argument `model`\. .* nested models that share layers with the "
            rf"graph around them can be inlined into it \(.*{message}.*"
            r"Received: model=<Functional name=outer"
        ),
    ):
        pruning.sparse_storage(outer)


def test_llama_is_refused_at_call_time_while_its_blocks_cannot_be_configured(
    tmp_path,
):
    model = tiny_llama()
    block = model.backbone.get_layer("transformer_layer_0")
    try:
        block.__class__.from_config(block.get_config())
    except Exception:  # keras-hub 0.32: `get_config` reads a missing attribute.
        configurable = False
    else:
        configurable = True
    if not configurable:
        for what in (model, model.backbone):
            with pytest.raises(
                ValueError,
                match=(
                    r"layer `transformer_layer_0` \(LlamaTransformerDecoder\) "
                    r"cannot be \(.*\), so a saved copy could not be loaded\. "
                    rf"Received: model=<{type(what).__name__} name="
                ),
            ):
                pruning.sparse_storage(what)
        return
    # A keras-hub whose Llama blocks serialize: the copy must round-trip.
    x = _inputs()
    pred = model.predict(x, verbose=0)
    path = os.path.join(tmp_path, "llama.keras")
    _sparse_storage_quietly(model)[0].save(path)
    loaded = keras.saving.load_model(path)
    _assert_same_weights(model, loaded)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), pred)
