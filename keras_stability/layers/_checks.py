"""Argument checks shared by the layers and regularizers, in Keras' error form."""

import math

import numpy as np


def check_number(name, value, low=0.0, high=None, low_open=False, what=None):
    """Returns `value` as a float if it is a finite number in range.

    Args:
        name: Argument name, used in the message.
        value: The value received.
        low: Smallest accepted value. Defaults to `0.0`.
        high: Largest accepted value, or `None` for no upper bound.
            Defaults to `None`.
        low_open: If `True`, `low` itself is rejected. Defaults to `False`.
        what: Text describing what is accepted; built from the bounds if
            `None`. Defaults to `None`.

    Returns:
        `float(value)`.

    Raises:
        ValueError: If `value` is not a finite real number within the bounds.
    """
    if what is None:
        if high is None:
            what = "a positive number" if low_open and low == 0 else f"a number >= {low:g}"
        else:
            left = "(" if low_open else "["
            what = f"a number in {left}{low:g}, {high:g}]"
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float, np.integer, np.floating))
        and math.isfinite(float(value))
        and (float(value) > low if low_open else float(value) >= low)
        and (high is None or float(value) <= high)
    )
    if not ok:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected {what}. "
            f"Received: {name}={value!r}"
        )
    return float(value)


def check_choice(name, value, choices):
    """Returns `value` if it is one of `choices`, else raises `ValueError`."""
    if value not in choices:
        shown = ", ".join(repr(c) for c in choices)
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected one of {shown}. "
            f"Received: {name}={value!r}"
        )
    return value


def check_positive_int(name, value):
    """Returns `value` as an int if it is a positive integer."""
    return _check_int(name, value, 1, "a positive integer")


def check_nonnegative_int(name, value):
    """Returns `value` as an int if it is an integer >= 0."""
    return _check_int(name, value, 0, "a non-negative integer")


def _check_int(name, value, minimum, what):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected {what}. "
            f"Received: {name}={value!r}"
        )
    return int(value)
