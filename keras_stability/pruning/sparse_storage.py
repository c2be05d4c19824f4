"""Save pruned kernels as a bitmap of non-zeros plus the non-zero values.

Keras saves a kernel as its full matrix, float32 or (after
`model.quantize("int8")`) int8. An 80% sparse kernel is then 80% zeros at
random places, which gzip codes poorly: about 1.7 bytes per non-zero int8
weight. Stored instead as `np.packbits(kernel != 0)` (one bit a weight) plus
the non-zero values in order, the same kernel gzips about 20% smaller.

`sparse_storage(model)` returns a copy of a Sequential or functional model
(a `SparseStorageSequential` or `SparseStorageModel`) whose `Dense`,
`EinsumDense` and `Embedding` layers, at any depth, are the subclasses
below: the same variables, the same call and the same speed, but their
`save_own_variables` writes a mostly-zero kernel (or embeddings matrix) as
`"<i>_bitmap"`, `"<i>_values"` and `"<i>_shape"` in place of Keras' `"<i>"`,
and their `load_own_variables` rebuilds the dense variable. Everything else
(bias, int8 scales, a kernel sparser than nothing) is stored as Keras does,
so a file without the layout loads into these layers too.

Layers inside another layer (the query of a `MultiHeadAttention`, the
linears of a transformer block or of a keras-hub backbone) are created by
their outer layer's code, as plain Keras classes, both when the copy is made
and when a file is loaded; the config cannot name another class for them.
The two model classes therefore switch each of them to its subclass (the
same object: `__class__` is reassigned, nothing else changes) before the
model's variables are written or read. Keras' `saving_lib` calls a model's
`save_own_variables`/`load_own_variables` before its sublayers', so the
switch is in place by the time Keras reaches them.
"""

import warnings

import keras
import numpy as np

from keras_stability import _keras_internals
from keras_stability._checks import check_fraction
from keras_stability._checks import check_layer
from keras_stability._checks import invalid
from keras_stability._keras_internals import flatten_layers
from keras_stability._keras_internals import is_graph_model
from keras_stability.pruning._shared_layers import inline_shared_submodels
from keras_stability.pruning._shared_layers import shared_layers
from keras_stability.pruning.quantize import resolve_policy_maps

__all__ = [
    "SparseStorageDense",
    "SparseStorageEinsumDense",
    "SparseStorageEmbedding",
    "bitmap_decode",
    "bitmap_encode",
    "sparse_storage",
]

# Quantization modes whose kernel Keras stores whole under key "0" (int4
# packs two weights a byte and float8/GPTQ/AWQ store other things there).
_MODES = (None, "int8")
_KERNEL_KEY = "0"
_PARTS = ("bitmap", "values", "shape")


def bitmap_encode(array):
    """Splits an array into a bitmap of its non-zeros and their values.

    Args:
        array: A NumPy array (any shape and dtype).

    Returns:
        `(bitmap, values)`: `np.packbits` of `array != 0` in C order
        (uint8, one bit a weight) and the non-zero entries of `array` in
        the same order, with `array`'s dtype.

    Example:

    >>> bitmap, values = bitmap_encode(np.array([[0, 3], [0, -1]], "int8"))
    >>> bitmap.tolist(), values.tolist()
    ([80], [3, -1])
    """
    array = np.asarray(array)
    nonzero = array != 0
    return np.packbits(nonzero.ravel()), array[nonzero]


def bitmap_decode(bitmap, values, shape):
    """Rebuilds the array that `bitmap_encode` split.

    Args:
        bitmap: The packed bitmap of non-zeros (uint8).
        values: The non-zero values, in C order.
        shape: The shape of the array.

    Returns:
        A NumPy array of `shape` and the dtype of `values`: `values` where
        the bitmap is set, zeros elsewhere.

    Raises:
        ValueError: If the bitmap does not have one bit set per value.

    Example:

    >>> bitmap_decode(np.array([80], "uint8"), np.array([3, -1], "int8"), (2, 2))
    array([[ 0,  3],
           [ 0, -1]], dtype=int8)
    """
    values = np.asarray(values)
    shape = tuple(int(d) for d in shape)
    nonzero = np.unpackbits(np.asarray(bitmap, "uint8"), count=int(np.prod(shape)))
    nonzero = nonzero.astype(bool)
    if int(nonzero.sum()) != values.size:
        raise ValueError(
            f"Invalid sparse storage: the bitmap marks {int(nonzero.sum())} "
            f"non-zeros of a {shape} array but {values.size} values are stored."
        )
    array = np.zeros(nonzero.size, values.dtype)
    array[nonzero] = values.ravel()
    return array.reshape(shape)


class _SparseStorage:
    """The save/load of the three layers; `min_sparsity` is a config argument."""

    def __init__(self, *args, min_sparsity=0.5, **kwargs):
        self.min_sparsity = check_fraction("min_sparsity", min_sparsity)
        super().__init__(*args, **kwargs)

    def get_config(self):
        return {**super().get_config(), "min_sparsity": self.min_sparsity}

    def save_own_variables(self, store):
        entries = {}
        super().save_own_variables(entries)
        for key, value in entries.items():
            if key == _KERNEL_KEY and self.quantization_mode in _MODES:
                array = _keras_internals.to_numpy(value)
                if array.size and np.mean(array == 0) >= self.min_sparsity:
                    bitmap, values = bitmap_encode(array)
                    store[f"{key}_bitmap"] = bitmap
                    store[f"{key}_values"] = values
                    store[f"{key}_shape"] = np.asarray(array.shape, "int64")
                    continue
            store[key] = value

    def load_own_variables(self, store):
        entries = {}
        for key in store.keys():
            base, _, part = key.rpartition("_")
            if part == "bitmap":
                entries[base] = bitmap_decode(*(store[f"{base}_{p}"] for p in _PARTS))
            elif not (base and part in _PARTS):
                entries[key] = store[key]
        super().load_own_variables(entries)


@keras.saving.register_keras_serializable(package="keras_stability")
class SparseStorageDense(_SparseStorage, keras.layers.Dense):
    """`keras.layers.Dense` that saves a mostly-zero kernel as a bitmap + values.

    Computes exactly as `Dense` (float32 or Keras int8). Only the file
    differs: a kernel with at least `min_sparsity` zeros is saved as a
    bitmap of its non-zeros plus their values (see `sparse_storage`).

    Args:
        *args: Passed to `keras.layers.Dense`.
        min_sparsity: Fraction of zeros from which the kernel is saved as a
            bitmap; a denser kernel is saved as Keras saves it.
            Defaults to `0.5`.
        **kwargs: Passed to `keras.layers.Dense`.

    Raises:
        ValueError: If `min_sparsity` is not a number in [0, 1].
    """


@keras.saving.register_keras_serializable(package="keras_stability")
class SparseStorageEinsumDense(_SparseStorage, keras.layers.EinsumDense):
    """`keras.layers.EinsumDense` that saves a mostly-zero kernel as a bitmap + values.

    Args:
        *args: Passed to `keras.layers.EinsumDense`.
        min_sparsity: Fraction of zeros from which the kernel is saved as a
            bitmap. Defaults to `0.5`.
        **kwargs: Passed to `keras.layers.EinsumDense`.

    Raises:
        ValueError: If `min_sparsity` is not a number in [0, 1].
    """


@keras.saving.register_keras_serializable(package="keras_stability")
class SparseStorageEmbedding(_SparseStorage, keras.layers.Embedding):
    """`keras.layers.Embedding` that saves mostly-zero embeddings as a bitmap + values.

    Args:
        *args: Passed to `keras.layers.Embedding`.
        min_sparsity: Fraction of zeros from which the embeddings matrix is
            saved as a bitmap. Defaults to `0.5`.
        **kwargs: Passed to `keras.layers.Embedding`.

    Raises:
        ValueError: If `min_sparsity` is not a number in [0, 1].
    """


_SPARSE_CLASS = {
    keras.layers.Dense: SparseStorageDense,
    keras.layers.EinsumDense: SparseStorageEinsumDense,
    keras.layers.Embedding: SparseStorageEmbedding,
    SparseStorageDense: SparseStorageDense,
    SparseStorageEinsumDense: SparseStorageEinsumDense,
    SparseStorageEmbedding: SparseStorageEmbedding,
}


def _adopt_sublayers(model, min_sparsity):
    """Gives every plain `Dense`/`EinsumDense`/`Embedding` inside `model` the
    bitmap save/load, in place.

    A layer inside another layer (the query of a `MultiHeadAttention`, the
    `Dense` of a transformer block or of a keras-hub backbone) is rebuilt by
    its outer layer's own code when a file is loaded, as the plain Keras
    class. Its class is switched to the `SparseStorage*` twin (a subclass
    that only adds `min_sparsity` and the two methods): the same object,
    variables and call. Layers already of a twin keep their `min_sparsity`;
    subclasses (e.g. keras-hub's `ReversibleEmbedding`) are left alone.
    Sublayers built from an outer layer's `DTypePolicyMap` get their own
    policy first (`resolve_policy_maps`), else int8 ones would not save.

    Returns:
        `model`.
    """
    resolve_policy_maps(model)
    for layer in flatten_layers(model, include_self=False):
        twin = _SPARSE_CLASS.get(type(layer))
        if twin is not None and type(layer) is not twin:
            layer.__class__ = twin
            layer.min_sparsity = min_sparsity
    return model


class _SparseStorageRoot:
    """What the two model classes share: `min_sparsity` in the config, and
    `_adopt_sublayers` before the model's variables are written or read.

    Keras' `saving_lib` calls a saveable's `save_own_variables` and
    `load_own_variables` before those of its sublayers. The model's own
    (usually none) come first, so by the time Keras reaches a nested
    `Dense` it is a `SparseStorageDense`: saving writes its kernel as a
    bitmap, loading (into a model whose outer layers rebuilt plain
    sublayers from their configs) decodes it.
    """

    def _init_min_sparsity(self, min_sparsity):
        self.min_sparsity = check_fraction("min_sparsity", min_sparsity)

    def get_config(self):
        return {**super().get_config(), "min_sparsity": self.min_sparsity}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        min_sparsity = config.pop("min_sparsity", 0.5)
        model = super().from_config(config, custom_objects=custom_objects)
        model._init_min_sparsity(min_sparsity)
        return model

    def save_own_variables(self, store):
        _adopt_sublayers(self, self.min_sparsity)
        super().save_own_variables(store)

    def load_own_variables(self, store):
        _adopt_sublayers(self, self.min_sparsity)
        super().load_own_variables(store)


@keras.saving.register_keras_serializable(package="keras_stability")
class SparseStorageModel(_SparseStorageRoot, keras.Model):
    """A functional model that saves every mostly-zero kernel inside it as a bitmap.

    What `sparse_storage` returns for a functional model: the same graph
    and layers, but `save` and `save_weights` store the kernel (or
    embeddings matrix) of every `Dense`, `EinsumDense` and `Embedding` at
    any depth, inside transformer blocks, `MultiHeadAttention` or keras-hub
    backbones too, as a bitmap of its non-zeros plus their values when at
    least `min_sparsity` of it is zero; `keras.saving.load_model` (after
    `import keras_stability`) rebuilds the dense variables.

    Args:
        *args: Passed to `keras.Model` (`inputs`, `outputs`).
        min_sparsity: Fraction of zeros from which a kernel is saved as a
            bitmap. Defaults to `0.5`.
        **kwargs: Passed to `keras.Model`.

    Raises:
        ValueError: If `min_sparsity` is not a number in [0, 1].
    """

    def __init__(self, *args, min_sparsity=0.5, **kwargs):
        self._init_min_sparsity(min_sparsity)
        super().__init__(*args, **kwargs)


@keras.saving.register_keras_serializable(package="keras_stability")
class SparseStorageSequential(_SparseStorageRoot, keras.Sequential):
    """A Sequential model that saves every mostly-zero kernel inside it as a bitmap.

    What `sparse_storage` returns for a Sequential model (see
    `SparseStorageModel`).

    Args:
        *args: Passed to `keras.Sequential` (`layers`).
        min_sparsity: Fraction of zeros from which a kernel is saved as a
            bitmap. Defaults to `0.5`.
        **kwargs: Passed to `keras.Sequential`.

    Raises:
        ValueError: If `min_sparsity` is not a number in [0, 1].
    """

    def __init__(self, *args, min_sparsity=0.5, **kwargs):
        self._init_min_sparsity(min_sparsity)
        super().__init__(*args, **kwargs)


_SUPPORTED = (
    "a Sequential or functional Keras model (keras-hub's GPT-2 and Gemma "
    "backbones and CausalLMs included)"
)


def _from_own_config(model, layer, cls, min_sparsity=None):
    """`cls.from_config(layer.get_config())`: the copy of one layer, which
    is also what `load_model` will build from the saved config."""
    try:
        config = layer.get_config()
        if min_sparsity is not None:
            config = {**config, "min_sparsity": min_sparsity}
        return cls.from_config(config)
    except Exception as error:  # Re-raised with the layer and model named.
        raise invalid(
            "model",
            model,
            f"{_SUPPORTED} whose layers can be rebuilt from their configs; "
            f"layer `{layer.name}` ({type(layer).__name__}) cannot be "
            f"({type(error).__name__}: {error}), so a saved copy could not be "
            "loaded",
        ) from error


def _functional_root(model, copy, min_sparsity):
    """The `SparseStorageModel` of a functional copy, with nested models that
    share a layer with the graph around them inlined.

    A keras-hub CausalLM calls its backbone's `token_embedding` again as its
    LM head: one layer owned by the backbone and by the outer graph, which
    `load_model` would rebuild as two, one without weights (see
    `_shared_layers`). The copy calls the backbone's layers directly instead.
    """
    try:
        outputs, inlined = inline_shared_submodels(copy)
        if inlined:
            return SparseStorageModel(
                copy.input, outputs, name=copy.name, min_sparsity=min_sparsity
            )
    except ValueError as error:
        raise invalid(
            "model",
            model,
            f"{_SUPPORTED} whose nested models that share layers with the "
            f"graph around them can be inlined into it ({error})",
        ) from error
    return SparseStorageModel(
        copy.input, copy.output, name=copy.name, min_sparsity=min_sparsity
    )


def _check_single_owners(model, root):
    """Raises the `ValueError` of a copy with a layer that two layers or
    models own, which `load_model` would rebuild twice (once without weights)."""
    shared = shared_layers(root)
    if shared:
        layer, owners = shared[0]
        raise invalid(
            "model",
            model,
            f"{_SUPPORTED} in which each layer belongs to one model or "
            f"layer; layer `{layer.name}` belongs to "
            + " and ".join(f"`{owner.name}`" for owner in owners)
            + ", so a saved copy would load it twice, once without weights",
        )


def sparse_storage(model, min_sparsity=0.5):
    """A copy of a model that saves its mostly-zero kernels as bitmap + values.

    For a pruned model (after `strip_pruning`, and optionally `quantize`):
    returns a copy made with `keras.models.clone_model`, as a
    `SparseStorageModel` (functional) or `SparseStorageSequential`, in which
    every `Dense`, `EinsumDense` and `Embedding` layer, at any depth (in
    nested models, transformer blocks, `MultiHeadAttention`, keras-hub
    backbones), is a `SparseStorageDense`, `SparseStorageEinsumDense` or
    `SparseStorageEmbedding` with the same config and exactly the same
    weights. Predictions and speed are those of `model`; `model.save` and
    `model.save_weights` then write each kernel with at least `min_sparsity`
    zeros as a packed bitmap of its non-zeros, their values and its shape,
    and `keras.saving.load_model` (after `import keras_stability`) loads it
    back into the dense variable.

    Left as Keras stores them, with a warning naming them: subclasses of
    these layers (e.g. keras-hub's `ReversibleEmbedding`, which saves its
    own variables) and quantization modes other than int8. A keras-hub
    backbone given as `model` is copied as a plain functional graph of its
    layers (what `clone_model` makes of it). A keras-hub `CausalLM`, whose
    LM head is its backbone's `token_embedding` called again, is copied as
    one functional graph with the backbone's layers inlined (a layer owned
    by both a nested model and the graph around it would load twice, once
    without weights). The copy is not compiled. Its weights files name top-level layers by their class
    (`sparse_storage_dense`), so a `.weights.h5` of `model` does not load
    into the copy nor the reverse; `.keras` files carry their classes and
    load either way.

    Args:
        model: A built Sequential or functional Keras model.
        min_sparsity: Fraction of zeros from which a kernel is stored as a
            bitmap; denser kernels (for which the bitmap would cost more
            than it saves) are stored as Keras stores them.
            Defaults to `0.5`.

    Returns:
        A new, uncompiled `SparseStorageModel` or `SparseStorageSequential`
        with the same weights as `model`.

    Raises:
        ValueError: If `model` is not a built Sequential or functional
            Keras model (a subclassed model's own code, not its config,
            creates its layers), if a layer of it cannot be rebuilt from its
            config (keras-hub 0.32's Llama blocks: their `get_config`
            fails), if a layer would still belong to two layers or models
            in the copy, or if `min_sparsity` is not in [0, 1]. A file that
            `load_model` could not read is never written.

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> _ = model.layers[0].kernel.assign(np.eye(8, 4))  # 87.5% zeros
    >>> copy = sparse_storage(model)
    >>> type(copy.layers[0]).__name__
    'SparseStorageDense'
    >>> bool(np.all(copy.layers[0].kernel.numpy() == np.eye(8, 4)))
    True
    """
    if not isinstance(model, keras.Model):
        raise invalid("model", model, "a built Sequential or functional Keras model")
    check_layer("model", model, built=True)
    if not is_graph_model(model):
        raise invalid(
            "model",
            model,
            "a Sequential or functional Keras model (a subclassed model "
            "creates its layers in its own code, which `load_model` would "
            "run again with plain Keras layers)",
        )
    min_sparsity = check_fraction("min_sparsity", min_sparsity)

    def clone_function(layer):
        sparse_class = _SPARSE_CLASS.get(type(layer))
        if sparse_class is None or layer.quantization_mode not in _MODES:
            return _from_own_config(model, layer, layer.__class__)
        return _from_own_config(model, layer, sparse_class, min_sparsity)

    copy = keras.models.clone_model(
        model, clone_function=clone_function, recursive=True
    )
    if isinstance(copy, keras.Sequential):
        root = SparseStorageSequential.from_config(
            {**copy.get_config(), "min_sparsity": min_sparsity}
        )
        root.set_weights(model.get_weights())
    else:
        copy.set_weights(model.get_weights())
        root = _functional_root(model, copy, min_sparsity)
    _check_single_owners(model, root)
    _adopt_sublayers(root, min_sparsity)
    left = [
        layer.path or layer.name
        for layer in flatten_layers(root, include_self=False)
        if isinstance(layer, tuple(_SPARSE_CLASS))
        and (
            not isinstance(layer, _SparseStorage)
            or layer.quantization_mode not in _MODES
        )
    ]
    if left:
        shown = ", ".join(left[:3]) + (
            f" and {len(left) - 3} more" if len(left) > 3 else ""
        )
        warnings.warn(
            f"`sparse_storage` leaves {len(left)} layers stored as Keras stores "
            f"them ({shown}): subclasses of Dense/EinsumDense/Embedding (whose "
            "own code saves them), or quantization modes other than int8.",
            stacklevel=2,
        )
    return root
