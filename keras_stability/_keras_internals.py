"""Every private Keras name the library uses, and every patch it makes, in one place.

Keras 3 keeps a few things we need outside its public API (`keras.src`). They
are imported here and nowhere else, so a Keras upgrade has one file to check,
and `tests/test_keras_internals.py` pins each of them (its existence and, for
patched functions, a digest of its source) so an upstream change fails a test
instead of a user's run.

Patches (functions of Keras' that the library replaces or wraps) also live
here, each with the Keras behaviour it works around and how it is undone.
"""

import keras
from keras.src.utils import file_utils  # noqa: F401  (gfile-aware exists/rmtree/join)
from keras.src.utils import io_utils

# Keras versions whose private code this module was written against.
TESTED_KERAS_VERSIONS = ("3.15",)


def print_msg(message, line_break=True):
    """Keras' `print_msg`: prints through absl logging when Keras is set to,
    else to stdout, like Keras' own callbacks (no public alias exists)."""
    io_utils.print_msg(message, line_break=line_break)


def keras_version_tested():
    """Whether the installed Keras is a version this module was checked against."""
    return keras.__version__.startswith(TESTED_KERAS_VERSIONS)


# --- distribute: multi-worker `fit` patches, `BackupAndRestore`, `get_strategy` ---
#
# Keras 3.15's TensorFlow trainer fails under `MultiWorkerMirroredStrategy`
# (keras-team/keras#20585) with "Attempt to convert a value (PerReplica...) with
# an unsupported type":
#
# 1. `TensorFlowTrainer._maybe_symbolic_build` all-reduces the first *data*
#    batch with `strategy.reduce("MEAN", ...)` only to learn its shapes and
#    dtypes. The collective strategy cannot reduce a `PerReplica` batch
#    eagerly. The patch reads the first local replica's batch instead: it has
#    the same per-replica shape and dtype, which is all the symbolic build uses.
# 2. `reduce_per_replica` reduces every metric under the collective strategy
#    with `strategy.reduce("MEAN", v, axis=0)`, which fails for scalars. The
#    patch reduces scalars with `axis=None`.
#
# `enable_multi_worker_patches()` applies both (idempotent) and
# `disable_multi_worker_patches()` restores Keras' functions; the public
# `keras_stability.distribute.enable_multi_worker_fixes()` calls them.

import functools  # noqa: E402
import hashlib  # noqa: E402
import inspect  # noqa: E402

import tensorflow as tf  # noqa: E402
from keras.src.backend.tensorflow import trainer as tf_trainer  # noqa: E402
from tensorflow.python.eager import context as tf_context  # noqa: E402

_MULTI_WORKER_ORIGINALS = {}


def source_digest(fn):
    """SHA-256 of a function's source, to notice upstream changes."""
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()


def multi_worker_patch_targets():
    """Keras' own functions the multi-worker patches replace, as `{name: function}`."""
    return {
        "TensorFlowTrainer._maybe_symbolic_build": (
            _MULTI_WORKER_ORIGINALS.get("_maybe_symbolic_build")
            or tf_trainer.TensorFlowTrainer._maybe_symbolic_build
        ),
        "reduce_per_replica": (
            _MULTI_WORKER_ORIGINALS.get("reduce_per_replica")
            or tf_trainer.reduce_per_replica
        ),
    }


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
        return _MULTI_WORKER_ORIGINALS["_maybe_symbolic_build"](
            self, iterator=iterator, data_batch=data_batch
        )
    if iterator is not None:
        for _, _, it in iterator:
            data_batch = _first_local_batch(self.distribute_strategy, next(it))
            break
    with self.distribute_strategy.scope():
        self._symbolic_build(data_batch=data_batch)


def _reduce_per_replica(values, strategy, reduction):
    original = _MULTI_WORKER_ORIGINALS["reduce_per_replica"]
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


def enable_multi_worker_patches():
    """Applies the two patches above. Returns `False` if they already were."""
    if _MULTI_WORKER_ORIGINALS:
        return False
    _MULTI_WORKER_ORIGINALS["_maybe_symbolic_build"] = (
        tf_trainer.TensorFlowTrainer._maybe_symbolic_build
    )
    _MULTI_WORKER_ORIGINALS["reduce_per_replica"] = tf_trainer.reduce_per_replica
    functools.update_wrapper(
        _maybe_symbolic_build,
        _MULTI_WORKER_ORIGINALS["_maybe_symbolic_build"],
        updated=(),
    )
    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    tf_trainer.reduce_per_replica = _reduce_per_replica
    return True


def multi_worker_patches_enabled():
    """Whether `enable_multi_worker_patches()` is in effect in this process."""
    return bool(_MULTI_WORKER_ORIGINALS)


def disable_multi_worker_patches():
    """Restores Keras' own functions. Returns whether anything was restored."""
    if not _MULTI_WORKER_ORIGINALS:
        return False
    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _MULTI_WORKER_ORIGINALS.pop(
        "_maybe_symbolic_build"
    )
    tf_trainer.reduce_per_replica = _MULTI_WORKER_ORIGINALS.pop("reduce_per_replica")
    return True


def collective_ops_configurable():
    """Whether a `MultiWorkerMirroredStrategy` can still be built in this process.

    TensorFlow configures collective ops when the strategy is built, which it
    refuses ("Collective ops must be configured at program startup") once its
    eager context is initialized, i.e. once any op has run (a dataset, a
    model, a tensor) -- unless collective ops were configured already, by an
    earlier strategy. This is TensorFlow's own test in
    `context.Context.configure_collective_ops`; nothing public exposes it.
    """
    ctx = tf_context.context()
    return ctx._context_handle is None or ctx._collective_leader is not None


# `fit` reads the first epoch from `model._initial_epoch` (set by
# `BackupAndRestore` when it restores; Keras never resets it) and calls
# `model.train_function(iterator)` once per step, looking the attribute up
# each time: `BackupAndRestore` relies on both to resume inside an epoch.


def set_initial_epoch(model, epoch):
    """Makes the next `fit` of `model` start at `epoch` (`None`: its argument)."""
    model._initial_epoch = epoch


def skip_train_batches(model, n_batches):
    """Makes `model`'s next `n_batches` training steps consume data without training.

    Replaces `model.train_function` (which `fit` looks up at every step) by a
    function that draws the step's batches from the iterator `fit` passes and
    returns empty logs; once `n_batches` batches are drawn it puts the
    original back. `fit`'s loop, its callbacks and the end-of-data handling
    are unchanged. Any earlier skip still pending is cancelled first.
    """
    cancel_skip_train_batches(model)
    original = model.train_function
    left = [int(n_batches)]
    if left[0] <= 0 or original is None:
        return

    def skipping_train_function(iterator):
        if left[0] <= 0:
            model.train_function = original
            return original(iterator)
        n = min(int(model.steps_per_execution), left[0])
        for _ in range(n):
            if isinstance(iterator, (tf.data.Iterator, tf.distribute.DistributedIterator)):
                iterator.get_next()  # OutOfRangeError at the end: fit ends the epoch
            else:
                next(iterator)
            left[0] -= 1
        if left[0] <= 0:
            model.train_function = original
        return {}

    skipping_train_function._keras_stability_original = original
    model.train_function = skipping_train_function


def skipping_train_batches(model):
    """Whether `model.train_function` is still skipping batches."""
    return hasattr(getattr(model, "train_function", None), "_keras_stability_original")


def cancel_skip_train_batches(model):
    """Puts back the `train_function` that `skip_train_batches` replaced, if any."""
    fn = getattr(model, "train_function", None)
    while hasattr(fn, "_keras_stability_original"):
        fn = fn._keras_stability_original
    if fn is not getattr(model, "train_function", None):
        model.train_function = fn
