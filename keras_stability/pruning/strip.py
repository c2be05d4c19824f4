"""`strip_pruning` and `sparsity_report`: the pruned model, for export and inspection."""

from keras_stability import _keras_internals
from keras_stability._checks import check_layer
from keras_stability.pruning.prune import prunable_weights
from keras_stability.pruning.pruner import find_pruner

__all__ = ["sparsity_report", "strip_pruning"]


def strip_pruning(model):
    """Removes pruning from a model, keeping the zeros in its weights.

    Applies the masks one last time and takes the mask constraints off the
    variables; the model is a plain Keras model again (it never had wrapper
    layers), changed in place and returned. A model that is not pruned is
    returned as it is.

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
    return model


def sparsity_report(model):
    """Fraction of zero weights in each prunable weight of a model.

    Works on pruned, stripped and plain models (zeros are counted in the
    weights themselves).

    Args:
        model: A built Keras model or layer.

    Returns:
        Dict `{weight path: sparsity}` in trainable-variable order, plus
        `"total"`: the zero fraction over all of them.

    Raises:
        ValueError: If `model` is not a built Keras layer or model.
    """
    check_layer("model", model, built=True)
    report = {}
    zeros = size = 0
    for variable in prunable_weights(model):
        value = _keras_internals.to_numpy(variable)
        n_zero = int((value == 0).sum())
        report[variable.path] = n_zero / value.size
        zeros += n_zero
        size += value.size
    report["total"] = zeros / size if size else 0.0
    return report
