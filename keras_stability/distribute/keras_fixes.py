"""Fixes for `model.fit` under `tf.distribute.MultiWorkerMirroredStrategy` in Keras 3.

Keras 3.15's TensorFlow trainer fails under `MultiWorkerMirroredStrategy`
(keras-team/keras#20585) with "Attempt to convert a value (PerReplica...) with
an unsupported type":

1. `TensorFlowTrainer._maybe_symbolic_build` all-reduces the first *data*
   batch with `strategy.reduce("MEAN", ...)` only to learn its shapes and
   dtypes. The collective strategy cannot reduce a `PerReplica` batch
   eagerly. The fix reads the first local replica's batch instead: it has the
   same per-replica shape and dtype, which is all the symbolic build uses.
2. `reduce_per_replica` reduces every metric under the collective strategy
   with `strategy.reduce("MEAN", v, axis=0)`, which fails for scalars. The fix
   reduces scalars with `axis=None`.

Everything here is switched on by `enable_multi_worker_fixes()` (idempotent),
which `keras_stability.distribute.get_strategy()` calls when it returns a
multi-worker strategy. `tests/distribute/test_keras_fixes.py` pins the source
of the patched Keras functions, so an upstream change is noticed.
"""

import functools
import hashlib
import inspect
import warnings

import keras
import tensorflow as tf
from keras.src.backend.tensorflow import trainer as tf_trainer

# Keras versions whose code the fixes were written against.
TESTED_KERAS_VERSIONS = ("3.15",)

_ORIGINALS = {}


def patched_targets():
    """The Keras functions the fixes replace, as `{name: function}`."""
    return {
        "TensorFlowTrainer._maybe_symbolic_build": (
            _ORIGINALS.get("_maybe_symbolic_build")
            or tf_trainer.TensorFlowTrainer._maybe_symbolic_build
        ),
        "reduce_per_replica": (
            _ORIGINALS.get("reduce_per_replica") or tf_trainer.reduce_per_replica
        ),
    }


def source_digest(fn):
    """SHA-256 of a function's source, to notice upstream changes."""
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()


def _first_local_batch(strategy, batch):
    def first(v):
        if isinstance(v, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(v)[0]
        return v

    return tf.nest.map_structure(first, batch)


def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    if self._distribute_strategy is None or not _is_multi_worker(
        self.distribute_strategy
    ):
        return _ORIGINALS["_maybe_symbolic_build"](
            self, iterator=iterator, data_batch=data_batch
        )
    if iterator is not None:
        for _, _, it in iterator:
            data_batch = _first_local_batch(self.distribute_strategy, next(it))
            break
    with self.distribute_strategy.scope():
        self._symbolic_build(data_batch=data_batch)


def _reduce_per_replica(values, strategy, reduction):
    original = _ORIGINALS["reduce_per_replica"]
    if not _is_multi_worker(strategy) or reduction not in ("auto", "mean"):
        return original(values, strategy, reduction)

    def reduce_one(v):
        rank = v.shape.rank if hasattr(v, "shape") else None
        if isinstance(v, tf.distribute.DistributedValues):
            rank = strategy.experimental_local_results(v)[0].shape.rank
        axis = 0 if rank else None
        return strategy.reduce("MEAN", v, axis=axis)

    return tf.nest.map_structure(reduce_one, values)


def _is_multi_worker(strategy):
    return isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ) and strategy.extended._in_multi_worker_mode()


def enable_multi_worker_fixes():
    """Patches Keras' TensorFlow trainer so `fit` works under multi-worker.

    The patched functions defer to Keras' own code for every other strategy,
    so enabling the fixes changes nothing for single-worker training.
    Idempotent.

    Returns:
        `True` if the fixes were applied by this call, `False` if they
        already were.
    """
    if _ORIGINALS:
        return False
    version = ".".join(keras.__version__.split(".")[:2])
    if version not in TESTED_KERAS_VERSIONS:
        warnings.warn(
            f"keras_stability's multi-worker fixes were written for Keras "
            f"{', '.join(TESTED_KERAS_VERSIONS)}; this is Keras {keras.__version__}. "
            "They are applied anyway; check keras-team/keras#20585 for whether "
            "they are still needed.",
            stacklevel=2,
        )
    _ORIGINALS["_maybe_symbolic_build"] = (
        tf_trainer.TensorFlowTrainer._maybe_symbolic_build
    )
    _ORIGINALS["reduce_per_replica"] = tf_trainer.reduce_per_replica
    functools.update_wrapper(
        _maybe_symbolic_build, _ORIGINALS["_maybe_symbolic_build"], updated=()
    )
    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    tf_trainer.reduce_per_replica = _reduce_per_replica
    return True


def multi_worker_fixes_enabled():
    """Whether `enable_multi_worker_fixes()` has been applied in this process."""
    return bool(_ORIGINALS)


def disable_multi_worker_fixes():
    """Restores Keras' own functions. Returns whether anything was restored."""
    if not _ORIGINALS:
        return False
    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _ORIGINALS.pop(
        "_maybe_symbolic_build"
    )
    tf_trainer.reduce_per_replica = _ORIGINALS.pop("reduce_per_replica")
    return True
