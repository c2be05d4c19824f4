"""`strip_pruning` and `sparsity_report`: the pruned model, for export and inspection."""

from keras_stability import _keras_internals
from keras_stability._checks import check_layer
from keras_stability.pruning.prune import PRUNABLE
from keras_stability.pruning.prune import _prunable
from keras_stability.pruning.pruner import find_pruner
from keras_stability.pruning.pruner import reset_train_function

__all__ = ["sparsity_report", "strip_pruning"]


def strip_pruning(model):
    """Removes pruning from a model, keeping the zeros in its weights.

    Applies the masks one last time and takes the mask constraints off the
    variables; the model is a plain Keras model again (it never had wrapper
    layers), changed in place and returned (not a copy). Its compiled train
    step, traced with the constraints, is dropped, so the next `fit` trains
    it dense without compiling again. A model trained from outside (a
    Distiller's student) is stripped through that model,
    `strip_pruning(distiller)`, or that model is compiled again. A model
    that is not pruned is returned as it is.

    Warns if the schedule did not reach its target sparsity (a `fit` shorter
    than its `end_step`), unless a pruning callback already said so.

    Args:
        model: A model or layer pruned by `prune_low_magnitude`.

    Returns:
        `model`, with masked weights and no pruning machinery.

    Raises:
        ValueError: If `model` is not a Keras layer or model, or if the
            schedule returned a sparsity outside [0, 1) during training.
    """
    check_layer("model", model)
    # Layers of a model may have been pruned separately: one pruner each.
    for _ in range(len(model.weights)):
        pruner = find_pruner(model)
        if pruner is None:
            break
        pruner.check_schedule_output()
        if int(_keras_internals.to_numpy(pruner.step)):
            pruner.warn_if_target_missed()
        pruner.detach()
        # The train step traced with the constraints would keep masking.
        reset_train_function(model)
    return model


def sparsity_report(model):
    """Fraction of zero weights in each prunable weight of a model.

    Works on pruned, stripped, frozen and plain models, and after Keras'
    int8 or float8 quantization (`quantize`): zeros are counted in the
    weights as stored, trainable or not (an int8 kernel's zeros are its
    weights' zeros, as the quantization is symmetric).

    Args:
        model: A built Keras model or layer.

    Returns:
        Dict `{weight path: sparsity}` in the order of `model.weights`,
        plus `"total"`: the zero fraction over all of them.

    Raises:
        ValueError: If `model` is not a built Keras layer or model, or has
            a layer quantized in another mode (int4 and the like pack or
            offset their values, so stored zeros are not zero weights).
    """
    check_layer("model", model, built=True)
    report = {}
    zeros = size = 0
    for variable in _stored_prunable_weights(model):
        value = _keras_internals.to_numpy(variable)
        n_zero = int((value == 0).sum())
        report[variable.path] = n_zero / value.size
        zeros += n_zero
        size += value.size
    report["total"] = zeros / size if size else 0.0
    return report


# Modes whose stored kernel holds the weights' zeros as zeros.
_COUNTED_MODES = (None, "int8", "float8")


def _stored_prunable_weights(model):
    """The variables holding the prunable weights, trainable or not, in
    `model.weights` order: `prunable_weights` leaves out frozen ones and the
    int8 kernels of Keras' quantized layers (not trainable)."""
    prunable = tuple(cls for cls, _ in PRUNABLE)
    for layer in _keras_internals.flatten_layers(model):
        mode = getattr(layer, "quantization_mode", None)
        if isinstance(layer, prunable) and mode not in _COUNTED_MODES:
            raise ValueError(
                "Invalid value for argument `model`. Expected a model whose "
                "prunable layers are float or quantized to int8 or float8. "
                f"Received: model={model.name!r} with layer {layer.path!r} "
                f"quantized to {mode!r}, whose stored values do not show "
                "the weights' zeros"
            )
    # Keras' quantized layers return their int8 variable as `kernel`.
    return _prunable(model, None, among=model.weights)
