"""Attaching a `GuardedOptimizer` and its observers to a compiled model.

Callbacks (`AdaptiveClipping`, `GradientMonitor`, `GradientExplosionDetector`)
add what they need to the model's optimizer at the start of `fit`:
`ensure_guarded` wraps it in a `GuardedOptimizer` (or gives an existing
guard the clipping or spike skipping asked for), `attach_observer` adds a
`GradientObserver` to the guard, and `ModelObservers` keeps the observer a
callback attached for each model, so a callback given to several models or
`fit` calls attaches one observer per model, not one per `fit`.
"""

import contextlib
import weakref

import keras

from keras_stability import clipping as clipping_module
from keras_stability._checks import check_bool
from keras_stability._checks import invalid
from keras_stability.optimizers.guarded_optimizer import GradientObserver
from keras_stability.optimizers.guarded_optimizer import GuardedOptimizer
from keras_stability.optimizers.guarded_optimizer import _get_spike_skipping
from keras_stability.optimizers.guarded_optimizer import optimizer_chain

__all__ = [
    "ModelObservers",
    "attach_observer",
    "detach_observer",
    "ensure_guarded",
    "find_guard",
]


def find_guard(optimizer):
    """The `GuardedOptimizer` in `optimizer`'s wrapper chain, or `None`."""
    for opt in optimizer_chain(optimizer):
        if isinstance(opt, GuardedOptimizer):
            return opt
    return None


def _check_model(model):
    if not isinstance(model, keras.Model) or getattr(model, "optimizer", None) is None:
        raise invalid(
            "model",
            getattr(model, "name", model) if isinstance(model, keras.Model) else model,
            "a compiled Keras model (with an optimizer)",
        )
    return model


def _strategy_scope(model):
    strategy = getattr(model, "distribute_strategy", None)
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def ensure_guarded(model, clipping=None, skip_nonfinite=None, skip_spikes=None):
    """Makes `model.optimizer` a `GuardedOptimizer` and returns it.

    A plain optimizer is wrapped; under a `LossScaleOptimizer` (mixed
    precision) its inner optimizer is wrapped, so gradients are measured
    unscaled. The model's compile config is updated, so a saved `.keras` file
    reloads with the wrapper and its state. Works before and after a first
    `fit`: the optimizer is built at once if the model is, and the train
    function is traced again.

    An existing guard is used as it is, given the clipping policy or spike
    skipping asked for if it has none (`GuardedOptimizer.set_clipping`,
    `set_skip_spikes`), so several callbacks can each ask for their part in
    any order.

    Args:
        model: A compiled Keras model.
        clipping: A `keras_stability.clipping` policy, a positive number
            (`GlobalNorm`) or `None` (no clipping asked for).
            Defaults to `None`.
        skip_nonfinite: Whether a new guard skips non-finite steps; `None`
            means `True` for a new guard and "as it is" for an existing one.
            Defaults to `None`.
        skip_spikes: `None`/`False` (not asked for), `True` or a
            `SpikeSkipping`. Defaults to `None`.

    Returns:
        The `GuardedOptimizer`.

    Raises:
        ValueError: if the model is not compiled, if the optimizer clips by
            itself, if an argument is invalid, or if the optimizer is already
            guarded with a different policy, spike skipping or
            `skip_nonfinite`.
    """
    _check_model(model)
    clipping = clipping_module.get_policy("clipping", clipping)
    skip_spikes = _get_spike_skipping(skip_spikes)
    if skip_nonfinite is not None:
        skip_nonfinite = check_bool("skip_nonfinite", skip_nonfinite)
    optimizer = model.optimizer
    outer = optimizer
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    if isinstance(optimizer, GuardedOptimizer):
        if skip_nonfinite is not None and skip_nonfinite != optimizer.skip_nonfinite:
            raise invalid(
                "skip_nonfinite",
                skip_nonfinite,
                f"{optimizer.skip_nonfinite}: the model's optimizer is already a "
                f"GuardedOptimizer with skip_nonfinite={optimizer.skip_nonfinite}; "
                "cannot also apply another value",
            )
        changed = False
        with _strategy_scope(model):
            if clipping is not None:
                changed = optimizer.set_clipping(clipping) or changed
            if skip_spikes is not None:
                changed = optimizer.set_skip_spikes(skip_spikes) or changed
        if changed and getattr(model, "train_function", None) is not None:
            model.make_train_function(force=True)
        return optimizer
    guarded = GuardedOptimizer(
        optimizer,
        clipping=clipping,
        skip_nonfinite=True if skip_nonfinite is None else skip_nonfinite,
        skip_spikes=skip_spikes,
    )
    if outer is not optimizer:
        outer.inner_optimizer = guarded
    else:
        model.optimizer = guarded
    compile_config = getattr(model, "_compile_config", None)
    if compile_config is not None and "optimizer" in compile_config.config:
        compile_config.config["optimizer"] = guarded
    if getattr(model, "built", False) and optimizer.built:
        with _strategy_scope(model):
            guarded.build(model.trainable_variables)
    if getattr(model, "train_function", None) is not None:
        model.make_train_function(force=True)
    return guarded


def _check_observer(observer):
    if not isinstance(observer, GradientObserver):
        raise invalid(
            "observer", observer, "a keras_stability.optimizers.GradientObserver"
        )
    return observer


def attach_observer(
    model, observer, clipping=None, skip_nonfinite=None, skip_spikes=None
):
    """Adds `observer` to the model's (guarded) optimizer before training.

    Wraps the compiled optimizer in a `GuardedOptimizer` if needed (with the
    other arguments, as `ensure_guarded`) and makes the train function be
    traced again if the observer is new to the guard, so it is part of the
    compiled step. Adding an observer the guard already has changes nothing.

    Args:
        model: A compiled Keras model.
        observer: A `GradientObserver`.
        clipping: See `ensure_guarded`. Defaults to `None`.
        skip_nonfinite: See `ensure_guarded`. Defaults to `None`.
        skip_spikes: See `ensure_guarded`. Defaults to `None`.

    Returns:
        The `GuardedOptimizer`.

    Raises:
        ValueError: As `ensure_guarded`, or if `observer` is not a
            `GradientObserver`.
    """
    _check_model(model)
    _check_observer(observer)
    guard = ensure_guarded(
        model, clipping=clipping, skip_nonfinite=skip_nonfinite, skip_spikes=skip_spikes
    )
    if observer not in guard.observers:
        with _strategy_scope(model):
            guard.add_observer(observer)
        model.make_train_function(force=True)
    return guard


def detach_observer(model, observer):
    """Removes `observer` from the model's guarded optimizer, if it is there.

    The train function is traced again, so the observer's statistics are no
    longer computed. The `GuardedOptimizer` itself stays.

    Args:
        model: A Keras model.
        observer: A `GradientObserver`.

    Returns:
        Whether the observer was attached.

    Raises:
        ValueError: If `model` is not a Keras model or `observer` not a
            `GradientObserver`.
    """
    if not isinstance(model, keras.Model):
        raise invalid("model", model, "a Keras model")
    _check_observer(observer)
    guard = find_guard(getattr(model, "optimizer", None))
    if guard is not None and guard.remove_observer(observer):
        if getattr(model, "train_function", None) is not None:
            model.make_train_function(force=True)
        return True
    return False


class ModelObservers:
    """The observers one callback attached, one per model it met.

    A callback keeps one of these and calls `attach(model, make)` at the
    start of each `fit`: the observer it attached for that model before is
    used again (no new variables, no retrace), and a new one is made with
    `make()` only for a model met for the first time (or whose guard was
    replaced, e.g. by compiling again: the old guard's observer is removed
    from it). So a callback given to several models, or to many `fit` calls,
    leaves exactly one observer on each model's guard. Models are held
    weakly.
    """

    def __init__(self):
        self._by_model = weakref.WeakKeyDictionary()  # model -> (observer, guard)

    def get(self, model):
        """The observer attached for `model`, or `None`."""
        entry = self._by_model.get(model)
        return entry[0] if entry is not None else None

    def attach(self, model, make, **guard_kwargs):
        """Attaches the observer for `model` (made by `make()` if new).

        Args:
            model: The compiled model.
            make: Zero-argument function returning a new `GradientObserver`.
            **guard_kwargs: `attach_observer`'s guard arguments.

        Returns:
            Tuple `(guard, observer)`.
        """
        entry = self._by_model.get(model)
        guard = find_guard(getattr(model, "optimizer", None))
        observer = None
        if entry is not None:
            observer, old_guard = entry
            if old_guard is not guard:  # compiled again, or the guard replaced
                old_guard.remove_observer(observer)
                observer = None
        if observer is None:
            observer = make()
        guard = attach_observer(model, observer, **guard_kwargs)
        self._by_model[model] = (observer, guard)
        return guard, observer

    def detach(self):
        """Removes every observer attached from its model's guard.

        A later `attach` adds the same observer again.

        Returns:
            Whether any was attached.
        """
        detached = False
        for model, (observer, _) in list(self._by_model.items()):
            detached = detach_observer(model, observer) or detached
        return detached
