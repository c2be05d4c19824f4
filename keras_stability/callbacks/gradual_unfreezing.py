"""`GradualUnfreezing`: unfreeze a fine-tuned model's layers from the top down."""

import keras

from keras_stability import _keras_internals
from keras_stability._checks import check_number
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


def discriminative_multipliers(num_layers, factor):
    """ULMFiT's per-layer rate multipliers, bottom to top.

    The top scheduled layer trains at `1 / factor` of the rate of the layers
    above it (the head), each lower layer at `1 / factor` of the one above.

    Args:
        num_layers: Number of scheduled layers.
        factor: The ratio between consecutive layers' rates.

    Returns:
        A list of `num_layers` floats, `factor ** -(num_layers - i)` for
        layer `i` from the bottom.
    """
    return [float(factor) ** -(num_layers - i) for i in range(num_layers)]


def _innermost(optimizer):
    """The optimizer that applies updates (through `GuardedOptimizer` etc.)."""
    while getattr(optimizer, "inner_optimizer", None) is not None:
        optimizer = optimizer.inner_optimizer
    return optimizer


def _scaled_apply(optimizer, original, multipliers):
    """`_backend_apply_gradients` with each variable's update scaled.

    `multipliers` maps `optimizer._var_key(variable)` to a float. The step
    runs as usual, then each listed variable becomes
    `old + multiplier * (new - old)`. The whole update (decoupled weight
    decay included) is linear in the learning rate for SGD (with momentum:
    the buffer does not depend on the weights), Adam and AdamW, so this is
    exactly training that variable at `multiplier` times the rate, where
    scaling the gradient is not (Adam divides its scale out).
    """

    def apply(grads, variables):
        scaled = []
        for variable in variables:
            multiplier = multipliers.get(optimizer._var_key(variable), 1.0)
            if multiplier != 1.0:
                scaled.append((variable, multiplier, keras.ops.copy(variable)))
        original(grads, variables)
        for variable, multiplier, old in scaled:
            step = keras.ops.subtract(variable, old)
            variable.assign(keras.ops.add(old, multiplier * step))

    return apply


@keras.saving.register_keras_serializable(package="keras_stability")
class GradualUnfreezing(keras.callbacks.Callback):
    """Unfreezes layers from the top down on an epoch schedule, inside one `fit`.

    ULMFiT's recipe for fine-tuning: train the new head first, then unfreeze
    the top pretrained layer, then the next, so that early noisy gradients of
    the head do not wreck the pretrained features. No recompiling: at each
    change the callback sets `layer.trainable = True` and re-traces the train
    step. The optimizer is built once over the weights of all scheduled
    layers, so layers already training keep their optimizer state (moments,
    step count) when more layers join.

    With `discriminative_factor` `f` > 1 (ULMFiT's discriminative
    fine-tuning, `f = 2.6` in the paper) the layers also train at different
    rates: the top scheduled layer at `1 / f` of the optimizer's rate (the
    head, the weights not scheduled, at the full rate), the one below at
    `1 / f**2`, and so on down. Each scheduled weight's update of a step is
    scaled by its multiplier after the optimizer computed it
    (`old + m * (new - old)`), which is exactly a per-layer learning rate for
    SGD, Adam and AdamW (their updates, weight decay included, are linear in
    the rate); scaling the gradients instead would do nothing under Adam. It
    works through `GuardedOptimizer` (the multipliers act on the optimizer
    it wraps; clipping and skipping see the unscaled gradients). Not
    supported under a multi-replica `tf.distribute` strategy, nor with the
    optimizer's `use_ema`.

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
        discriminative_factor: The ratio `f` >= 1 between the learning
            rates of consecutive scheduled layers (see above); `1.0` trains
            every layer at the optimizer's rate. Defaults to `1.0`.
        verbose: `0` quiet, `1` prints a line per unfrozen layer.
            Defaults to `0`.

    The number of layers unfrozen is in the epoch logs as `unfrozen_layers`
    (for every callback, whatever the order, when the steps per epoch are
    known).

    Raises:
        ValueError: On a bad `schedule` or `discriminative_factor`, an
            unknown layer name, an optimizer that already took steps without
            the frozen weights, or `discriminative_factor` > 1 under a
            multi-replica strategy or with `use_ema`.

    Example:

    >>> backbone = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16),
    ...                              keras.layers.Dense(16)])
    >>> for layer in backbone.layers:
    ...     layer.trainable = False
    >>> model = keras.Sequential([backbone, keras.layers.Dense(3)])
    >>> callback = GradualUnfreezing(1, layers=backbone.layers)
    >>> ulmfit = GradualUnfreezing(1, layers=backbone.layers,
    ...                            discriminative_factor=2.6)

    Reference:
        Howard and Ruder, "Universal Language Model Fine-tuning for Text
        Classification" (ULMFiT), 2018.
    """

    def __init__(self, schedule, layers=None, discriminative_factor=1.0, verbose=0):
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
        self.discriminative_factor = check_number(
            "discriminative_factor", discriminative_factor, low=1.0
        )
        self.verbose = check_verbose("verbose", verbose)
        self._scheduled = []
        self._count = 0
        self._patched = None

    def get_config(self):
        """The constructor arguments; layers as names, a function schedule as is."""
        layers = self.layers
        if layers is not None:
            layers = [
                layer if isinstance(layer, str) else layer.name for layer in layers
            ]
        return {
            "schedule": self.schedule,
            "layers": layers,
            "discriminative_factor": self.discriminative_factor,
            "verbose": self.verbose,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        schedule = config.get("schedule")
        if isinstance(schedule, dict):  # JSON turned the epochs into strings
            config["schedule"] = {
                int(k) if isinstance(k, str) and k.isdigit() else k: v
                for k, v in schedule.items()
            }
        return cls(**config)

    @property
    def multipliers(self):
        """`{variable path: rate multiplier}` of the scheduled weights in this `fit`.

        Empty when `discriminative_factor` is 1 or before `fit` starts.
        """
        return dict(getattr(self, "_multiplier_paths", {}))

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

    def _layer_variables(self):
        """Each scheduled layer's trainable weights once unfrozen, bottom to top."""
        states = [layer.trainable for layer in self._scheduled]
        out, seen = [], set()
        for layer in self._scheduled:
            layer.trainable = True
            own = [v for v in layer.trainable_variables if id(v) not in seen]
            seen.update(id(v) for v in own)
            out.append(own)
        for layer, state in zip(self._scheduled, states, strict=True):
            layer.trainable = state
        return out

    def _install_rates(self):
        self._remove_rates(retrace=False)  # a `fit` that ended by an exception
        self._multiplier_paths = {}
        if self.discriminative_factor == 1.0:
            return
        if self.model.distribute_strategy.num_replicas_in_sync > 1:
            raise ValueError(
                "`GradualUnfreezing(discriminative_factor=...)` does not support "
                "a multi-replica distribution strategy "
                f"({self.model.distribute_strategy.num_replicas_in_sync} replicas)."
            )
        optimizer = _innermost(self.model.optimizer)
        if getattr(optimizer, "use_ema", False):
            raise ValueError(
                "`GradualUnfreezing(discriminative_factor=...)` does not support "
                "an optimizer with `use_ema=True`."
            )
        multipliers = {}
        groups = self._layer_variables()
        factors = discriminative_multipliers(len(groups), self.discriminative_factor)
        for variables, multiplier in zip(groups, factors, strict=True):
            for variable in variables:
                multipliers[optimizer._var_key(variable)] = multiplier
                self._multiplier_paths[variable.path] = multiplier
        # An instance attribute shadowing the class method, for this `fit`.
        self._patched = (optimizer, vars(optimizer).get("_backend_apply_gradients"))
        optimizer._backend_apply_gradients = _scaled_apply(
            optimizer, optimizer._backend_apply_gradients, multipliers
        )

    def _remove_rates(self, retrace=True):
        if self._patched is None:
            return
        optimizer, previous = self._patched
        self._patched = None
        if previous is None:
            vars(optimizer).pop("_backend_apply_gradients", None)
        else:
            optimizer._backend_apply_gradients = previous
        if retrace:
            self.model.make_train_function(force=True)

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
        self._install_rates()
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
        self._remove_rates()
