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
import warnings
import weakref

import keras
import numpy as np

from keras_stability import _keras_internals
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
    "check_optimizer_argument",
    "detach_observer",
    "ensure_guarded",
    "find_guard",
    "guarded_attribute",
    "log_prefix",
]


def check_optimizer_argument(name, value):
    """Validates a callback's `optimizer=` argument (at construction).

    Args:
        name: The argument's name, for the message.
        value: `None` (the model's `optimizer`), a Keras 3
            `keras.optimizers.Optimizer` held by the model, or the name of the
            model attribute that holds it (e.g. `"d_optimizer"`).

    Returns:
        `value`.

    Raises:
        ValueError: For anything else (an empty or non-identifier string).
    """
    if value is None or isinstance(value, keras.optimizers.Optimizer):
        return value
    if isinstance(value, str) and value.isidentifier():
        return value
    raise invalid(
        name,
        value,
        "None, a keras.optimizers.Optimizer held by the model, or the name of "
        "the model attribute holding it (e.g. 'd_optimizer')",
    )


def _optimizer_attributes(model):
    """`{name: optimizer}` of the model's public attributes holding an optimizer."""
    found = {}
    for name, value in vars(model).items():
        if not name.startswith("_") and isinstance(value, keras.optimizers.Optimizer):
            found[name] = value
    optimizer = getattr(model, "optimizer", None)
    if isinstance(optimizer, keras.optimizers.Optimizer):
        found.setdefault("optimizer", optimizer)
    return found


def _overrides_train_step(model):
    return type(model).train_step is not keras.Model.train_step


def _model_name(model):
    return getattr(model, "name", type(model).__name__)


def log_prefix(attribute):
    """The prefix of a callback's log keys for the optimizer it watches.

    `""` for the model's compiled `optimizer`; for another one (a GAN's
    `d_optimizer`), its attribute and a slash (`"d_optimizer/grad_norm"`),
    so that one callback per optimizer logs each optimizer's values under
    its own keys.
    """
    return "" if attribute == "optimizer" else f"{attribute}/"


def guarded_attribute(model, optimizer=None):
    """The name of the model attribute holding the optimizer to guard.

    Args:
        model: A Keras model.
        optimizer: `None`, an optimizer the model holds (or one wrapped in
            it, e.g. a guard's inner optimizer), or an attribute name.
            Defaults to `None`.

    Returns:
        The attribute name (`"optimizer"` for the compiled one).

    Raises:
        ValueError: If `model` is not a Keras model; if `optimizer` names no
            optimizer of the model; if `optimizer` is `None` and
            `model.optimizer` is `None`, or the model overrides `train_step`
            and holds other optimizers (`model.optimizer` may then be unused:
            the keras.io GAN compiles with its own `d_optimizer` and
            `g_optimizer`). The message names the attributes found and the
            argument to pass.
    """
    if not isinstance(model, keras.Model):
        raise invalid("model", model, "a compiled Keras model (with an optimizer)")
    optimizer = check_optimizer_argument("optimizer", optimizer)
    found = _optimizer_attributes(model)
    listing = ", ".join(f"`{k}`" for k in found) or "none"
    if isinstance(optimizer, str):
        if not isinstance(getattr(model, optimizer, None), keras.optimizers.Optimizer):
            raise invalid(
                "optimizer",
                optimizer,
                f"the name of an attribute of model '{_model_name(model)}' holding "
                f"a keras.optimizers.Optimizer (found: {listing})",
            )
        return optimizer
    if optimizer is not None:
        for name, value in found.items():
            if any(o is optimizer for o in optimizer_chain(value)):
                return name
        raise invalid(
            "optimizer",
            getattr(optimizer, "name", optimizer),
            f"an optimizer held by model '{_model_name(model)}' (its optimizer "
            f"attributes: {listing})",
        )
    others = [k for k in found if k != "optimizer"]
    hint = (
        f"pass `optimizer=` naming the one to guard, e.g. optimizer='{others[0]}'"
        if others
        else "compile the model with an optimizer, or pass `optimizer=` naming "
        "the model attribute that holds the optimizer its train_step uses"
    )
    if getattr(model, "optimizer", None) is None and not others:
        raise invalid(
            "model",
            _model_name(model),
            "a compiled Keras model (with an optimizer), or `optimizer=` naming "
            "the model attribute that holds the optimizer its train_step uses",
        )
    if getattr(model, "optimizer", None) is None:
        raise ValueError(
            f"Model '{_model_name(model)}' has no compiled optimizer "
            f"(`model.optimizer` is None); optimizer attributes found: "
            f"{listing}. Which optimizer to guard is unknown: {hint}."
        )
    if others and _overrides_train_step(model):
        raise ValueError(
            f"Model '{_model_name(model)}' overrides `train_step` and holds "
            f"optimizers other than `model.optimizer`: "
            + ", ".join(f"`{k}`" for k in others)
            + ". Its train_step may never use `model.optimizer` (the keras.io "
            f"GAN does not), so which one to guard is unknown: {hint} (one "
            "callback per optimizer), or optimizer='optimizer' for the "
            "compiled one."
        )
    return "optimizer"


def find_guard(model_or_optimizer, optimizer=None):
    """The `GuardedOptimizer` in an optimizer's wrapper chain, or `None`.

    Args:
        model_or_optimizer: An optimizer (its wrapper chain is searched), or
            a Keras model: then `optimizer` says which of its optimizers.
        optimizer: For a model, `None` (`model.optimizer`), an optimizer it
            holds or the attribute name (as the callbacks' `optimizer=`).
            Defaults to `None`.

    Returns:
        The `GuardedOptimizer`, or `None` (also for a model attribute that
        holds no optimizer).
    """
    if isinstance(model_or_optimizer, keras.Model):
        model = model_or_optimizer
        if optimizer is None or isinstance(optimizer, str):
            optimizer = getattr(model, optimizer or "optimizer", None)
        else:
            for value in _optimizer_attributes(model).values():
                if any(o is optimizer for o in optimizer_chain(value)):
                    optimizer = value
                    break
    else:
        optimizer = model_or_optimizer
    for opt in optimizer_chain(optimizer):
        if isinstance(opt, GuardedOptimizer):
            return opt
    return None


def _strategy_scope(model):
    strategy = getattr(model, "distribute_strategy", None)
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def ensure_guarded(
    model, clipping=None, skip_nonfinite=None, skip_spikes=None, optimizer=None
):
    """Makes the model's optimizer a `GuardedOptimizer` and returns it.

    Which optimizer: `model.optimizer`, or the one `optimizer` names (a model
    with several optimizers, such as the keras.io GAN's `d_optimizer` and
    `g_optimizer`: the guard replaces that attribute).

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
        optimizer: `None` (`model.optimizer`), an optimizer the model holds,
            or the name of the model attribute holding it (e.g.
            `"d_optimizer"`). Defaults to `None`.

    Returns:
        The `GuardedOptimizer`.

    Raises:
        ValueError: if the model is not compiled, if `clipping` is asked
            for and the optimizer clips by itself (`clipnorm`,
            `global_clipnorm`, `clipvalue`; without `clipping` its own
            clipping is kept), if an argument is invalid, if the optimizer is already
            guarded with a different policy, spike skipping or
            `skip_nonfinite`, or if which optimizer to guard is unknown (see
            `guarded_attribute`: `model.optimizer` is `None`, or the model
            overrides `train_step` and holds other optimizers).
    """
    attribute = guarded_attribute(model, optimizer)
    clipping = clipping_module.get_policy("clipping", clipping)
    # `True` asks for spike skipping (an existing guard's is kept), an
    # instance for those settings.
    spikes_asked = skip_spikes is True
    skip_spikes = _get_spike_skipping(skip_spikes)
    if skip_nonfinite is not None:
        skip_nonfinite = check_bool("skip_nonfinite", skip_nonfinite)
    optimizer = getattr(model, attribute)
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
                changed = (
                    optimizer.set_skip_spikes(True if spikes_asked else skip_spikes)
                    or changed
                )
            if changed:  # its saved layout may match the state skipped now
                _load_skipped_state(optimizer)
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
        setattr(model, attribute, guarded)
    compile_config = getattr(model, "_compile_config", None)
    if (
        attribute == "optimizer"
        and compile_config is not None
        and "optimizer" in compile_config.config
    ):
        compile_config.config["optimizer"] = guarded
    if optimizer.built:
        if attribute == "optimizer" and getattr(model, "built", False):
            variables = model.trainable_variables
        else:  # the variables the optimizer was built for (a GAN's half)
            variables = list(optimizer._trainable_variables)
        with _strategy_scope(model):
            guarded.build(variables)
            _load_skipped_state(guarded)
    if getattr(model, "train_function", None) is not None:
        model.make_train_function(force=True)
    return guarded


def strip_guard(model, optimizer=None):
    """Puts back the optimizer a `GuardedOptimizer` wraps, with its state.

    The library's callbacks (`GradientExplosionDetector`, `GradientMonitor`,
    `AdaptiveClipping`) wrap the model's optimizer in a `GuardedOptimizer`
    and leave it there after `fit` (its counters and the clipping and spike
    statistics go on over later fits). A `.keras` file saved then names that
    class: it loads where `keras_stability` is imported, and nowhere else
    (Keras: "Could not locate class 'GuardedOptimizer'"). As TF-MOT's
    `strip_pruning` before export, `strip_guard(model)` makes the model's
    optimizer (and its compile config) the wrapped one again, with its state
    (iterations, moments): a file saved afterwards loads with Keras alone,
    and training resumes where it was. Under a `LossScaleOptimizer` (mixed
    precision) the guard inside it is taken out. A learning-rate schedule
    the detector lowered (`ScaledSchedule`) becomes the Keras schedule it
    equals, its rates multiplied by the factor (one of Keras' own schedules;
    for any other it stays, with a warning). A later `fit` with the
    callbacks wraps the optimizer again (the guard's counters start over).
    A model whose optimizer is not guarded is left as it is.

    Args:
        model: A compiled Keras model.
        optimizer: Which of the model's optimizers, as in `ensure_guarded`:
            `None` (`model.optimizer`), an optimizer it holds or the name of
            the model attribute holding it. Defaults to `None`.

    Returns:
        The optimizer the model holds now (the one the guard wrapped, or the
        model's own if it had no guard).

    Raises:
        ValueError: If `model` is not a Keras model, or `optimizer` names no
            optimizer of the model.

    Example:

    >>> model.fit(x, y, callbacks=[GradientExplosionDetector()])
    >>> strip_guard(model)  # model.optimizer is the Adam compiled
    >>> model.save("model.keras")  # loads without keras_stability
    """
    if not isinstance(model, keras.Model):
        raise invalid("model", model, "a Keras model")
    optimizer = check_optimizer_argument("optimizer", optimizer)
    attribute = (
        "optimizer" if optimizer is None else guarded_attribute(model, optimizer)
    )
    outer = getattr(model, attribute, None)
    guard = find_guard(outer) if outer is not None else None
    if guard is None:
        return outer
    inner = guard.inner_optimizer
    if outer is guard:
        setattr(model, attribute, inner)
        held = inner
    else:  # a LossScaleOptimizer around the guard
        outer.inner_optimizer = inner
        held = outer
    _unscale_schedule(inner)
    compile_config = getattr(model, "_compile_config", None)
    if (
        attribute == "optimizer"
        and compile_config is not None
        and compile_config.config.get("optimizer") is guard
    ):
        compile_config.config["optimizer"] = held
    if getattr(model, "train_function", None) is not None:
        model.make_train_function(force=True)
    return held


def _unscale_schedule(optimizer):
    """Replaces a `ScaledSchedule` (the detector's lowering of a schedule) by
    the Keras schedule it equals, or warns that the file will need
    `keras_stability` when there is none."""
    from keras_stability.callbacks.lr_scaling import ScaledSchedule
    from keras_stability.callbacks.lr_scaling import innermost_optimizer
    from keras_stability.callbacks.lr_scaling import keras_equivalent

    target = innermost_optimizer(optimizer)
    schedule = _keras_internals.learning_rate_object(target)
    if not isinstance(schedule, ScaledSchedule):
        return
    equivalent = keras_equivalent(schedule)
    if equivalent is None:
        warnings.warn(
            "strip_guard: the optimizer's learning rate is a keras_stability "
            f"`ScaledSchedule` of a `{type(schedule.schedule).__name__}`, which "
            "has no equal among Keras' own schedules; a file saved now needs "
            "`keras_stability` to load.",
            stacklevel=3,
        )
        return
    _keras_internals.set_learning_rate_object(target, equivalent)


def _check_observer(observer):
    if not isinstance(observer, GradientObserver):
        raise invalid(
            "observer", observer, "a keras_stability.optimizers.GradientObserver"
        )
    return observer


def attach_observer(
    model,
    observer,
    clipping=None,
    skip_nonfinite=None,
    skip_spikes=None,
    optimizer=None,
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
        optimizer: See `ensure_guarded`. Defaults to `None`.

    Returns:
        The `GuardedOptimizer`.

    Raises:
        ValueError: As `ensure_guarded`, or if `observer` is not a
            `GradientObserver`.
    """
    _check_observer(observer)
    guard = ensure_guarded(
        model,
        clipping=clipping,
        skip_nonfinite=skip_nonfinite,
        skip_spikes=skip_spikes,
        optimizer=optimizer,
    )
    if observer not in guard.observers:
        with _strategy_scope(model):
            guard.add_observer(observer)
        model.make_train_function(force=True)
    return guard


def detach_observer(model, observer, optimizer=None):
    """Removes `observer` from the model's guarded optimizer, if it is there.

    The train function is traced again, so the observer's statistics are no
    longer computed. The `GuardedOptimizer` itself stays.

    Args:
        model: A Keras model.
        observer: A `GradientObserver`.
        optimizer: Which of the model's optimizers, as in `ensure_guarded`.
            Defaults to `None`.

    Returns:
        Whether the observer was attached.

    Raises:
        ValueError: If `model` is not a Keras model or `observer` not a
            `GradientObserver`.
    """
    if not isinstance(model, keras.Model):
        raise invalid("model", model, "a Keras model")
    _check_observer(observer)
    optimizer = check_optimizer_argument("optimizer", optimizer)
    guard = find_guard(model, optimizer)
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
            **guard_kwargs: `attach_observer`'s guard arguments (with
                `optimizer`, which of the model's optimizers).

        Returns:
            Tuple `(guard, observer)`.
        """
        entry = self._by_model.get(model)
        guard = find_guard(model, guard_kwargs.get("optimizer"))
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

    def entry(self, model):
        """`(observer, guard)` attached for `model`, or `None` (to hand over)."""
        return self._by_model.get(model)

    def put(self, model, entry):
        """Takes over an `entry` of another instance (see `StepLogs.enter`);
        `None` forgets the model's."""
        if entry is None:
            self._by_model.pop(model, None)
        else:
            self._by_model[model] = entry

    def detach(self):
        """Removes every observer attached from its model's guard.

        A later `attach` adds the same observer again.

        Returns:
            Whether any was attached.
        """
        detached = False
        for model, (observer, guard) in list(self._by_model.items()):
            if guard.remove_observer(observer):
                detached = True
                if getattr(model, "train_function", None) is not None:
                    model.make_train_function(force=True)
        return detached


# The optimizer state a load skipped because the file holds a guard's layout:
# inner optimizer -> (what the file held, the optimizer's iterations then).
_SKIPPED_STATES = weakref.WeakKeyDictionary()


def watch_optimizer_loads(model):
    """Keeps the guard's state a load into the model's unwrapped optimizer skips.

    Our callbacks wrap the optimizer in their `on_train_begin`. A callback
    listed before them that restores a file saved with the guard in its own
    `on_train_begin` (`keras.callbacks.BackupAndRestore` resuming a run,
    the Keras docs' `callbacks=[BackupAndRestore(...)]` with ours appended)
    loads it into the optimizer not yet wrapped: Keras finds another number
    of variables and skips the whole optimizer state (moments, iterations)
    with a warning, and the resumed run silently starts its optimizer
    again. Called from the callbacks' `set_model`, before any
    `on_train_begin`, this makes the model's optimizer keep a copy of what
    such a load skipped; `ensure_guarded` loads it into the guard that wraps
    that optimizer, if the optimizer has not stepped since and the layouts
    match. Idempotent; a no-op for an optimizer already guarded.

    Args:
        model: A Keras model (its `optimizer`, or a `LossScaleOptimizer`'s
            inner one).
    """
    optimizer = getattr(model, "optimizer", None)
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    if (
        not isinstance(optimizer, keras.optimizers.Optimizer)
        or isinstance(
            optimizer, (GuardedOptimizer, keras.optimizers.LossScaleOptimizer)
        )
        or "load_own_variables" in vars(optimizer)
    ):
        return
    load = type(optimizer).load_own_variables
    target = weakref.ref(optimizer)

    def load_own_variables(store):
        opt = target()
        if opt.built and len(store.keys()) != len(opt.variables):
            _SKIPPED_STATES[opt] = (
                {key: np.array(store[key]) for key in store.keys()},
                int(_keras_internals.to_numpy(opt.iterations)),
            )
        return load(opt, store)

    optimizer.load_own_variables = load_own_variables


def _load_skipped_state(guard):
    """Loads into a (built) new guard the state a load skipped on its inner optimizer."""
    inner = guard.inner_optimizer
    entry = _SKIPPED_STATES.get(inner)
    if entry is None or not guard.built:
        return
    store, iterations = entry
    if int(_keras_internals.to_numpy(inner.iterations)) != iterations:
        del _SKIPPED_STATES[inner]  # trained since: the state is stale
        return
    core = guard._own_core_variables() + inner.variables
    if sum(key.isdigit() for key in store) != len(core):
        return  # another layout (a policy or spike skipping not given yet)
    del _SKIPPED_STATES[inner]
    guard.load_own_variables(store)
