"""Prune, then quantize: strip_pruning + Keras int8 keeps the zeros and reloads."""

import os

import keras
import numpy as np
import pytest

from keras_stability import pruning
from keras_stability._keras_internals import one_garbage_collection
from keras_stability.models.char_lm import build_char_transformer
from tests.helpers import run_in_subprocess


def _mlp():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16,))
    h = keras.layers.Dense(64, activation="relu")(inputs)
    h = keras.layers.Dense(64, activation="relu")(h)
    return keras.Model(inputs, keras.layers.Dense(4)(h))


def _char_lm():
    keras.utils.set_random_seed(0)
    return build_char_transformer(
        24, 16, num_blocks=2, hidden_dim=32, num_heads=4, name="lm"
    )


def _data(model, n=32, seed=0):
    rng = np.random.default_rng(seed)
    if model.input.dtype == "float32":
        x = rng.normal(size=(n, *model.input_shape[1:])).astype("float32")
        y = rng.normal(size=(n, *model.output_shape[1:])).astype("float32")
        return x, y, "mse"
    vocab, seq = model.output_shape[-1], model.input_shape[1]
    x = rng.integers(0, vocab, (n, seq)).astype("int32")
    y = rng.integers(0, vocab, (n, seq)).astype("int32")
    return x, y, keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _pruned(build, sparsity=0.8):
    model = build()
    x, y, loss = _data(model)
    pruning.prune_low_magnitude(
        model, pruning.ConstantSparsity(sparsity, begin_step=0, frequency=1)
    )
    model.compile(keras.optimizers.Adam(1e-3), loss)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    return pruning.strip_pruning(model), x


def _kernels(model):
    """{path: value} of every quantizable kernel (Dense, EinsumDense, Embedding)."""
    out = {}
    for layer in model._flatten_layers():
        for name in ("_kernel", "_embeddings"):
            variable = getattr(layer, name, None)
            if variable is not None and not layer._flatten_layers(include_self=False):
                out[variable.path] = np.asarray(variable)
    return out


def load_and_inspect(path, x):
    """In a fresh process: predictions and the int8 kernels of a `.keras` file."""
    import keras

    import keras_stability  # noqa: F401

    model = keras.saving.load_model(path)
    kernels = {k: v for k, v in _kernels(model).items() if str(v.dtype) == "int8"}
    return np.asarray(model.predict(x, verbose=0)), kernels


@pytest.mark.parametrize("build", [_mlp, _char_lm], ids=["mlp", "char_lm"])
def test_zeros_stay_zeros_and_the_keras_file_reloads(build, tmp_path):
    model, x = _pruned(build)
    before = _kernels(model)
    float_pred = model.predict(x, verbose=0)
    assert all(abs((v == 0).mean() - 0.8) < 0.01 for v in before.values())

    assert pruning.quantize(model) is model
    after = _kernels(model)
    assert set(after) == set(before)
    for path, value in after.items():
        assert str(value.dtype) == "int8", path
        # Symmetric abs-max: every pruned zero is an int8 zero, and the
        # largest magnitude of each output channel maps to +-127.
        assert np.all(value[before[path] == 0] == 0), path
        assert np.abs(value).max() == 127, path
    pred = model.predict(x, verbose=0)
    scale = np.abs(float_pred).max()
    assert np.abs(pred - float_pred).max() < 0.05 * scale

    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded_pred, loaded = run_in_subprocess(load_and_inspect, path, x, n_cpu_devices=1)
    np.testing.assert_allclose(loaded_pred, pred, rtol=1e-5, atol=1e-5)
    assert set(loaded) == set(after)
    for key, value in loaded.items():
        np.testing.assert_array_equal(value, after[key])


def test_keras_quantize_alone_does_not_reload_nested_sublayers(tmp_path):
    # Why `pruning.quantize` exists: Keras quantizes the Dense layers inside
    # our transformer blocks but its `.keras` file does not say so.
    model = _char_lm()
    # Keras' own call; only its garbage collections (one per kernel) deferred.
    with one_garbage_collection():
        model.quantize("int8")
    path = os.path.join(tmp_path, "plain.keras")
    model.save(path)
    with pytest.raises(ValueError, match="could not be loaded"):
        keras.saving.load_model(path)


def test_a_loaded_int8_transformer_saves_again_after_resolve_policy_maps(tmp_path):
    # bug_8: documented in `quantize`, but reachable only from the submodule
    # (`pruning.quantize` is the function): now a public name.
    assert "resolve_policy_maps" in pruning.__all__
    resolve_policy_maps = pruning.resolve_policy_maps
    model = pruning.quantize(_char_lm())
    x, _, _ = _data(model, n=4)
    first = os.path.join(tmp_path, "first.keras")
    second = os.path.join(tmp_path, "second.keras")
    model.save(first)
    loaded = keras.saving.load_model(first)
    # Keras reads the mode of the map's default (float32) when saving.
    with pytest.raises(ValueError, match="Invalid dtype: object"):
        loaded.save(second)
    assert resolve_policy_maps(loaded) is loaded
    loaded.save(second)
    again = keras.saving.load_model(second)
    np.testing.assert_array_equal(
        again.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    with pytest.raises(
        ValueError,
        match="Invalid value for argument `model`. Expected a built Keras model. "
        "Received: model='model'",
    ):
        resolve_policy_maps("model")


@pytest.mark.parametrize("build", [_mlp, _char_lm], ids=["mlp", "char_lm"])
def test_sparsity_report_counts_the_zeros_of_int8_and_frozen_kernels(build):
    # bug_6: after `quantize` the report was {'total': 0.0}: the int8 kernels
    # are not trainable, and only trainable weights were looked at.
    model, _ = _pruned(build)
    before = pruning.sparsity_report(model)
    assert before["total"] == pytest.approx(0.8, abs=0.01)
    assert len(before) == len(pruning.prunable_weights(model)) + 1
    model.trainable = False
    assert pruning.sparsity_report(model) == before
    pruning.quantize(model)
    after = pruning.sparsity_report(model)
    assert after == before
    stored = _kernels(model)
    for path, sparsity in after.items():
        if path != "total":
            assert str(stored[path].dtype) == "int8", path
            assert np.mean(stored[path] == 0) == sparsity, path


def test_sparsity_report_refuses_kernels_whose_zeros_it_cannot_see():
    model = _mlp()
    with one_garbage_collection():
        model.quantize("int4")
    with pytest.raises(ValueError) as info:
        pruning.sparsity_report(model)
    assert str(info.value).startswith(
        "Invalid value for argument `model`. Expected a model whose prunable "
        "layers are float or quantized to int8 or float8. Received: "
    )
    assert "quantized to 'int4'" in str(info.value)


def test_compressed_size_of_dense_sparse_and_int8():
    dense = _mlp()
    sparse, _ = _pruned(_mlp)
    sizes = {
        "dense": pruning.compressed_size(dense),
        "sparse": pruning.compressed_size(sparse),
    }
    sizes["sparse_int8"] = pruning.compressed_size(pruning.quantize(sparse))
    n_params = dense.count_params()
    # Dense float32 hardly compresses; zeros do; int8 stores one byte each.
    assert sizes["dense"] > 0.85 * 4 * n_params
    assert sizes["sparse"] < 0.5 * sizes["dense"]
    assert sizes["sparse_int8"] < 0.6 * sizes["sparse"]
    # Measured 20982 / 7546 / 3917 bytes (5.4x); h5 overhead weighs on 5.7k
    # parameters, larger models gain more (benchmarks/llm_compression.py).
    assert sizes["dense"] / sizes["sparse_int8"] > 5
    keras_file = pruning.compressed_size(sparse, file="keras")
    assert keras_file > sizes["sparse_int8"]  # plus the config
    # Adam's moments (twice the model, never sparse) are not counted, and a
    # compiled model keeps its optimizer.
    dense.compile(keras.optimizers.Adam(), "mse")
    dense.optimizer.build(dense.trainable_variables)
    assert len(dense.optimizer.variables) > 2 * len(dense.trainable_variables)
    assert pruning.compressed_size(dense) == sizes["dense"]
    assert dense.optimizer is not None


def test_quantize_names_the_bad_argument():
    with pytest.raises(ValueError, match="Received: mode='int4'"):
        pruning.quantize(_mlp(), mode="int4")
    with pytest.raises(ValueError, match="argument `model`"):
        pruning.compressed_size(keras.layers.Dense(2))
