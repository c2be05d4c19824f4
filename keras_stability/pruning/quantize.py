"""Prune, then quantize: Keras' int8 on a stripped model, and its size on disk.

Keras' `model.quantize("int8")` quantizes the kernels of `Dense`,
`EinsumDense` and `Embedding` per output channel by absolute maximum,
symmetric and without a zero point (`q = round(w * 127 / max|w|)`), so a
pruned zero stays an exact zero and the sparsity of `strip_pruning` survives.
What Keras does not do is save a quantized sublayer of another layer (the
query/key/value of a `MultiHeadAttention`, the Dense layers of a transformer
block): the outer layer's config still says float32, so `load_model` rebuilds
float sublayers and fails on the int8 weights. `quantize` records the
sublayers' int8 policies in the outer layer's policy, as a `DTypePolicyMap`
by path (what keras-hub's backbones do), so the `.keras` file reloads.
"""

import gzip
import os
import tempfile

import keras

from keras_stability._checks import check_choice
from keras_stability._checks import check_layer
from keras_stability._checks import invalid
from keras_stability._keras_internals import flatten_layers
from keras_stability._keras_internals import one_garbage_collection

__all__ = ["compressed_size", "quantize", "resolve_policy_maps"]

MODES = ("int8",)


def quantize(model, mode="int8", filters=None):
    """Quantizes a model with Keras, in a form that saves to `.keras` and reloads.

    Calls `model.quantize(mode, filters=filters)`, then gives every layer
    of `model` whose sublayers were quantized (a `MultiHeadAttention`, a
    `StableTransformerBlock`) a `keras.dtype_policies.DTypePolicyMap` of
    their int8 policies by path. Layers that create their sublayers with
    `dtype=self.dtype_policy` (Keras' `MultiHeadAttention`, this library's
    layers, keras-hub's) then rebuild them quantized when the file is
    loaded. Zeros of a pruned model stay zeros (symmetric quantization).

    Known limit (Keras 3.15): a model loaded from such a file predicts, but
    saving it again fails in Keras' `Embedding.save_own_variables` (it reads
    the quantization mode of the map's default, float32, not of its own
    path); call `keras_stability.pruning.resolve_policy_maps` on the loaded
    model first.

    Args:
        model: A built Keras model (e.g. pruned, then `strip_pruning`).
        mode: The quantization mode: `"int8"`. Defaults to `"int8"`.
        filters: Passed to `model.quantize`: a regex, a list of regexes or a
            callable choosing the layers to quantize. Defaults to `None`
            (every layer Keras can quantize).

    Returns:
        `model`, quantized in place.

    Raises:
        ValueError: If `model` is not a built Keras model or `mode` is not
            `"int8"`.

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model = quantize(model)
    >>> str(model.layers[0].kernel.dtype)
    'int8'
    """
    if not isinstance(model, keras.Model):
        raise invalid("model", model, "a built Keras model")
    check_layer("model", model, built=True)
    mode = check_choice("mode", mode, MODES)
    with one_garbage_collection():  # not one per kernel replaced
        model.quantize(mode, filters=filters)
    for layer in flatten_layers(model, include_self=False):
        if layer.quantization_mode is not None:
            continue
        quantized = [
            sub
            for sub in flatten_layers(layer, include_self=False)
            if sub.quantization_mode is not None and sub.path
        ]
        if not quantized:
            continue
        policy = layer.dtype_policy
        if not isinstance(policy, keras.dtype_policies.DTypePolicyMap):
            policy = keras.dtype_policies.DTypePolicyMap(default_policy=policy)
        for sub in quantized:
            if sub.path in policy:
                del policy[sub.path]
            policy[sub.path] = sub.dtype_policy
        layer._dtype_policy = policy
    return model


def resolve_policy_maps(model):
    """Gives each sublayer built from an outer layer's `DTypePolicyMap` its own policy.

    A layer rebuilt from a config (by `load_model` or `clone_model`) whose
    policy is the map `quantize` records creates its sublayers with that
    map. Keras reads their mode by path for the call but from the map's
    default (float32) in `Embedding.save_own_variables`, which then fails
    on the int8 scale; with their own policy (what `quantize` leaves on
    the sublayers of the model it quantized) the model saves again. The
    outer layers keep the map, so the saved config does not change.

    Call it on a model loaded from the `.keras` file of a `quantize`d model
    with quantized sublayers (a transformer, a keras-hub LM) before saving
    it again; a model that needs nothing is left as it is.

    Args:
        model: A built Keras model.

    Returns:
        `model`, changed in place.

    Raises:
        ValueError: If `model` is not a built Keras model.

    Example:

    ```python
    loaded = keras.models.load_model("quantized.keras")
    keras_stability.pruning.resolve_policy_maps(loaded)
    loaded.save("again.keras")
    ```
    """
    if not isinstance(model, keras.Model):
        raise invalid("model", model, "a built Keras model")
    check_layer("model", model, built=True)
    for layer in flatten_layers(model, include_self=False):
        policy = layer._dtype_policy
        if isinstance(policy, keras.dtype_policies.DTypePolicyMap) and (
            layer.path in policy
        ):
            layer._dtype_policy = policy[layer.path]
    return model


def compressed_size(model, file="weights"):
    """Size in bytes of a model's saved weights after gzip.

    What a sparse or int8 model costs to ship: `model.save_weights` (an
    `.h5` file, `file="weights"`) or `model.save` (`file="keras"`, the
    zip of config and weights) written to a temporary directory and
    compressed with `gzip` at level 9. Pruned zeros compress; Keras' int8
    weights are stored as int8. The optimizer's state is left out (Adam's
    float32 moments are twice the model and not sparse); a compiled model
    stays compiled.

    Args:
        model: A built Keras model.
        file: `"weights"` (`.weights.h5`) or `"keras"` (the `.keras` file).
            Defaults to `"weights"`.

    Returns:
        The gzip size in bytes, an int.

    Raises:
        ValueError: If `model` is not a built Keras model or `file` is not
            `"weights"` or `"keras"`.

    Example:

    >>> model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64)])
    >>> compressed_size(model) < 64 * 65 * 4
    True
    """
    if not isinstance(model, keras.Model):
        raise invalid("model", model, "a built Keras model")
    check_layer("model", model, built=True)
    file = check_choice("file", file, ("weights", "keras"))
    # Leave the optimizer's state out of the file for the measure, and put
    # the optimizer back (a compiled model stays compiled).
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        model.optimizer = None
    try:
        with tempfile.TemporaryDirectory() as directory:
            if file == "weights":
                path = os.path.join(directory, "model.weights.h5")
                model.save_weights(path)
            else:
                path = os.path.join(directory, "model.keras")
                model.save(path)
            with open(path, "rb") as f:
                return len(gzip.compress(f.read(), compresslevel=9))
    finally:
        if optimizer is not None:
            model.optimizer = optimizer
