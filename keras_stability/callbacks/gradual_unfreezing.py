"""`GradualUnfreezing`: unfreeze a fine-tuned model's layers from the top down."""

import keras

from keras_stability import _keras_internals
from keras_stability._checks import check_positive_int
from keras_stability._checks import check_verbose
from keras_stability._checks import invalid
from keras_stability._checks import is_integer
from keras_stability.callbacks.step_logs import StepLogs
from keras_stability.callbacks.step_logs import counts

__all__ = ["GradualUnfreezing", "unfrozen_count"]


def unfrozen_count(schedule, epoch):
    """How many scheduled layers are trainable at `epoch` (0-based).

    Args:
        schedule: An int `k` (one more layer every `k` epochs, the first at
            epoch `k`), a dict `{epoch: count}` (the count of the largest
            key <= `epoch`, 0 before the first key), or a function
            `epoch -> count`.
        epoch: Epoch index, from 0.

    Returns:
        A non-negative int.
    """
    if isinstance(schedule, dict):
        keys = [k for k in schedule if k <= epoch]
        return int(schedule[max(keys)]) if keys else 0
    if callable(schedule):
        return max(0, int(schedule(epoch)))
    return epoch // schedule


def _check_schedule(schedule):
    if isinstance(schedule, dict):
        good = schedule and all(
            is_integer(k) and k >= 0 and is_integer(v) and v >= 0
            for k, v in schedule.items()
        )
        if not good:
            raise ValueError(
                "Invalid value for argument `schedule`. Expected a non-empty dict "
                "{epoch: number of layers unfrozen} of non-negative integers. "
                f"Received: schedule={schedule!r}"
            )
        return {int(k): int(v) for k, v in schedule.items()}
    if callable(schedule):
        return schedule
    try:
        return check_positive_int("schedule", schedule)
    except ValueError:
        raise ValueError(
            "Invalid value for argument `schedule`. Expected a positive integer "
            "(epochs per unfrozen layer), a dict {epoch: number of layers "
            f"unfrozen}} or a function. Received: schedule={schedule!r}"
        ) from None


class GradualUnfreezing(keras.callbacks.Callback):
    """Unfreezes layers from the top down on an epoch schedule, inside one `fit`.

    ULMFiT's recipe for fine-tuning: train the new head first, then unfreeze
    the top pretrained layer, then the next, so that early noisy gradients of
    the head do not wreck the pretrained features. No recompiling: at each
    change the callback sets `layer.trainable = True` and re-traces the train
    step. The optimizer is built once over the weights of all scheduled
    layers, so layers already training keep their optimizer state (moments,
    step count) when more layers join.

    If `fit` built the optimizer over the initially trainable weights only
    (Keras does this before callbacks run), the callback replaces it at the
    start of training by a fresh optimizer of the same config built over all
    scheduled weights; this is only possible before the first step, otherwise
    a `ValueError` says to compile with a fresh optimizer.

    Args:
        schedule: An int `k`: one more layer every `k` epochs (the first at
            epoch `k`); a dict `{epoch: number of layers unfrozen}`; or a
            function `epoch -> number of layers unfrozen`. Layers are never
            re-frozen during a `fit`.
        layers: The layers to unfreeze, bottom to top, as layer objects or
            names; `None` takes the layers of the model that have weights and
            are frozen when `fit` starts. Defaults to `None`.
        verbose: `0` quiet, `1` prints a line per unfrozen layer.
            Defaults to `0`.

    The number of layers unfrozen is in the epoch logs as `unfrozen_layers`
    (for every callback, whatever the order, when the steps per epoch are
    known).

    Raises:
        ValueError: On a bad `schedule`, an unknown layer name, or an
            optimizer that already took steps without the frozen weights.

    Example:

    >>> backbone = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16),
    ...                              keras.layers.Dense(16)])
    >>> for layer in backbone.layers:
    ...     layer.trainable = False
    >>> model = keras.Sequential([backbone, keras.layers.Dense(3)])
    >>> callback = GradualUnfreezing(1, layers=backbone.layers)

    Reference:
        Howard and Ruder, "Universal Language Model Fine-tuning for Text
        Classification" (ULMFiT), 2018.
    """

    def __init__(self, schedule, layers=None, verbose=0):
        super().__init__()
        self.schedule = _check_schedule(schedule)
        if layers is not None:
            ok = (
                isinstance(layers, (list, tuple))
                and len(layers) > 0
                and all(
                    isinstance(layer, (str, keras.layers.Layer)) for layer in layers
                )
            )
            if not ok:
                raise invalid(
                    "layers",
                    layers,
                    "None or a non-empty list of Keras layers or layer names",
                )
            layers = list(layers)
        self.layers = layers
        self.verbose = check_verbose("verbose", verbose)
        self._scheduled = []
        self._count = 0

    def _resolve_layers(self):
        if self.layers is None:
            return [
                layer
                for layer in self.model.layers
                if layer.weights and not layer.trainable
            ]
        resolved = []
        for layer in self.layers:
            if isinstance(layer, str):
                found = [
                    sub
                    for sub in _keras_internals.flatten_layers(
                        self.model, include_self=False
                    )
                    if sub.name == layer
                ]
                if not found:
                    raise ValueError(
                        "Invalid value for argument `layers`. Expected names of "
                        f"layers of the model. Received: unknown layer {layer!r}"
                    )
                layer = found[0]
            resolved.append(layer)
        return resolved

    def _all_variables(self):
        states = [layer.trainable for layer in self._scheduled]
        for layer in self._scheduled:
            layer.trainable = True
        variables = list(self.model.trainable_variables)
        for layer, state in zip(self._scheduled, states, strict=True):
            layer.trainable = state
        return variables

    def _ensure_optimizer_knows(self, variables):
        optimizer = self.model.optimizer
        if optimizer.built:
            missing = [
                v
                for v in variables
                if not _keras_internals.optimizer_has_variable(optimizer, v)
            ]
            if not missing:
                return
            if int(optimizer.iterations.numpy()) > 0:
                raise ValueError(
                    "Invalid optimizer for `GradualUnfreezing`: it has taken "
                    f"{int(optimizer.iterations.numpy())} steps without the weights "
                    f"of the frozen layers ({missing[0].path}, ...). Compile with a "
                    "fresh optimizer before the `fit` that unfreezes layers."
                )
            with self.model.distribute_strategy.scope():
                optimizer = optimizer.__class__.from_config(optimizer.get_config())
            self.model.optimizer = optimizer
        with self.model.distribute_strategy.scope():
            optimizer.build(variables)

    def _apply(self, count, epoch):
        count = min(count, len(self._scheduled))
        if count <= self._count:
            return
        newly = self._scheduled[
            len(self._scheduled) - count : len(self._scheduled) - self._count
        ]
        for layer in reversed(newly):
            layer.trainable = True
            if self.verbose:
                _keras_internals.print_msg(
                    f"\nEpoch {epoch + 1}: GradualUnfreezing unfroze layer {layer.name!r}."
                )
        self._count = count
        self.model.make_train_function(force=True)

    def on_train_begin(self, logs=None):
        self._scheduled = self._resolve_layers()
        self._count = 0
        for layer in self._scheduled:
            layer.trainable = False
        self._ensure_optimizer_knows(self._all_variables())
        self.model.make_train_function(force=True)
        self._step_logs = StepLogs.of(self.model)
        self._step_logs.attach(self, self._after_step, self.params)

    def on_epoch_begin(self, epoch, logs=None):
        self._step_logs.start_epoch(epoch)
        self._apply(unfrozen_count(self.schedule, epoch), epoch)

    def _after_step(self, logs):
        if self._step_logs.epoch_end:
            logs["unfrozen_layers"] = self._count

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(counts({"unfrozen_layers": self._count}))

    def on_train_end(self, logs=None):
        self._step_logs.detach(self)
