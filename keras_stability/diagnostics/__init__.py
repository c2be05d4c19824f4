"""Pure numeric cores of training diagnostics (no Keras training here)."""

from keras_stability.diagnostics.activations import dead_fraction
from keras_stability.diagnostics.activations import saturated_fraction
from keras_stability.diagnostics.gradient_health import EXPLODING
from keras_stability.diagnostics.gradient_health import HEALTHY
from keras_stability.diagnostics.gradient_health import REMEDIES
from keras_stability.diagnostics.gradient_health import VANISHING
from keras_stability.diagnostics.gradient_health import LayerFinding
from keras_stability.diagnostics.gradient_health import diagnose_layers
from keras_stability.diagnostics.gradient_health import format_findings
from keras_stability.diagnostics.spikes import RollingZScore

__all__ = [
    "EXPLODING",
    "HEALTHY",
    "REMEDIES",
    "VANISHING",
    "LayerFinding",
    "RollingZScore",
    "dead_fraction",
    "diagnose_layers",
    "format_findings",
    "saturated_fraction",
]
