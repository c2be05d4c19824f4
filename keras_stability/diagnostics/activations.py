"""Pure numeric core of dead and saturated units.

Activations are arrays `(batch, ..., units)`: a unit is one index of the last
axis (a channel for convolutions), as Keras lays out its outputs.
"""

import numpy as np

from keras_stability._checks import check_choice
from keras_stability._checks import check_number
from keras_stability._checks import invalid

__all__ = ["dead_fraction", "saturated_fraction"]


def _per_unit(activations):
    try:
        a = np.asarray(activations, dtype=np.float64)
    except (TypeError, ValueError):
        raise invalid(
            "activations", activations, "a numeric array (batch, ..., units)"
        ) from None
    if a.ndim < 2 or a.size == 0:
        raise ValueError(
            "Invalid value for argument `activations`. Expected a non-empty array "
            f"of rank >= 2 (batch, ..., units). Received: shape={a.shape}"
        )
    return a.reshape(-1, a.shape[-1])


def dead_fraction(activations):
    """Fraction of units that are zero for every sample (and position).

    Args:
        activations: ReLU outputs, shape `(batch, ..., units)`.

    Returns:
        Float in [0, 1].

    Raises:
        ValueError: If `activations` is not a non-empty numeric array of
            rank >= 2.

    Example:

    >>> dead_fraction([[0.0, 1.0], [0.0, 0.0]])
    0.5
    """
    a = _per_unit(activations)
    return float(np.mean(np.all(a <= 0.0, axis=0)))


def saturated_fraction(activations, kind, epsilon=0.01):
    """Fraction of sigmoid / tanh units saturated for every sample.

    A sigmoid output is saturated below `epsilon` or above `1 - epsilon`; a
    tanh output when its magnitude is above `1 - epsilon`. There the
    derivative is about `epsilon` and almost no gradient flows back.

    Args:
        activations: Outputs, shape `(batch, ..., units)`.
        kind: `"sigmoid"` or `"tanh"`.
        epsilon: Distance to the asymptote, in (0, 0.5). Defaults to `0.01`.

    Returns:
        Float in [0, 1].

    Raises:
        ValueError: If `activations`, `kind` or `epsilon` is invalid.
    """
    kind = check_choice("kind", kind, ("sigmoid", "tanh"))
    epsilon = check_number(
        "epsilon", epsilon, low=0.0, high=0.5, low_open=True, high_open=True
    )
    a = _per_unit(activations)
    if kind == "sigmoid":
        sat = (a < epsilon) | (a > 1.0 - epsilon)
    else:
        sat = np.abs(a) > 1.0 - epsilon
    return float(np.mean(np.all(sat, axis=0)))
