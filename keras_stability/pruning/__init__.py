"""Magnitude and N:M pruning for Keras 3, with TF-MOT's schedules and mask rules.

`prune_low_magnitude(model, schedule)` prunes Sequential, functional and
subclassed models in place; `strip_pruning` removes the machinery;
`sparsity_report` and `PruningSummaries` show the sparsity; `quantize` applies
Keras' int8 so that the `.keras` file reloads (zeros stay zeros;
`resolve_policy_maps` lets the reloaded model save again) and
`compressed_size` gives the gzip bytes of the weights; `sparse_storage`
makes a copy that saves its mostly-zero kernels as a bitmap of non-zeros
plus the non-zero values, at any depth (a smaller file, the same model: a
`SparseStorageModel` or `SparseStorageSequential` whose layers are
`SparseStorageDense`, `SparseStorageEinsumDense` and
`SparseStorageEmbedding`); `shrink` removes
whole units and filters for a smaller, faster model; `shrink_transformer`
removes attention heads, FFN units, hidden channels and blocks of a
transformer language model (ours or keras-hub's). `UpdatePruningStep` is
accepted so that TF-MOT code runs with only its import changed; training is
the same without it.

`PolynomialDecay` and `ConstantSparsity` are TF-MOT's own schedule classes
(subclassed only to check their arguments in Keras' form), imported on first
use so that `import keras_stability.pruning` does not load TF-MOT (and, when
it is loaded, `tf.keras` stays Keras 3).
"""

from keras_stability.pruning import _tfmot
from keras_stability.pruning import masks
from keras_stability.pruning import schedules
from keras_stability.pruning.callbacks import UpdatePruningStep
from keras_stability.pruning.prune import prunable_weights
from keras_stability.pruning.prune import prune_low_magnitude
from keras_stability.pruning.pruner import Pruner
from keras_stability.pruning.pruner import find_pruner
from keras_stability.pruning.pruner import find_pruners
from keras_stability.pruning.quantize import compressed_size
from keras_stability.pruning.quantize import quantize
from keras_stability.pruning.quantize import resolve_policy_maps
from keras_stability.pruning.shrink import shrink
from keras_stability.pruning.shrink import shrink_plan
from keras_stability.pruning.sparse_storage import SparseStorageDense
from keras_stability.pruning.sparse_storage import SparseStorageEinsumDense
from keras_stability.pruning.sparse_storage import SparseStorageEmbedding
from keras_stability.pruning.sparse_storage import SparseStorageModel
from keras_stability.pruning.sparse_storage import SparseStorageSequential
from keras_stability.pruning.sparse_storage import sparse_storage
from keras_stability.pruning.strip import sparsity_report
from keras_stability.pruning.strip import strip_pruning
from keras_stability.pruning.summaries import PruningSummaries
from keras_stability.pruning.transformer_shrink import shrink_transformer
from keras_stability.pruning.transformer_shrink import shrink_transformer_plan

# Fix `tf.keras` to Keras 3 now: a later `import tensorflow_model_optimization`
# (ours or the user's) sets TF_USE_LEGACY_KERAS=1, which would otherwise make a
# still-unresolved `tf.keras` load tf_keras for the rest of the process.
_tfmot.pin_tf_keras()

_TFMOT_SCHEDULES = ("ConstantSparsity", "PolynomialDecay")

__all__ = [
    "ConstantSparsity",
    "PolynomialDecay",
    "Pruner",
    "PruningSummaries",
    "SparseStorageDense",
    "SparseStorageEinsumDense",
    "SparseStorageEmbedding",
    "SparseStorageModel",
    "SparseStorageSequential",
    "UpdatePruningStep",
    "compressed_size",
    "find_pruner",
    "find_pruners",
    "masks",
    "prunable_weights",
    "prune_low_magnitude",
    "quantize",
    "resolve_policy_maps",
    "schedules",
    "shrink",
    "shrink_plan",
    "shrink_transformer",
    "shrink_transformer_plan",
    "sparse_storage",
    "sparsity_report",
    "strip_pruning",
]


# TF-MOT names that code ported from its guides uses, with what to do here.
_TFMOT_ONLY = {
    "prune_scope": (
        "a pruned model saves as a plain Keras model (no wrapper layers), so "
        "`keras.models.load_model` needs no scope; to continue pruning the "
        "reloaded model, call `prune_low_magnitude(model, schedule, "
        "initial_step=model.optimizer.iterations)`"
    ),
    "PruneForLatencyOnXNNPack": (
        "there are no pruning policies; choose the weights to prune with "
        "`prune_low_magnitude(..., filters=...)`"
    ),
    "PrunableLayer": (
        "no wrapper or layer interface is needed; choose the weights to prune "
        "with `prune_low_magnitude(..., filters=...)`, or give any variables "
        "to `Pruner`"
    ),
}


def __getattr__(name):
    if name in _TFMOT_SCHEDULES:
        from keras_stability.pruning._tfmot import tfmot_schedule_class

        return tfmot_schedule_class(name)
    if name in _TFMOT_ONLY:
        raise AttributeError(
            f"module {__name__!r} has no attribute {name!r} (TF-MOT's): "
            f"{_TFMOT_ONLY[name]}"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
