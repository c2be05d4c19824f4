"""Pure numeric core of dead and saturated units.

Activations are arrays `(batch, ..., units)`: a unit is one index of the last
axis (a channel for convolutions), as Keras lays out its outputs.
"""

import numpy as np

__all__ = ["dead_fraction", "saturated_fraction"]


def _per_unit(activations):
    a = np.asarray(activations, dtype=np.float64)
    if a.ndim < 2:
        raise ValueError(
            "Invalid value for argument `activations`. Expected an array of rank "
            f">= 2 (batch, ..., units). Received: shape={a.shape}"
        )
    return a.reshape(-1, a.shape[-1])


def dead_fraction(activations):
    """Fraction of units that are zero for every sample (and position).

    Args:
        activations: ReLU outputs, shape `(batch, ..., units)`.

    Returns:
        Float in [0, 1].

    Example:

    >>> dead_fraction([[0.0, 1.0], [0.0, 0.0]])
    0.5
    """
    a = _per_unit(activations)
    return float(np.mean(np.all(a <= 0.0, axis=0)))


def saturated_fraction(activations, kind, eps=0.01):
    """Fraction of sigmoid / tanh units saturated for every sample.

    A sigmoid output is saturated below `eps` or above `1 - eps`; a tanh output
    when its magnitude is above `1 - eps`. There the derivative is about `eps`
    and almost no gradient flows back.

    Args:
        activations: Outputs, shape `(batch, ..., units)`.
        kind: `"sigmoid"` or `"tanh"`.
        eps: Distance to the asymptote. Defaults to `0.01`.

    Returns:
        Float in [0, 1].

    Raises:
        ValueError: If `kind` or `eps` is invalid.
    """
    if kind not in ("sigmoid", "tanh"):
        raise ValueError(
            "Invalid value for argument `kind`. Expected one of ('sigmoid', 'tanh'). "
            f"Received: kind={kind!r}"
        )
    if not 0 < eps < 0.5:
        raise ValueError(
            "Invalid value for argument `eps`. Expected a number in (0, 0.5). "
            f"Received: eps={eps!r}"
        )
    a = _per_unit(activations)
    if kind == "sigmoid":
        sat = (a < eps) | (a > 1.0 - eps)
    else:
        sat = np.abs(a) > 1.0 - eps
    return float(np.mean(np.all(sat, axis=0)))
