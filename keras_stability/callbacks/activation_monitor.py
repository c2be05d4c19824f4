"""`ActivationMonitor`: dead ReLU units and saturated sigmoid / tanh units.

Every `check_freq` epochs the monitor runs the model on a fixed probe batch,
collects the outputs of the layers whose activation is ReLU, sigmoid or
tanh, and reports per layer the fraction of dead / saturated units (the pure
maths is in `keras_stability.diagnostics.activations`).
"""

import warnings

import keras
import numpy as np

from keras_stability import _keras_internals
from keras_stability._checks import check_bool
from keras_stability._checks import check_number
from keras_stability._checks import check_positive_int
from keras_stability._checks import check_verbose
from keras_stability._checks import invalid
from keras_stability.callbacks.step_logs import StepLogs
from keras_stability.diagnostics.activations import dead_fraction
from keras_stability.diagnostics.activations import saturated_fraction

__all__ = ["ActivationMonitor", "activation_kind"]

_KINDS = {"relu": "relu", "relu6": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}


def activation_kind(layer):
    """`"relu"`, `"sigmoid"`, `"tanh"` or `None` for a layer's output activation."""
    if isinstance(layer, keras.layers.ReLU):
        return "relu"
    activation = getattr(layer, "activation", None)
    if activation is None:
        return None
    name = getattr(activation, "__name__", None)
    if name is None and isinstance(activation, str):
        name = activation
    return _KINDS.get(name)


def _check_probe_data(probe_data):
    """A batch of inputs: an array or tensor, or a list / dict of them."""

    def is_array(x):
        return isinstance(x, np.ndarray) or (
            hasattr(x, "shape")
            and hasattr(x, "dtype")
            and len(getattr(x, "shape", ())) > 0
        )

    if isinstance(probe_data, dict):
        ok = bool(probe_data) and all(is_array(v) for v in probe_data.values())
    elif isinstance(probe_data, (list, tuple)):
        ok = bool(probe_data) and all(is_array(v) for v in probe_data)
    else:
        ok = is_array(probe_data) and len(probe_data.shape) > 0
    if not ok:
        raise invalid(
            "probe_data",
            probe_data,
            "a batch of model inputs (an array, or a list or dict of arrays)",
        )
    return probe_data


@keras.saving.register_keras_serializable(package="keras_stability")
class ActivationMonitor(keras.callbacks.Callback):
    """Reports dead ReLU units and saturated sigmoid / tanh units per layer.

    A ReLU unit (an index of the last axis: a neuron or a channel) is dead
    when it outputs 0 for every probe sample and position. A sigmoid / tanh
    unit is saturated when its output is within `saturation_epsilon` of an
    asymptote for every probe sample and position.

    Results go to `history` (`{layer: [fraction per check]}`), `report` (the
    last check), the epoch logs as `dead_fraction/<layer>` or
    `saturated_fraction/<layer>` when `log_fractions`, and a warning when a
    layer passes `warn_fraction` (with `verbose`). Every layer is checked,
    nested ones too (in a `Sequential` block, a `Residual`, a transformer
    block's feed-forward), in any model that can be called on the probe
    batch (subclassed ones too). The check runs after the
    last step of an epoch, before the callbacks' `on_epoch_end`, so the
    fractions reach every callback's epoch logs whatever the order (when the
    steps per epoch are unknown, at `on_epoch_end`, for the callbacks after
    this one).

    Args:
        probe_data: A batch of inputs (array, or list / dict of arrays for
            multi-input models).
        check_freq: Epochs between checks. Defaults to `1`.
        saturation_epsilon: Distance to the asymptote, in (0, 0.5).
            Defaults to `0.01`.
        warn_fraction: Fraction above which a layer is warned about, in
            (0, 1]. Defaults to `0.5`.
        log_fractions: Whether to add the fractions to fit's epoch logs.
            Defaults to `False`.
        verbose: 0 (silent) or 1 (warn about layers above `warn_fraction`).
            Defaults to `0`.

    Example:

    ```python
    monitor = ActivationMonitor(x_train[:256], verbose=1)
    model.fit(x_train, y_train, callbacks=[monitor])
    monitor.report  # {"dense": {"kind": "relu", "fraction": 0.03}, ...}
    ```
    """

    def __init__(
        self,
        probe_data,
        check_freq=1,
        saturation_epsilon=0.01,
        warn_fraction=0.5,
        log_fractions=False,
        verbose=0,
    ):
        super().__init__()
        self.probe_data = _check_probe_data(probe_data)
        self.check_freq = check_positive_int("check_freq", check_freq)
        self.saturation_epsilon = check_number(
            "saturation_epsilon",
            saturation_epsilon,
            low=0.0,
            high=0.5,
            low_open=True,
            high_open=True,
        )
        self.warn_fraction = check_number(
            "warn_fraction", warn_fraction, low=0.0, high=1.0, low_open=True
        )
        self.log_fractions = check_bool("log_fractions", log_fractions)
        self.verbose = check_verbose("verbose", verbose)
        self.history = {}
        self.report = {}
        self._checked_epoch = None

    def get_config(self):
        probe = keras.tree.map_structure(
            lambda t: np.asarray(_keras_internals.to_numpy(t)), self.probe_data
        )
        return {
            "probe_data": keras.saving.serialize_keras_object(probe),
            "check_freq": self.check_freq,
            "saturation_epsilon": self.saturation_epsilon,
            "warn_fraction": self.warn_fraction,
            "log_fractions": self.log_fractions,
            "verbose": self.verbose,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["probe_data"] = keras.saving.deserialize_keras_object(
            config["probe_data"]
        )
        return cls(**config)

    def on_train_begin(self, logs=None):
        self.history = {}
        self.report = {}
        self._checked_epoch = None
        self._step_logs = StepLogs.of(self.model)
        self._step_logs.attach(self, self._after_step, self.params)

    def on_epoch_begin(self, epoch, logs=None):
        self._step_logs.start_epoch(epoch)

    def _after_step(self, logs):
        if self._step_logs.epoch_end:
            self._check_epoch(self._step_logs.epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._check_epoch(epoch, logs)  # if the last step did not

    def on_train_end(self, logs=None):
        self._step_logs.detach(self)

    def _layers(self, model):
        """`(key, layer, kind)` of every layer with a watched activation,
        nested ones too (in a `Sequential` block, a `Residual`, a custom
        block's feed-forward), each once. `key` is the layer's name, made
        unique with its index if nested models repeat a name."""
        found = [
            (layer, kind)
            for layer in _keras_internals.flatten_layers(model, include_self=False)
            if (kind := activation_kind(layer)) is not None
        ]
        names = [layer.name for layer, _ in found]
        return [
            (name if names.count(name) == 1 else f"{name}_{i}", layer, kind)
            for i, (name, (layer, kind)) in enumerate(zip(names, found, strict=True))
        ]

    def _outputs(self, model, layers):
        """Each layer's output on the probe batch, from one forward pass.

        Each layer's `call` records its output while the model runs (a
        nested layer's output is not reachable from the model's inputs as a
        symbolic tensor). A layer called several times keeps its last call.
        """
        seen = {}

        def recording(layer, call):
            def record(*args, **kwargs):
                seen[id(layer)] = out = call(*args, **kwargs)
                return out

            return record

        own = {}  # a `call` set on the instance itself, put back after
        for _, layer, _ in layers:
            if "call" in vars(layer):
                own[id(layer)] = vars(layer)["call"]
            object.__setattr__(layer, "call", recording(layer, layer.call))
        try:
            model(self.probe_data, training=False)
        finally:
            for _, layer, _ in layers:
                if id(layer) in own:
                    object.__setattr__(layer, "call", own[id(layer)])
                else:
                    object.__delattr__(layer, "call")
        return [seen.get(id(layer)) for _, layer, _ in layers]

    def check(self, model=None):
        """Runs the probe batch now.

        Args:
            model: The model. Defaults to the model being fit.

        Returns:
            Dict `{layer: {"kind": ..., "fraction": ...}}` (`fraction` is the
            dead fraction for ReLU, the saturated fraction otherwise), for
            every layer with such an activation, nested ones included.
        """
        model = model or self.model
        layers = self._layers(model)
        self._checked = True
        if not layers:
            return {}
        report = {}
        for (name, _, kind), out in zip(
            layers, self._outputs(model, layers), strict=True
        ):
            if out is None:  # not on the model's forward path
                continue
            out = np.asarray(_keras_internals.to_numpy(out))
            if kind == "relu":
                fraction = dead_fraction(out)
            else:
                fraction = saturated_fraction(out, kind, self.saturation_epsilon)
            report[name] = {"kind": kind, "fraction": fraction}
        return report

    def _check_epoch(self, epoch, logs):
        """Checks after epoch `epoch` if due and not done yet; fills `logs`."""
        if (epoch + 1) % self.check_freq or self._checked_epoch == epoch:
            return
        self._checked_epoch = epoch
        self.report = self.check()
        bad = []
        for name, entry in self.report.items():
            self.history.setdefault(name, []).append(entry["fraction"])
            if self.log_fractions and logs is not None:
                key = (
                    "dead_fraction" if entry["kind"] == "relu" else "saturated_fraction"
                )
                logs[f"{key}/{name}"] = entry["fraction"]
            if entry["fraction"] >= self.warn_fraction:
                bad.append(name)
        if bad and self.verbose:
            warnings.warn(
                f"ActivationMonitor after epoch {epoch + 1}: {self.summary(False)}",
                stacklevel=2,
            )

    def summary(self, print_to_stdout=True):
        """One line per layer: dead / saturated fraction. Returns the text."""
        lines = []
        for name, entry in self.report.items():
            what = "dead" if entry["kind"] == "relu" else "saturated"
            flag = "  <-- " if entry["fraction"] >= self.warn_fraction else ""
            lines.append(
                f"{name} ({entry['kind']}): {entry['fraction']:.0%} {what} units{flag}"
            )
        if any(e["fraction"] >= self.warn_fraction for e in self.report.values()):
            lines.append(
                "Remedies: dead ReLUs - lower the learning rate, use LeakyReLU/GELU, "
                "He initialisation; saturated sigmoid/tanh - normalize inputs, add "
                "normalization layers, use a ReLU-family activation."
            )
        if lines:
            text = "\n".join(lines)
        elif getattr(self, "_checked", False):
            text = "ActivationMonitor: no ReLU, sigmoid or tanh layer in the model."
        else:
            text = "ActivationMonitor: no checks yet."
        if print_to_stdout:
            _keras_internals.print_msg(text)
        return text
