"""`AdaptiveClipping`: GuardedOptimizer's clipping for users who add a callback."""

import keras
from keras import ops
from keras.src.utils import io_utils  # Keras' print_msg (no public alias)

from keras_stability import clipping as clipping_module
from keras_stability.optimizers.guarded_optimizer import GuardedOptimizer
from keras_stability.optimizers.guarded_optimizer import ensure_guarded

__all__ = ["AdaptiveClipping"]

_LOGGED = ("grad_norm", "clip_threshold")


def _add_statistics_to_logs(model, optimizer, names):
    """Makes `train_step` return `optimizer.<name>` for each name in its logs.

    The values are read in-graph right after the update, so they reach
    `History`, the progress bar, `CSVLogger` and `TensorBoard` like metrics.
    Returns whether `train_step` was changed (the train function must then be
    traced again).
    """
    current = model.train_step
    if getattr(current, "_keras_stability_logged", None) == (id(optimizer), names):
        return False
    original = getattr(current, "_keras_stability_original", current)

    def train_step(data):
        logs = dict(original(data))
        for name in names:
            logs[name] = ops.cast(getattr(optimizer, name), "float32")
        return logs

    train_step._keras_stability_logged = (id(optimizer), names)
    train_step._keras_stability_original = original
    model.train_step = train_step
    return True


@keras.saving.register_keras_serializable(package="keras_stability")
class AdaptiveClipping(keras.callbacks.Callback):
    """Adds adaptive gradient clipping to `fit` with a callback.

    At the start of training the callback wraps the compiled optimizer in a
    `keras_stability.optimizers.GuardedOptimizer` (inside the
    `LossScaleOptimizer` under mixed precision), so clipping and step skipping
    run in the compiled step on the all-reduced gradient, and adds the
    per-step `grad_norm` and `clip_threshold` to the training logs. The model
    keeps the wrapper afterwards (a saved model reloads with it and its
    state); the same callback can be passed to several `fit` calls. With
    `verbose=1` it says what it did.

    Args:
        policy: A `keras_stability.clipping` policy (`GlobalNorm`, `AutoClip`,
            `ZClip`, `AGC`), a positive number (`GlobalNorm`) or `None` (no
            clipping, only skipping and statistics).
        skip_nonfinite: Skip steps with NaN/Inf gradients. Defaults to `True`.
        skip_spikes: `None`, `True` or a `SpikeSkipping`. Defaults to `None`.
        log_statistics: Add `grad_norm` and `clip_threshold` to the logs.
            Defaults to `True`.
        verbose: 0 (silent) or 1 (one line when the optimizer is wrapped).
            Defaults to `1`.

    Raises:
        ValueError: at construction for an invalid policy; at the start of
            training if the optimizer already clips (`clipnorm`,
            `global_clipnorm`, `clipvalue`) or is a GuardedOptimizer with a
            different configuration.

    Example:

    ```python
    model.compile(optimizer="adam", loss="mse")
    history = model.fit(x, y, callbacks=[AdaptiveClipping(ZClip())])
    history.history["grad_norm"]
    ```
    """

    def __init__(
        self,
        policy,
        skip_nonfinite=True,
        skip_spikes=None,
        log_statistics=True,
        verbose=1,
    ):
        super().__init__()
        self.policy = clipping_module.get_policy("clipping", policy)
        self.skip_nonfinite = skip_nonfinite
        self.skip_spikes = skip_spikes
        self.log_statistics = bool(log_statistics)
        if verbose not in (0, 1, True, False):
            raise ValueError(
                "Invalid value for argument `verbose`. Expected 0 or 1. "
                f"Received: verbose={verbose!r}"
            )
        self.verbose = int(verbose)
        self.optimizer = None

    def on_train_begin(self, logs=None):
        model = self.model
        current = model.optimizer
        if isinstance(current, keras.optimizers.LossScaleOptimizer):
            current = current.inner_optimizer
        was_guarded = isinstance(current, GuardedOptimizer)
        self.optimizer = ensure_guarded(
            model,
            clipping=self.policy,
            skip_nonfinite=self.skip_nonfinite,
            skip_spikes=self.skip_spikes,
        )
        if self.log_statistics and _add_statistics_to_logs(
            model, self.optimizer, _LOGGED
        ):
            model.make_train_function(force=True)
        if self.verbose and not was_guarded:
            io_utils.print_msg(
                f"AdaptiveClipping: wrapped optimizer '{current.name}' in "
                f"GuardedOptimizer(clipping={self.policy!r}, "
                f"skip_nonfinite={self.skip_nonfinite}, "
                f"skip_spikes={self.optimizer.skip_spikes!r}); it acts on the "
                "all-reduced gradient inside the train step"
                + (
                    " and logs grad_norm and clip_threshold."
                    if self.log_statistics
                    else "."
                )
            )

    def get_config(self):
        return {
            "policy": None
            if self.policy is None
            else keras.saving.serialize_keras_object(self.policy),
            "skip_nonfinite": self.skip_nonfinite,
            "skip_spikes": self.skip_spikes
            if self.skip_spikes in (None, True, False)
            else keras.saving.serialize_keras_object(self.skip_spikes),
            "log_statistics": self.log_statistics,
            "verbose": self.verbose,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("policy"), dict):
            config["policy"] = keras.saving.deserialize_keras_object(config["policy"])
        if isinstance(config.get("skip_spikes"), dict):
            config["skip_spikes"] = keras.saving.deserialize_keras_object(
                config["skip_spikes"]
            )
        return cls(**config)
