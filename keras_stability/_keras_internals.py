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
    if tracker is None or not hasattr(tracker, "total") or not hasattr(tracker, "count"):
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


def flatten_layers(layer, include_self=True):
    """`layer` and its sublayers, recursively (Keras' `_flatten_layers`)."""
    return list(layer._flatten_layers(include_self=include_self))


def optimizer_has_variable(optimizer, variable):
    """Whether a built optimizer has state for `variable` (Keras keeps its
    trainable variables' keys in `_trainable_variables_indices`)."""
    return optimizer._var_key(variable) in optimizer._trainable_variables_indices


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


_STEP_VALUES = "_keras_stability_step_values"


def wrap_train_step(model, key, values):
    """Makes `model.train_step` also return `values()` in its logs.

    `values` is called inside the compiled step, after the original
    `train_step` (so after the optimizer update), and returns a dict of
    scalar tensors, e.g. a `GuardedOptimizer`'s statistics: they come out of
    the compiled step with the loss, with no host read of their own. One
    wrapper per model: a new `key` replaces the previous `values`.

    Returns:
        Whether `train_step` changed (the train function must then be
        traced again: `model.make_train_function(force=True)`).
    """
    current = model.train_step
    if getattr(current, _STEP_VALUES, None) == key:
        return False
    original = getattr(current, "_keras_stability_original", current)

    def train_step(data):
        logs = original(data)
        if isinstance(logs, dict):
            logs = dict(logs)
            logs.update(values())
        return logs

    setattr(train_step, _STEP_VALUES, key)
    train_step._keras_stability_original = original
    model.train_step = train_step
    return True


_TRAIN_HOOKS = "_keras_stability_train_hooks"


def add_train_function_hook(model, hook):
    """Calls `hook(logs)` on the host right after each call of the train function.

    `logs` is the dict the compiled step returned (tensors), before `fit`
    gives it to any callback: what `hook` writes there reaches every
    callback and the epoch logs. The model's `train_function` is wrapped, and
    so is every one `make_train_function` makes later (a retrace keeps the
    hooks). `remove_train_function_hook` undoes both once no hook is left.
    """
    hooks = model.__dict__.get(_TRAIN_HOOKS)
    if hooks is None:
        hooks = []
        object.__setattr__(model, _TRAIN_HOOKS, hooks)
        make = model.make_train_function  # the class's bound method

        def make_train_function(force=False):
            make(force=force)
            _wrap_train_function(model, hooks)
            return model.train_function

        make_train_function._keras_stability_make = make
        object.__setattr__(model, "make_train_function", make_train_function)
    if not any(h == hook for h in hooks):
        hooks.append(hook)
    _wrap_train_function(model, hooks)


def remove_train_function_hook(model, hook):
    """Removes a hook added by `add_train_function_hook`; returns if it was there."""
    hooks = model.__dict__.get(_TRAIN_HOOKS)
    if hooks is None or not any(h == hook for h in hooks):
        return False
    hooks[:] = [h for h in hooks if h != hook]
    if not hooks:
        object.__delattr__(model, _TRAIN_HOOKS)
        object.__delattr__(model, "make_train_function")
        function = model.train_function
        original = getattr(function, "_keras_stability_wrapped", None)
        if original is not None:
            model.train_function = original
    return True


def _wrap_train_function(model, hooks):
    function = model.train_function
    if function is None or getattr(function, "_keras_stability_wrapped", None):
        return

    def train_function(iterator):
        logs = function(iterator)
        if isinstance(logs, dict):
            for hook in list(hooks):
                hook(logs)
        return logs

    train_function._keras_stability_wrapped = function
    model.train_function = train_function


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
