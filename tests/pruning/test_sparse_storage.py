"""`sparse_storage`: kernels saved as bitmap + values, loaded back exactly."""

import os
import warnings
import zipfile

import h5py
import keras
import numpy as np
import pytest

from keras_stability import pruning
from keras_stability._keras_internals import flatten_layers
from keras_stability.models.char_lm import build_char_transformer
from keras_stability.pruning.sparse_storage import bitmap_decode
from keras_stability.pruning.sparse_storage import bitmap_encode
from tests.helpers import run_in_subprocess

SPARSE_CLASSES = {
    "SparseStorageEmbedding",
    "SparseStorageEinsumDense",
    "SparseStorageDense",
}


def _model():
    """Embedding -> EinsumDense -> Dense -> Dense, every kernel 80% zeros."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(40, 16, name="embed")(inputs)
    h = keras.layers.EinsumDense(
        "abc,cd->abd", (6, 32), bias_axes="d", activation="relu", name="einsum"
    )(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(64, activation="relu", name="hidden")(h)
    model = keras.Model(inputs, keras.layers.Dense(4, name="logits")(h))
    rng = np.random.default_rng(0)
    for layer in model.layers:
        weights = layer.get_weights()
        if weights:
            weights[0][rng.random(weights[0].shape) < 0.8] = 0.0
            layer.set_weights(weights)
    return model


def _inputs(n=8):
    return np.random.default_rng(1).integers(0, 40, (n, 6)).astype("int32")


def _stored_keys(path):
    """{layer folder: sorted variable keys} of the weights inside a `.keras` file."""
    with zipfile.ZipFile(path) as archive:
        with h5py.File(archive.open("model.weights.h5"), "r") as f:
            return {
                name: sorted(f[f"layers/{name}/vars"])
                for name in f["layers"]
                if len(f[f"layers/{name}"].get("vars", ()))
            }


def load_weights_and_predict(paths, x):
    """In a fresh process: class names, weights and predictions of `.keras` files."""
    import keras

    import keras_stability  # noqa: F401  (registers the layers)

    out = []
    for path in paths:
        model = keras.saving.load_model(path)
        out.append(
            (
                [type(layer).__name__ for layer in model.layers],
                model.get_weights(),
                np.asarray(model.predict(x, verbose=0)),
            )
        )
    return out


@pytest.mark.parametrize(
    "array",
    [
        np.array([[0, 3, 0], [-1, 0, 0]], "int8"),
        np.zeros((3, 5), "float32"),
        np.arange(1, 25, dtype="float32").reshape(2, 3, 4),
        np.array([0.0, -0.5, 0.0, 1e-30, 0.0, 0.0, 0.0, 0.0, 7.0], "float32"),
    ],
    ids=["int8", "all_zero", "no_zero_3d", "odd_length"],
)
def test_bitmap_encode_and_decode_round_trip(array):
    bitmap, values = bitmap_encode(array)
    assert bitmap.dtype == np.uint8 and bitmap.size == -(-array.size // 8)
    assert values.dtype == array.dtype and values.size == np.count_nonzero(array)
    decoded = bitmap_decode(bitmap, values, array.shape)
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


def test_bitmap_decode_rejects_a_count_mismatch():
    bitmap, values = bitmap_encode(np.array([0, 1, 2, 0], "int8"))
    with pytest.raises(ValueError, match="marks 2 non-zeros of a \\(4,\\) array"):
        bitmap_decode(bitmap, values[:1], (4,))


def test_keras_stores_the_kernel_under_key_0():
    # The layout replaces the entry "0"; pin that it is the kernel (or the
    # embeddings) in the float and int8 modes of all three layers.
    for quantize in (False, True):
        model = _model()
        if quantize:
            pruning.quantize(model)
        for layer in model.layers:
            if isinstance(layer, keras.layers.Embedding):
                kernel = layer.embeddings
            elif isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
                kernel = layer.kernel
            else:
                continue
            entries = {}
            layer.save_own_variables(entries)
            np.testing.assert_array_equal(np.asarray(entries["0"]), np.asarray(kernel))


@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
def test_keras_file_round_trip_is_exact(int8, tmp_path):
    model = _model()
    if int8:
        pruning.quantize(model)
    x = _inputs()
    pred = model.predict(x, verbose=0)

    copy = pruning.sparse_storage(model)
    assert copy is not model
    assert {type(layer).__name__ for layer in copy.layers} >= SPARSE_CLASSES
    # Same layers, names, dtype policies (int8 stays int8) and weights.
    for old, new in zip(model.layers[1:], copy.layers[1:], strict=True):
        assert old.name == new.name
        assert old.dtype_policy.name == new.dtype_policy.name
        assert old.quantization_mode == new.quantization_mode
    for old, new in zip(model.weights, copy.weights, strict=True):
        assert old.dtype == new.dtype
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    np.testing.assert_array_equal(copy.predict(x, verbose=0), pred)

    path = os.path.join(tmp_path, "model.keras")
    copy.save(path)
    stored = _stored_keys(path)
    extra = ["2"] if int8 else []  # the int8 scale
    assert (
        stored["sparse_storage_dense"]
        == ["0_bitmap", "0_shape", "0_values", "1"] + extra
    )
    assert stored["sparse_storage_embedding"] == ["0_bitmap", "0_shape", "0_values"] + (
        ["1"] if int8 else []
    )

    loaded = keras.saving.load_model(path)
    for old, new in zip(model.weights, loaded.weights, strict=True):
        assert old.dtype == new.dtype
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), pred)


def test_keras_file_loads_in_a_fresh_process(tmp_path):
    # A process that never saw the classes: `import keras_stability` is all
    # `load_model` needs, for float32 and int8 alike.
    x = _inputs()
    models, paths = [], []
    for int8 in (False, True):
        model = pruning.quantize(_model()) if int8 else _model()
        paths.append(os.path.join(tmp_path, f"model_{int8}.keras"))
        pruning.sparse_storage(model).save(paths[-1])
        models.append(model)
    loaded = run_in_subprocess(load_weights_and_predict, paths, x, n_cpu_devices=1)
    for model, (classes, weights, pred) in zip(models, loaded, strict=True):
        assert set(classes) >= SPARSE_CLASSES
        for old, new in zip(model.get_weights(), weights, strict=True):
            assert old.dtype == new.dtype
            np.testing.assert_array_equal(new, old)
        np.testing.assert_array_equal(pred, model.predict(x, verbose=0))


def test_weights_file_round_trip_and_a_reloaded_model_saves_again(tmp_path):
    model = pruning.quantize(_model())
    copy = pruning.sparse_storage(model)
    path = os.path.join(tmp_path, "model.weights.h5")
    copy.save_weights(path)
    other = pruning.sparse_storage(keras.models.clone_model(model))  # new weights
    assert not np.array_equal(other.layers[-1].kernel, model.layers[-1].kernel)
    other.load_weights(path)
    for old, new in zip(model.get_weights(), other.get_weights(), strict=True):
        np.testing.assert_array_equal(new, old)

    first = os.path.join(tmp_path, "first.keras")
    second = os.path.join(tmp_path, "second.keras")
    copy.save(first)
    keras.saving.load_model(first).save(second)
    loaded = keras.saving.load_model(second)
    for old, new in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(new, old)


def test_int8_sparse_layout_gzips_smaller():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    h = keras.layers.Dense(128, activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(64)(h))
    rng = np.random.default_rng(0)
    for layer in model.layers[1:]:
        kernel, bias = layer.get_weights()
        kernel[rng.random(kernel.shape) < 0.8] = 0.0
        layer.set_weights([kernel, bias])
    pruning.quantize(model)
    copy = pruning.sparse_storage(model)
    plain = pruning.compressed_size(model, file="keras")
    sparse = pruning.compressed_size(copy, file="keras")
    # Measured 8753 -> 7868 bytes (.keras), 7811 -> 6920 (.weights.h5): one
    # bit a weight plus the 20% values instead of one byte a weight.
    assert sparse < plain
    assert pruning.compressed_size(copy) < pruning.compressed_size(model)


def test_dense_kernels_stay_dense(tmp_path):
    model = _model()
    dense = model.get_layer("hidden")
    kernel, bias = dense.get_weights()
    dense.set_weights([np.where(kernel == 0, 0.5, kernel), bias])  # 0% zeros
    copy = pruning.sparse_storage(model)
    path = os.path.join(tmp_path, "model.keras")
    copy.save(path)
    stored = _stored_keys(path)
    # Functional models name their layer folders by class, in order.
    assert stored["sparse_storage_dense"] == ["0", "1"]
    assert stored["sparse_storage_dense_1"] == ["0_bitmap", "0_shape", "0_values", "1"]
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        loaded.get_layer("hidden").kernel.numpy(), dense.kernel.numpy()
    )

    # min_sparsity=0 stores every kernel as a bitmap; 1 only all-zero ones.
    pruning.sparse_storage(model, min_sparsity=0.0).save(path)
    assert _stored_keys(path)["sparse_storage_dense"][0] == "0_bitmap"
    pruning.sparse_storage(model, min_sparsity=1.0).save(path)
    assert all(keys[0] == "0" for keys in _stored_keys(path).values())


def _nested_keys(path):
    """{h5 folder: sorted variable keys} of every layer in a `.keras` file, at any depth."""
    found = {}

    def visit(name, obj):
        if name.endswith("/vars") and isinstance(obj, h5py.Group) and len(obj):
            found[name[: -len("/vars")]] = sorted(obj)

    with zipfile.ZipFile(path) as archive:
        with h5py.File(archive.open("model.weights.h5"), "r") as f:
            f.visititems(visit)
    return found


def _zero_kernels(model, prefix="", fraction=0.8, seed=0):
    """Zeros `fraction` of the kernel of each Dense/EinsumDense under `prefix`;
    returns how many kernels it pruned."""
    rng = np.random.default_rng(seed)
    pruned = 0
    for layer in flatten_layers(model, include_self=False):
        if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)) and (
            layer.path or ""
        ).startswith(prefix):
            kernel = layer.kernel.numpy()
            kernel[rng.random(kernel.shape) < fraction] = 0.0
            layer.kernel.assign(kernel)
            pruned += 1
    return pruned


def _sparse_storage_quietly(model, **kwargs):
    """`sparse_storage` and the messages of the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        copy = pruning.sparse_storage(model, **kwargs)
    return copy, [str(w.message) for w in caught]


def _assert_same_weights(expected, model):
    for old, new in zip(expected.weights, model.weights, strict=True):
        assert old.name == new.name and old.dtype == new.dtype
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))


def test_nested_sequential_is_converted(tmp_path):
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)], name="inner")
    inputs = keras.Input((4,))
    outer = keras.Model(inputs, keras.layers.Dense(2)(inner(inputs)))
    copy = pruning.sparse_storage(outer)
    assert type(copy).__name__ == "SparseStorageModel"
    assert type(copy.get_layer("inner").layers[0]).__name__ == "SparseStorageDense"
    sequential = pruning.sparse_storage(inner, min_sparsity=0.3)
    assert type(sequential).__name__ == "SparseStorageSequential"
    assert type(sequential.layers[0]).__name__ == "SparseStorageDense"
    path = os.path.join(tmp_path, "inner.keras")
    sequential.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded).__name__ == "SparseStorageSequential"
    assert loaded.min_sparsity == 0.3  # in the model's config
    _assert_same_weights(inner, loaded)


def test_block_linears_of_a_transformer_lm_are_stored_as_bitmaps(tmp_path):
    # The Dense/EinsumDense layers inside `StableTransformerBlock` (its
    # `MultiHeadAttention`'s query/key/value/output and its FFN) are rebuilt
    # by the block's own code on load, as plain Keras layers: the model
    # `sparse_storage` returns writes and reads them in the layout too.
    keras.utils.set_random_seed(0)
    lm = build_char_transformer(12, 8, num_blocks=1, hidden_dim=64, num_heads=2)
    assert _zero_kernels(lm, prefix="block_") == 6  # Q, K, V, O, FFN in, out
    pruning.quantize(lm)
    ids = np.random.default_rng(0).integers(0, 12, (4, 8)).astype("int32")
    pred = lm.predict(ids, verbose=0)

    copy, messages = _sparse_storage_quietly(lm)
    assert not [m for m in messages if "sparse_storage" in m]
    nested = [
        layer
        for layer in flatten_layers(copy, include_self=False)
        if (layer.path or "").startswith("block_")
        and isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))
    ]
    assert len(nested) == 6
    assert {type(layer).__name__ for layer in nested} == {
        "SparseStorageDense",
        "SparseStorageEinsumDense",
    }
    path = os.path.join(tmp_path, "lm.keras")
    copy.save(path)
    stored = _nested_keys(path)
    bitmaps = [folder for folder, keys in stored.items() if "0_bitmap" in keys]
    # The 6 block linears; the embeddings and the logits layer are dense.
    assert len(bitmaps) == 6
    assert all("/stable_transformer_block/" in folder for folder in bitmaps)
    for folder in bitmaps:
        assert stored[folder][:3] == ["0_bitmap", "0_shape", "0_values"]
        assert "0" not in stored[folder]

    loaded = keras.saving.load_model(path)
    _assert_same_weights(lm, loaded)
    np.testing.assert_array_equal(loaded.predict(ids, verbose=0), pred)
    # The reloaded model saves the same layout again.
    again = os.path.join(tmp_path, "again.keras")
    loaded.save(again)
    assert _nested_keys(again) == stored
    _assert_same_weights(lm, keras.saving.load_model(again))

    # What the layout saves on the 6 block kernels (49152 int8 weights, 80%
    # zeros): one bit a weight plus the non-zero values, against the zeros
    # at random places that gzip codes poorly. Measured 27512 -> 24932 bytes
    # (-9.4%); before the nested layers were reached, no change.
    plain = pruning.compressed_size(lm, file="keras")
    sparse = pruning.compressed_size(copy, file="keras")
    assert sparse < plain * 0.95, (sparse, plain)


def load_nested_and_predict(path, x):
    """In a fresh process: every layer's class, the weights and the predictions."""
    import keras

    import keras_stability  # noqa: F401  (registers the classes)
    from keras_stability._keras_internals import flatten_layers

    model = keras.saving.load_model(path)
    return (
        {layer.path: type(layer).__name__ for layer in flatten_layers(model)},
        model.get_weights(),
        np.asarray(model.predict(x, verbose=0)),
    )


def test_multi_head_attention_file_loads_in_a_fresh_process(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 16))
    h = keras.layers.MultiHeadAttention(2, 8, name="mha")(inputs, inputs)
    model = keras.Model(inputs, keras.layers.Dense(4, name="out")(h))
    assert _zero_kernels(model) == 5
    pruning.quantize(model)
    x = np.random.default_rng(1).normal(size=(3, 6, 16)).astype("float32")
    path = os.path.join(tmp_path, "mha.keras")
    pruning.sparse_storage(model).save(path)
    stored = _nested_keys(path)
    assert sum("0_bitmap" in keys for keys in stored.values()) == 5

    classes, weights, pred = run_in_subprocess(
        load_nested_and_predict, path, x, n_cpu_devices=1
    )
    for sub in ("query", "key", "value", "attention_output"):
        assert classes[f"mha/{sub}"] == "SparseStorageEinsumDense"
    assert classes["out"] == "SparseStorageDense"
    for old, new in zip(model.get_weights(), weights, strict=True):
        assert old.dtype == new.dtype
        np.testing.assert_array_equal(new, old)
    np.testing.assert_array_equal(pred, model.predict(x, verbose=0))


def test_subclasses_are_left_as_keras_stores_them_with_a_warning(tmp_path):
    class OwnDense(keras.layers.Dense):
        pass

    inputs = keras.Input((4,))
    model = keras.Model(inputs, OwnDense(3, name="own")(inputs))
    copy, messages = _sparse_storage_quietly(model)
    assert any(
        "leaves 1 layers stored as Keras stores them (own)" in m for m in messages
    )
    assert type(copy.get_layer("own")) is OwnDense


def test_bad_arguments_are_named():
    with pytest.raises(
        ValueError,
        match=r"argument `min_sparsity`. Expected a number in \[0, 1\]. "
        r"Received: min_sparsity=1.5",
    ):
        pruning.sparse_storage(_model(), min_sparsity=1.5)
    with pytest.raises(ValueError, match="Received: min_sparsity=-0.1"):
        pruning.SparseStorageDense(4, min_sparsity=-0.1)

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    model = Subclassed()
    model(np.zeros((1, 3), "float32"))
    with pytest.raises(
        ValueError, match="argument `model`. Expected a Sequential or functional"
    ):
        pruning.sparse_storage(model)
    with pytest.raises(ValueError, match="argument `model`. Expected a built"):
        pruning.sparse_storage(keras.Sequential([keras.layers.Dense(2)]))
    with pytest.raises(ValueError, match="argument `model`"):
        pruning.sparse_storage(keras.layers.Dense(2))
