"""`AdaptiveClipping`: GuardedOptimizer's clipping for users who add a callback."""

import keras
from keras import ops

from keras_stability import _keras_internals
from keras_stability import clipping as clipping_module
from keras_stability._checks import check_bool
from keras_stability._checks import check_verbose
from keras_stability.callbacks.step_logs import COUNTS
from keras_stability.callbacks.step_logs import StepLogs
from keras_stability.optimizers.attach import check_optimizer_argument
from keras_stability.optimizers.attach import ensure_guarded
from keras_stability.optimizers.attach import find_guard
from keras_stability.optimizers.attach import guarded_attribute
from keras_stability.optimizers.attach import log_prefix
from keras_stability.optimizers.attach import watch_optimizer_loads
from keras_stability.optimizers.guarded_optimizer import _get_spike_skipping

__all__ = ["AdaptiveClipping"]

# Counters, printed as integers by the progress bar.
_COUNTS = ("steps_clipped", "steps_skipped")
_SKIP_COUNTERS = (
    "steps_skipped_nonfinite",
    "steps_skipped_spike",
    "steps_skipped_requested",
)


def _statistics(model, optimizer, which=None):
    """The guard's statistics as logged, read in the compiled step.

    (A step the guard skipped leaves Keras' loss tracker, and the logged
    `loss` is the mean over the applied steps: `StepLogs` does it once per
    step for all our callbacks, `step_logs.drop_skipped_step`.)

    Nothing once `model` was compiled again with another optimizer: the
    wrapped `train_step` stays on the model, and is traced again then.
    """

    def values():
        if find_guard(model, which) is not optimizer:
            return {}

        def read(name):
            return ops.cast(getattr(optimizer, name), "float32")

        prefix = log_prefix(which or "optimizer")
        return {
            f"{prefix}grad_norm": read("grad_norm"),
            f"{prefix}clip_threshold": read("clip_threshold"),
            f"{prefix}steps_clipped": read("steps_clipped"),
            f"{prefix}steps_skipped": sum(read(name) for name in _SKIP_COUNTERS),
        }

    return values


def _nothing(logs):
    """`AdaptiveClipping`'s per-call host hook: nothing to do."""


@keras.saving.register_keras_serializable(package="keras_stability")
class AdaptiveClipping(keras.callbacks.Callback):
    """Adds adaptive gradient clipping to `fit` with a callback.

    At the start of training the callback wraps the compiled optimizer in a
    `keras_stability.optimizers.GuardedOptimizer` (inside the
    `LossScaleOptimizer` under mixed precision), so clipping and step skipping
    run in the compiled step on the all-reduced gradient. With
    `log_statistics`, the compiled step also returns the guard's per-step
    `grad_norm` (pre-clip) and `clip_threshold` and its running counts
    `steps_clipped` and `steps_skipped` (all reasons), so they reach every
    callback's logs (`History`, `CSVLogger`, `TensorBoard`, the progress bar,
    which prints the counts as integers), whatever the order of the
    callbacks. The model keeps the wrapper afterwards (a saved model reloads
    with it and its state); the same callback can be passed to several `fit`
    calls.

    Args:
        clipping: A `keras_stability.clipping` policy (`GlobalNorm`,
            `AutoClip`, `ZClip`, `AGC`), a positive number (`GlobalNorm`) or
            `None` (no clipping, only skipping and statistics), as
            `GuardedOptimizer(clipping=...)`.
        skip_nonfinite: Skip steps with NaN/Inf gradients. Defaults to `True`.
        skip_spikes: `None`, `True` or a `SpikeSkipping`. Defaults to `None`.
        log_statistics: Add the statistics above to the logs.
            Defaults to `True`.
        verbose: 0 (silent) or 1 (one line when the optimizer is wrapped).
            Defaults to `0`.
        optimizer: Which optimizer to guard: `None` (`model.optimizer`), an
            optimizer the model holds, or the name of the model attribute
            holding it, for a model with several optimizers (the keras.io
            GAN's `"d_optimizer"`; use one callback per optimizer, each
            logging under its attribute: `d_optimizer/grad_norm`). An
            instance is a runtime attachment: `get_config` gives `None` for
            it. Defaults to `None`.

    After `on_train_begin`, `self.guard` is the `GuardedOptimizer`.

    Raises:
        ValueError: at construction for an invalid argument; at the start of
            training if the optimizer already clips (`clipnorm`,
            `global_clipnorm`, `clipvalue`) or is a GuardedOptimizer with a
            different configuration, or if which optimizer to guard is
            unknown: `model.optimizer` is `None`, or the model overrides
            `train_step` and holds other optimizers (the message names them
            and the `optimizer=` to pass).

    Example:

    ```python
    model.compile(optimizer="adam", loss="mse")
    history = model.fit(x, y, callbacks=[AdaptiveClipping(ZClip())])
    history.history["grad_norm"]
    ```
    """

    def __init__(
        self,
        clipping,
        skip_nonfinite=True,
        skip_spikes=None,
        log_statistics=True,
        verbose=0,
        optimizer=None,
    ):
        super().__init__()
        self.clipping = clipping_module.get_policy("clipping", clipping)
        self.skip_nonfinite = check_bool("skip_nonfinite", skip_nonfinite)
        spikes = _get_spike_skipping(skip_spikes)  # validates
        self.skip_spikes = skip_spikes if skip_spikes in (None, True, False) else spikes
        self.log_statistics = check_bool("log_statistics", log_statistics)
        self.verbose = check_verbose("verbose", verbose)
        self.optimizer = check_optimizer_argument("optimizer", optimizer)
        self.guard = None

    def set_model(self, model):
        super().set_model(model)
        # Before any callback's `on_train_begin` (a BackupAndRestore listed
        # first restores there, before we wrap the optimizer).
        watch_optimizer_loads(model)
        StepLogs.of(model).expect(self)  # in this fit (`StepLogs.enter`)

    def _model_state(self, model):
        # Nothing of its own on `model` (its statistics are the guard's): a
        # later instance of the same configuration takes over its place in
        # the step (see `StepLogs.enter`), with no retrace.
        return None

    def _set_model_state(self, model, state):
        pass

    def on_train_begin(self, logs=None):
        model = self.model
        StepLogs.of(model).enter(self)  # drops an earlier fit's instances
        attribute = guarded_attribute(model, self.optimizer)
        self._log_prefix = log_prefix(attribute)
        if self._log_prefix:  # its counts print as integers too
            _keras_internals.print_as_integers(
                model, [self._log_prefix + k for k in COUNTS]
            )
        current = getattr(model, attribute)
        if isinstance(current, keras.optimizers.LossScaleOptimizer):
            current = current.inner_optimizer
        was_guarded = find_guard(current) is not None
        self.guard = ensure_guarded(
            model,
            clipping=self.clipping,
            skip_nonfinite=self.skip_nonfinite,
            skip_spikes=self.skip_spikes,
            optimizer=attribute,
        )
        step_logs = StepLogs.of(model)
        # Without statistics, no values: the step still takes the skipped
        # steps out of Keras' epoch loss (`StepLogs`).
        if step_logs.set_graph_values(
            ("AdaptiveClipping", id(self.guard), self.log_statistics),
            _statistics(model, self.guard, attribute)
            if self.log_statistics
            else lambda: {},
            owner=self,
        ):
            model.make_train_function(force=True)
        # No per-step work on the host; attached so that `StepLogs` sees the
        # end of each epoch (an epoch with no applied step logs NaN).
        step_logs.attach(self, _nothing, self.params)
        if self.verbose and not was_guarded:
            _keras_internals.print_msg(
                f"AdaptiveClipping: wrapped optimizer '{current.name}' in "
                f"GuardedOptimizer(clipping={self.clipping!r}, "
                f"skip_nonfinite={self.skip_nonfinite}, "
                f"skip_spikes={self.guard.skip_spikes!r}); it acts on the "
                "all-reduced gradient inside the train step"
                + (
                    " and logs grad_norm, clip_threshold, steps_clipped and "
                    "steps_skipped."
                    if self.log_statistics
                    else "."
                )
            )

    def _show_counts(self, logs):
        if logs is not None:
            prefix = getattr(self, "_log_prefix", "")
            keys = [prefix + k for k in _COUNTS]
            logs.update(
                {k: _keras_internals.LoggedInt(logs[k]) for k in keys if k in logs}
            )

    def on_epoch_begin(self, epoch, logs=None):
        StepLogs.of(self.model).start_epoch(epoch)

    def on_train_batch_end(self, batch, logs=None):
        self._show_counts(logs)

    def on_train_end(self, logs=None):
        StepLogs.of(self.model).detach(self)

    def on_epoch_end(self, epoch, logs=None):
        self._show_counts(logs)

    def get_config(self):
        return {
            "clipping": None
            if self.clipping is None
            else keras.saving.serialize_keras_object(self.clipping),
            "skip_nonfinite": self.skip_nonfinite,
            "skip_spikes": self.skip_spikes
            if self.skip_spikes in (None, True, False)
            else keras.saving.serialize_keras_object(self.skip_spikes),
            "log_statistics": self.log_statistics,
            "verbose": self.verbose,
            "optimizer": self.optimizer if isinstance(self.optimizer, str) else None,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("clipping"), dict):
            config["clipping"] = keras.saving.deserialize_keras_object(
                config["clipping"]
            )
        if isinstance(config.get("skip_spikes"), dict):
            config["skip_spikes"] = keras.saving.deserialize_keras_object(
                config["skip_spikes"]
            )
        return cls(**config)
