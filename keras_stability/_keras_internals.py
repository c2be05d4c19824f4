"""Every private Keras name the library uses, and every patch it makes, in one place.

Keras 3 keeps a few things we need outside its public API (`keras.src`). They
are imported here and nowhere else, so a Keras upgrade has one file to check,
and `tests/test_keras_internals.py` pins each of them (its existence and, for
patched functions, a digest of its source) so an upstream change fails a test
instead of a user's run.

Patches (functions of Keras' that the library replaces or wraps) also live
here, each with the Keras behaviour it works around and how it is undone.
"""

import contextlib

import keras
import numpy as np
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
    return (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and strategy.extended._in_multi_worker_mode()
    )


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

    The model's train function (which `fit` looks up at every step) is
    wrapped (see `_TrainFunctionWrapper`): while batches are left to skip, a
    call draws the step's batches from the iterator `fit` passes and returns
    empty logs, without training and without running the hooks of
    `add_train_function_hook`. `fit`'s loop, its callbacks and the
    end-of-data handling are unchanged, and a retrace
    (`make_train_function(force=True)`, which our callbacks do when they wrap
    the optimizer) keeps the skip. Any earlier skip still pending is replaced.
    """
    wrapper = _TrainFunctionWrapper.of(model)
    wrapper.skip_left = max(0, int(n_batches))
    wrapper.release_if_idle()


def skipping_train_batches(model):
    """Whether `model`'s train function still has batches to skip."""
    wrapper = model.__dict__.get(_TrainFunctionWrapper.ATTRIBUTE)
    return wrapper is not None and wrapper.skip_left > 0


def cancel_skip_train_batches(model):
    """Cancels a skip set by `skip_train_batches`, if any."""
    wrapper = model.__dict__.get(_TrainFunctionWrapper.ATTRIBUTE)
    if wrapper is not None:
        wrapper.skip_left = 0
        wrapper.release_if_idle()


def quiet_tracing_warning(function):
    """Keeps TensorFlow's "triggered tf.function retracing" warning off `function`.

    TensorFlow counts the traces of every `tf.function` made from the same
    Python code together and warns when most of the last calls traced. A
    reader made once per model and called rarely (the detector's snapshots)
    traces once per model: in a loop of models (a Keras Tuner search) that
    is by design, not the mistake the warning is about. Sets the flag
    TensorFlow's own loaded functions set; without it, only the warning
    stays. Returns `function`.
    """
    function._omit_frequent_tracing_warning = True
    return function


# -- Callbacks, clipping and optimizers ---------------------------------------
#
# `fit`'s logs. Keras' TensorFlow `fit` loop is, per call of the compiled step:
#
#     logs = model.train_function(iterator)          # dict of tensors
#     callbacks.on_train_batch_end(end_step, logs)   # CallbackList: one dict
#     ...                                            # of Python floats,
#     epoch_logs = dict(model._get_metrics_result_or_logs(logs))  # shared
#
# `CallbackList` converts `logs` once (`pythonify_logs`: `float(value)`) and
# hands the same dict to each callback in list order, so a value a callback
# writes there reaches only the callbacks after it; and the epoch logs are
# built from the dict `train_function` returned (when its keys are not
# exactly the model's metrics). Values written into that returned dict, by
# the compiled step or right after it on the host, reach every callback
# whatever the order: `wrap_train_step` and `add_train_function_hook` below.


def loss_tracker(model):
    """The compiled model's running-mean loss metric (Keras' `_loss_tracker`).

    A `keras.metrics.Mean` holding `total` (sum of batch loss x batch size)
    and `count`; `None` when the model has none (a custom `train_step`).
    """
    tracker = getattr(model, "_loss_tracker", None)
    if (
        tracker is None
        or not hasattr(tracker, "total")
        or not hasattr(tracker, "count")
    ):
        return None
    return tracker


def learning_rate_object(optimizer):
    """What an optimizer holds as its learning rate: a variable, a
    `LearningRateSchedule` or a callable (Keras' `_learning_rate`)."""
    return getattr(optimizer, "_learning_rate", None)


def set_learning_rate_object(optimizer, learning_rate):
    """Replaces an optimizer's learning-rate object, e.g. a schedule by a
    scaled schedule (the public setter refuses to replace a schedule)."""
    optimizer._learning_rate = learning_rate


@contextlib.contextmanager
def one_garbage_collection():
    """Defers Keras' per-variable garbage collections to one at the end.

    Keras' `Layer.__delattr__` runs a full `gc.collect()` each time it
    deletes a variable attribute (to free device buffers at once).
    `Model.quantize` deletes every float kernel it replaces, so a model of N
    kernels paid N full collections: 0.3-1 s each in a process holding
    TensorFlow, 4 s for a 2-block character LM of 15 kernels. Inside this
    context `gc.collect` does nothing; one collection runs on leaving it.
    """
    import gc

    collect = gc.collect
    gc.collect = lambda generation=2: 0
    try:
        yield
    finally:
        gc.collect = collect
        collect()


def flatten_layers(layer, include_self=True, recursive=True):
    """`layer` and its sublayers, recursively unless `recursive=False` (the
    layers it owns directly; Keras' `_flatten_layers`)."""
    return list(layer._flatten_layers(include_self=include_self, recursive=recursive))


def run_through_graph(model, inputs, operation_fn):
    """Calls a functional model's graph on `inputs` (a flat list), each
    operation through `operation_fn(operation)` (Keras' `_run_through_graph`)."""
    return model._run_through_graph(inputs, operation_fn=operation_fn)


def applying_optimizer():
    """The Keras optimizer whose `apply` is running now, or `None`.

    `Optimizer.apply` opens `keras.name_scope(self.name, caller=self)`
    around the update and the constraints; the innermost scope opened by an
    optimizer is the one applying (under a `LossScaleOptimizer` or a
    `GuardedOptimizer`, the inner one, whose `iterations` they report).
    Keras keeps that stack, per thread, in its private global state.
    """
    from keras.src.backend.common import global_state

    stack = global_state.get_global_attribute("name_scope_stack") or []
    for scope in reversed(stack):
        caller = getattr(scope, "caller", None)
        if isinstance(caller, keras.optimizers.Optimizer):
            return caller
    return None


def is_graph_model(model):
    """Whether `model` is a Sequential or functional model, the kinds that
    `keras.models.clone_model` rebuilds layer by layer (Keras' `Functional`)."""
    from keras.src.models.functional import Functional

    return isinstance(model, (keras.Sequential, Functional))


def optimizer_has_variable(optimizer, variable):
    """Whether a built optimizer has state for `variable` (Keras keeps its
    trainable variables' keys in `_trainable_variables_indices`)."""
    return optimizer._var_key(variable) in optimizer._trainable_variables_indices


def to_numpy(value):
    """`keras.ops.convert_to_numpy(value)` without NumPy 2's DeprecationWarning.

    On TensorFlow, Keras converts with `np.array(value, copy=False)`, which a
    variable's `__array__` (Keras' or TensorFlow's) does not accept: NumPy 2
    warns on every call ("`__array__` implementation doesn't accept a copy
    keyword"). A value with a `numpy()` method (a variable, an eager tensor)
    is read by it instead; anything else goes to `convert_to_numpy`.
    """
    numpy = getattr(value, "numpy", None)
    if callable(numpy):
        return np.asarray(numpy())
    return keras.ops.convert_to_numpy(value)


def read(variable):
    """The value of a Keras variable now, as one tensor (one read in a graph).

    On TensorFlow, `keras.ops.convert_to_tensor(variable)` returns the
    TensorFlow variable itself, so each op that uses it reads it again
    (a `ReadVariableOp` per use). This reads the TensorFlow variable Keras
    wraps once (`Variable._value.value()`; under a strategy, this replica's
    or the primary copy, as any read there). The read is ordered before the
    step's later updates of the variable and after its earlier ones. In a
    `keras.StatelessScope` (and off TensorFlow) it is the variable's
    `value`, as Keras gives it there.
    """
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    inner = getattr(variable, "_value", None)
    if keras.backend.backend() != "tensorflow" or inner is None or in_stateless_scope():
        return keras.ops.convert_to_tensor(variable)
    return inner.value()


def assign_add(variable, delta):
    """`variable.assign_add(delta)`, as one op in a TensorFlow graph.

    Keras' `Variable.assign_add` is `assign(self + value)`: a read, an add
    and an assign in the compiled step. On TensorFlow (outside a
    `keras.StatelessScope`, which records assignments instead) this adds
    `delta` with one `AssignAddVariableOp` on the TensorFlow variable Keras
    wraps (`Variable._value`; a distributed variable under a strategy),
    with the same result.
    """
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    inner = getattr(variable, "_value", None)
    if keras.backend.backend() != "tensorflow" or inner is None or in_stateless_scope():
        variable.assign_add(delta)
        return
    import tensorflow as tf

    if tf.is_tensor(delta):
        delta = tf.cast(delta, inner.dtype)
    else:  # a constant of the variable's dtype (no cast in the step)
        delta = tf.constant(delta, inner.dtype)
    inner.assign_add(delta, read_value=False)


def _identity_reduce(grads_and_vars):
    return list(grads_and_vars)


@contextlib.contextmanager
def gradients_already_reduced(optimizers):
    """Makes Keras' TensorFlow optimizers skip their own cross-replica sum.

    Keras' TF optimizer sums the gradients across replicas in
    `_all_reduce_sum_gradients` (called from `_backend_update_step`);
    `GuardedOptimizer` has already done it. Only the trace inside the block
    is affected: the instance attribute is removed on exit.

    Args:
        optimizers: The optimizers (a wrapper and those it wraps).
    """
    optimizers = list(optimizers)
    for opt in optimizers:
        object.__setattr__(opt, "_all_reduce_sum_gradients", _identity_reduce)
    try:
        yield
    finally:
        for opt in optimizers:
            object.__delattr__(opt, "_all_reduce_sum_gradients")


# Keras' gradient accumulation (`gradient_accumulation_steps=N`): `apply`
# counts every call in `_iterations` (the public `iterations` is
# `_iterations // N`, the number of updates) and keeps one accumulator per
# trainable variable in `_accumulated_gradients` (`_get_variable_index`
# maps a variable to its slot). On a call with `(_iterations + 1) % N == 0`
# it updates with `(g + accumulator) / N` and zeroes every accumulator;
# otherwise it adds `g` to the accumulators.


def raw_iterations(optimizer):
    """An optimizer's count of `apply` calls (Keras' `_iterations`)."""
    return optimizer._iterations


def gradient_accumulators(optimizer, variables=None):
    """The accumulators of `variables` (all of them for `None`), in order."""
    accumulators = optimizer._accumulated_gradients
    if variables is None:
        return [a for a in accumulators if a is not None]
    return [accumulators[optimizer._get_variable_index(v)] for v in variables]


# Building a model from data as the TensorFlow trainer's `fit` does. Without a
# distribution strategy `fit` builds nothing up front: the layers, the compiled
# loss and metrics and the optimizer are built while its train function is
# traced on the element spec of the `tf.data` dataset its data adapter makes
# (batch dimension `None` for arrays). `Trainer._symbolic_build` (what `fit`
# calls under a strategy, and on JAX and torch) builds the same state from a
# batch's shapes and dtypes; given that element spec, the model gets the
# shapes its first `fit` would give it (a `Sequential` without `Input` gets
# `(None, ...)`, not the first batch's size).


def build_from_data(model, x, y=None, batch_size=None):
    """Builds `model`, its compiled loss and metrics and its optimizer from
    the spec of the batches `fit(x, y, batch_size=batch_size)` would see.

    Returns `x`, or for a Python generator (whose first batches Keras' adapter
    reads to learn their spec) a generator yielding those batches again, then
    the rest; pass the returned value on to `fit`.
    """
    import types

    from keras.src.trainers import data_adapters
    from keras.src.trainers.data_adapters import generator_data_adapter

    if isinstance(x, types.GeneratorType):
        adapter = generator_data_adapter.GeneratorDataAdapter(x)
        x = (batch for batch in adapter.generator())
    else:
        adapter = data_adapters.get_data_adapter(x, y, batch_size=batch_size)
    spec = adapter.get_tf_dataset().element_spec
    with model.distribute_strategy.scope():
        model._symbolic_build(data_batch=spec)
    return x


def _no_merge_call():
    return False


@contextlib.contextmanager
def merge_calls_inline(strategy):
    """Makes `maybe_merge_call` call its function at once, in the block's trace.

    Keras' TF optimizers reach their cross-replica updates through
    `tf.__internal__.distribute.interim.maybe_merge_call`, which asks
    `strategy.extended._use_merge_call()` and, when it is true, calls
    `get_replica_context().merge_call`: that fails in cross-replica context
    (there is no replica context) and inside a `cond` in replica context
    (Keras 3.15's own gradient accumulation under MirroredStrategy). In
    cross-replica context the merge function can simply be called, which is
    what `maybe_merge_call` does when the strategy reports no merge calls.
    `GuardedOptimizer` applies an accumulating inner optimizer in
    cross-replica context inside this block; nothing else in that trace
    consults `_use_merge_call` (the gradients are already reduced). Only the
    trace inside the block is affected: the instance attribute is removed on
    exit.

    Args:
        strategy: The `tf.distribute.Strategy` in scope.
    """
    extended = strategy.extended
    object.__setattr__(extended, "_use_merge_call", _no_merge_call)
    try:
        yield
    finally:
        object.__delattr__(extended, "_use_merge_call")


_STEP_VALUES = "_keras_stability_step_values"


def wrap_train_step(model, key, values, before=None):
    """Makes `model.train_step` also return `values()` in its logs.

    `values` is called inside the compiled step, after the original
    `train_step` (so after the optimizer update), and returns a dict of
    scalar tensors, e.g. a `GuardedOptimizer`'s statistics: they come out of
    the compiled step with the loss, with no host read of their own. One
    wrapper per model: a new `key` replaces the previous `values`.

    With `before`, `before(data)` is called in the step with the step's
    data, before the original `train_step`, and `values(state, logs)` gets
    what it returned and the logs `train_step` returned (e.g. the loss
    tracker's totals, to take a skipped step back out of it and log the
    loss again).

    Returns:
        Whether `train_step` changed (the train function must then be
        traced again: `model.make_train_function(force=True)`).
    """
    current = model.train_step
    if getattr(current, _STEP_VALUES, None) == key:
        return False
    original = getattr(current, "_keras_stability_original", current)

    def train_step(data):
        if before is None:
            logs = original(data)
            new = values()
        else:
            state = before(data)
            logs = original(data)
            new = values(state, logs)
        if isinstance(logs, dict):
            logs = dict(logs)
            logs.update(new)
        return logs

    setattr(train_step, _STEP_VALUES, key)
    train_step._keras_stability_original = original
    model.train_step = train_step
    return True


def add_train_function_hook(model, hook):
    """Calls `hook(logs)` on the host right after each call of the train function.

    `logs` is the dict the compiled step returned (tensors), before `fit`
    gives it to any callback: what `hook` writes there reaches every
    callback and the epoch logs. A call that `skip_train_batches` made skip
    its batches (no training) passes empty logs. The model's `train_function` is wrapped, and
    so is every one `make_train_function` makes later (a retrace keeps the
    hooks). `remove_train_function_hook` undoes both once no hook is left.
    """
    wrapper = _TrainFunctionWrapper.of(model)
    if not any(h == hook for h in wrapper.hooks):
        wrapper.hooks.append(hook)


def remove_train_function_hook(model, hook):
    """Removes a hook added by `add_train_function_hook`; returns if it was there."""
    wrapper = model.__dict__.get(_TrainFunctionWrapper.ATTRIBUTE)
    if wrapper is None or not any(h == hook for h in wrapper.hooks):
        return False
    wrapper.hooks[:] = [h for h in wrapper.hooks if h != hook]
    wrapper.release_if_idle()
    return True


def add_stale_fit_cleanup(model, key, cleanup):
    """Runs `cleanup()` at the start of the next `fit` if this one raises.

    Keras runs no `on_train_end` when `fit` raises. What a callback turned
    on for its `fit` (and turns off in `on_train_end`) is then turned off by
    `cleanup` when the next `fit` (or `train_on_batch`) starts, before any
    callback's `on_train_begin`. A `fit` that ends normally drops the
    cleanups with its hooks (`remove_train_function_hook`). One cleanup per
    `key`.
    """
    _TrainFunctionWrapper.of(model).cleanups[key] = cleanup


class _TrainFunctionWrapper:
    """One wrapper of a model's train function for hooks and batch skipping.

    Installed on the model instance: `model.train_function` becomes a Python
    function that skips batches (`skip_train_batches`) or calls the compiled
    function and then the hooks (`add_train_function_hook`), and
    `model.make_train_function` re-wraps every function it makes, so a
    retrace keeps both. Removed (both attributes back to Keras' own) once no
    hook and no skip is left.
    """

    ATTRIBUTE = "_keras_stability_train_wrapper"

    @classmethod
    def of(cls, model):
        wrapper = model.__dict__.get(cls.ATTRIBUTE)
        if wrapper is None:
            wrapper = cls(model)
        return wrapper

    def __init__(self, model):
        self.model = model
        self.hooks = []
        self.skip_left = 0
        self.cleanups = {}  # `add_stale_fit_cleanup`
        object.__setattr__(model, self.ATTRIBUTE, self)
        make = model.make_train_function  # the class's bound method

        def make_train_function(force=False):
            if not force:
                # `fit` (and `train_on_batch`) call this, unforced, before any
                # callback's `on_train_begin`; our callbacks attach again after
                # it. A hook or skip still here was left by a `fit` that raised
                # (Keras runs no `on_train_end` then): drop it, so it cannot act
                # on a later `fit` that does not ask for it.
                self.hooks.clear()
                self.skip_left = 0
                cleanups = list(self.cleanups.values())
                self.cleanups.clear()
                for cleanup in cleanups:
                    cleanup()
                self.release_if_idle()  # puts Keras' own functions back
                return make(force=False)
            make(force=force)
            self.wrap()
            return model.train_function

        object.__setattr__(model, "make_train_function", make_train_function)
        self.wrap()

    def wrap(self):
        model = self.model
        function = model.train_function
        if function is None or getattr(function, "_keras_stability_wrapped", None):
            return

        def train_function(iterator):
            logs = self._skip(iterator) if self.skip_left > 0 else function(iterator)
            if isinstance(logs, dict):
                for hook in list(self.hooks):
                    hook(logs)
            return logs

        train_function._keras_stability_wrapped = function
        model.train_function = train_function

    def _skip(self, iterator):
        n = min(max(1, int(self.model.steps_per_execution or 1)), self.skip_left)
        for _ in range(n):
            try:
                if isinstance(
                    iterator, (tf.data.Iterator, tf.distribute.DistributedIterator)
                ):
                    iterator.get_next()
                else:
                    next(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                # The data ended before the skip did (a shorter data set than
                # the backup's run): fit ends the epoch; nothing more to skip.
                self.skip_left = 0
                self.release_if_idle()
                raise
            self.skip_left -= 1
        self.release_if_idle()
        return {}

    def release_if_idle(self):
        if self.hooks or self.skip_left > 0:
            return
        model = self.model
        object.__delattr__(model, self.ATTRIBUTE)
        object.__delattr__(model, "make_train_function")
        original = getattr(model.train_function, "_keras_stability_wrapped", None)
        if original is not None:
            model.train_function = original


# --- callbacks: counters printed as integers by every `ProgbarLogger` --------
#
# Our callbacks write their counters into the (already converted) logs they
# are given as `LoggedInt` (below), which reaches only the callbacks after
# them: the `ProgbarLogger` `fit` adds itself comes last, but one the user
# lists before them printed floats (`rollbacks: 0.0000e+00`). A value
# written before the conversion cannot stay a `LoggedInt` (`pythonify_logs`
# takes `float(value)`). `print_as_integers(model, keys)` wraps
# `ProgbarLogger._update_progbar` and `_finalize_progbar` (once per process,
# on the class, so wherever the instance is in the list) to print the
# model's `keys` as `LoggedInt`; a model not marked is printed as Keras
# prints it. `restore_progbar_logger()` undoes the wrap.

_INTEGER_LOGS = "_keras_stability_integer_logs"
_PROGBAR_ORIGINALS = {}


def print_as_integers(model, keys):
    """Makes every `ProgbarLogger` print `model`'s logged `keys` as integers
    (when whole: `LoggedInt`), wherever it is in the callback list."""
    names = frozenset(model.__dict__.get(_INTEGER_LOGS, ())) | frozenset(keys)
    object.__setattr__(model, _INTEGER_LOGS, names)
    _wrap_progbar_logger()


def _with_integers(progbar_logger, logs):
    """`logs` with the marked keys of the logger's model as `LoggedInt`."""
    model = getattr(progbar_logger, "_model", None)
    keys = getattr(model, "__dict__", {}).get(_INTEGER_LOGS)
    if not keys or not logs:
        return logs
    return {
        k: LoggedInt(v)
        if k in keys and isinstance(v, (int, float)) and not isinstance(v, bool)
        else v
        for k, v in logs.items()
    }


def progbar_logger_patch_targets():
    """Keras' own methods `print_as_integers` wraps, as `{name: function}`."""
    from keras.src.callbacks.progbar_logger import ProgbarLogger

    return {
        name: _PROGBAR_ORIGINALS.get(name) or getattr(ProgbarLogger, name)
        for name in ("_update_progbar", "_finalize_progbar")
    }


def _wrap_progbar_logger():
    from keras.src.callbacks.progbar_logger import ProgbarLogger

    if _PROGBAR_ORIGINALS:
        return
    update = ProgbarLogger._update_progbar
    finalize = ProgbarLogger._finalize_progbar

    @functools.wraps(update)
    def _update_progbar(self, batch, logs=None):
        return update(self, batch, _with_integers(self, logs))

    @functools.wraps(finalize)
    def _finalize_progbar(self, logs):
        return finalize(self, _with_integers(self, logs))

    _PROGBAR_ORIGINALS["_update_progbar"] = update
    _PROGBAR_ORIGINALS["_finalize_progbar"] = finalize
    ProgbarLogger._update_progbar = _update_progbar
    ProgbarLogger._finalize_progbar = _finalize_progbar


def restore_progbar_logger():
    """Puts Keras' own `ProgbarLogger` methods back (see `print_as_integers`)."""
    from keras.src.callbacks.progbar_logger import ProgbarLogger

    for name, original in _PROGBAR_ORIGINALS.items():
        setattr(ProgbarLogger, name, original)
    _PROGBAR_ORIGINALS.clear()


class LoggedInt(float):
    """A count in `fit`'s logs that Keras' progress bar prints as an integer.

    Keras' `Progbar` prints every logged value with `{:.4f}` (or `{:.4e}`
    below 1e-3, so a count of 0 shows as `0.0000e+00`): it takes
    `np.mean(value)` unless the value is a `float`, divides it by its count
    (1 for `ProgbarLogger`'s values) and formats the result; `CallbackList`
    has already turned every value into a Python float. A `LoggedInt` is a
    float (History, CSVLogger, TensorBoard and JSON see `3.0`) whose
    division by 1 stays a `LoggedInt` and whose formatting drops the
    decimals when the value is whole. Our callbacks write their counters as
    `LoggedInt` into the (already converted) logs they receive, so the
    progress bar, which `fit` runs after every other callback, prints `3`.
    """

    __slots__ = ()

    def __format__(self, spec):
        value = float(self)
        if value.is_integer() and spec[-1:] in ("", "f", "e", "g", "F", "E", "G"):
            width = spec.split(".")[0].rstrip("feEgGF")
            return format(int(value), width)
        return float.__format__(self, spec)

    def __truediv__(self, other):
        result = float.__truediv__(self, other)
        return result if result is NotImplemented else LoggedInt(result)
