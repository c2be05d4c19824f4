"""`ActivationMonitor`: dead ReLU units and saturated sigmoid / tanh units.

Every `every_n_epochs` the monitor runs the model on a fixed probe batch,
collects the outputs of the layers whose activation is ReLU, sigmoid or
tanh, and reports per layer the fraction of dead / saturated units (the pure
maths is in `keras_stability.diagnostics.activations`).
"""

import warnings

import keras
import numpy as np
from keras.src.utils import io_utils  # Keras' print_msg (no public alias)

from keras_stability._checks import check_positive_int
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


class ActivationMonitor(keras.callbacks.Callback):
    """Reports dead ReLU units and saturated sigmoid / tanh units per layer.

    A ReLU unit (an index of the last axis: a neuron or a channel) is dead
    when it outputs 0 for every probe sample and position. A sigmoid / tanh
    unit is saturated when its output is within `saturation_eps` of an
    asymptote for every probe sample and position.

    Results go to `history` (`{layer: [fraction per check]}`), `report` (the
    last check), the epoch logs as `dead_fraction/<layer>` or
    `saturated_fraction/<layer>` when `log_fractions`, and a warning when a
    layer passes `warn_fraction`. Needs a model with symbolic inputs
    (Sequential or functional).

    Args:
        probe_data: A batch of inputs (array, or list / dict of arrays for
            multi-input models).
        every_n_epochs: Epochs between checks. Defaults to `1`.
        saturation_eps: Distance to the asymptote. Defaults to `0.01`.
        warn_fraction: Fraction above which a layer is warned about.
            Defaults to `0.5`.
        log_fractions: Whether to add the fractions to fit's epoch logs.
            Defaults to `False`.
        verbose: 1 to warn. Defaults to `1`.

    Example:

    ```python
    monitor = ActivationMonitor(x_train[:256])
    model.fit(x_train, y_train, callbacks=[monitor])
    monitor.report  # {"dense": {"kind": "relu", "fraction": 0.03}, ...}
    ```
    """

    def __init__(
        self,
        probe_data,
        every_n_epochs=1,
        saturation_eps=0.01,
        warn_fraction=0.5,
        log_fractions=False,
        verbose=1,
    ):
        super().__init__()
        every_n_epochs = check_positive_int("every_n_epochs", every_n_epochs)
        if not 0 < saturation_eps < 0.5:
            raise ValueError(
                "Invalid value for argument `saturation_eps`. Expected a number in "
                f"(0, 0.5). Received: saturation_eps={saturation_eps!r}"
            )
        if not 0 < warn_fraction <= 1:
            raise ValueError(
                "Invalid value for argument `warn_fraction`. Expected a number in "
                f"(0, 1]. Received: warn_fraction={warn_fraction!r}"
            )
        if probe_data is None:
            raise ValueError(
                "Invalid value for argument `probe_data`. Expected a batch of "
                "model inputs. Received: probe_data=None"
            )
        self.probe_data = probe_data
        self.every_n_epochs = every_n_epochs
        self.saturation_eps = saturation_eps
        self.warn_fraction = warn_fraction
        self.log_fractions = bool(log_fractions)
        self.verbose = verbose
        self.history = {}
        self.report = {}

    def get_config(self):
        return {
            "probe_data": self.probe_data,
            "every_n_epochs": self.every_n_epochs,
            "saturation_eps": self.saturation_eps,
            "warn_fraction": self.warn_fraction,
            "log_fractions": self.log_fractions,
            "verbose": self.verbose,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def on_train_begin(self, logs=None):
        self.history = {}
        self.report = {}
        self._probe_model = None

    def _layers(self, model):
        return [
            (layer, kind)
            for layer in model.layers
            if (kind := activation_kind(layer)) is not None
        ]

    def check(self, model=None):
        """Runs the probe batch now.

        Args:
            model: The model. Defaults to the model being fit.

        Returns:
            Dict `{layer: {"kind": ..., "fraction": ...}}` (`fraction` is the
            dead fraction for ReLU, the saturated fraction otherwise).
        """
        model = model or self.model
        layers = self._layers(model)
        if not layers:
            return {}
        inputs = getattr(model, "inputs", None)
        if not inputs:
            raise ValueError(
                "ActivationMonitor needs a model with symbolic inputs "
                "(Sequential or functional); received a subclassed model "
                f"{model.name!r}."
            )
        inputs = inputs[0] if len(inputs) == 1 else inputs
        probe = keras.Model(inputs, [layer.output for layer, _ in layers])
        outputs = probe(self.probe_data, training=False)
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        report = {}
        for (layer, kind), out in zip(layers, outputs, strict=True):
            out = np.asarray(keras.ops.convert_to_numpy(out))
            if kind == "relu":
                fraction = dead_fraction(out)
            else:
                fraction = saturated_fraction(out, kind, self.saturation_eps)
            report[layer.name] = {"kind": kind, "fraction": fraction}
        return report

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs:
            return
        self.report = self.check()
        bad = []
        for name, entry in self.report.items():
            self.history.setdefault(name, []).append(entry["fraction"])
            if self.log_fractions and logs is not None:
                key = "dead_fraction" if entry["kind"] == "relu" else "saturated_fraction"
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
        text = "\n".join(lines) if lines else "ActivationMonitor: no checks yet."
        if print_to_stdout:
            io_utils.print_msg(text)
        return text
