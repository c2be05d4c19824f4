"""Argument checks for every public class and function, in Keras' error form.

One meaning of each kind of argument across the library:

- a *number* is a finite real (`int`, `float`, or a NumPy scalar), never a
  `bool`; it is returned as a Python `float`;
- an *integer* is an `int` or a NumPy integer, never a `bool` and never a
  float such as `2.0`; it is returned as a Python `int`;
- a *bool* is `True` or `False` (or a NumPy bool); strings, numbers and
  `None` are rejected, so `restore_best_weights="False"` is an error;
- a *choice* is one of a fixed set of values, compared with `==`.

Every check raises `ValueError` with the message

    Invalid value for argument `name`. Expected <what>. Received: name=<value>

so a user always reads which argument, what it got and what it accepts.
"""

import math
import numbers
import os

import numpy as np


def invalid(name, value, what):
    """Returns the library's `ValueError` for a bad argument (to `raise`).

    Args:
        name: Argument name, as the user wrote it.
        value: The value received.
        what: Text describing what is accepted, e.g. `"a positive integer"`.

    Returns:
        A `ValueError` in Keras' form.
    """
    return ValueError(
        f"Invalid value for argument `{name}`. Expected {what}. "
        f"Received: {name}={value!r}"
    )


def is_number(value):
    """Whether `value` is a real number that is not a `bool` (finite or not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def is_integer(value):
    """Whether `value` is an integer that is not a `bool`."""
    return isinstance(value, (int, np.integer)) and not isinstance(
        value, (bool, np.bool_)
    )


def _range_text(kind, low, high, low_open, high_open):
    if low is None and high is None:
        return f"a finite {kind}"
    if high is None:
        if low == 0 and low_open:
            return f"a positive {kind}"
        return f"{_article(kind)} {kind} {'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"{_article(kind)} {kind} {'<' if high_open else '<='} {high:g}"
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    return f"{_article(kind)} {kind} in {left}{low:g}, {high:g}{right}"


def _article(kind):
    return "an" if kind[0] in "aeiou" else "a"


def check_number(
    name,
    value,
    low=None,
    high=None,
    low_open=False,
    high_open=False,
    allow_none=False,
    what=None,
):
    """Returns `value` as a `float` if it is a finite number in range.

    Args:
        name: Argument name, used in the message.
        value: The value received.
        low: Smallest accepted value, or `None` for no lower bound.
            Defaults to `None`.
        high: Largest accepted value, or `None` for no upper bound.
            Defaults to `None`.
        low_open: If `True`, `low` itself is rejected. Defaults to `False`.
        high_open: If `True`, `high` itself is rejected. Defaults to `False`.
        allow_none: If `True`, `None` is accepted and returned as `None`.
            Defaults to `False`.
        what: Text describing what is accepted; built from the bounds if
            `None`. Defaults to `None`.

    Returns:
        `float(value)`, or `None` when `allow_none` and `value is None`.

    Raises:
        ValueError: If `value` is not a finite real number within the bounds.
    """
    if value is None and allow_none:
        return None
    ok = is_number(value) and math.isfinite(float(value))
    if ok:
        v = float(value)
        if low is not None:
            ok = v > low if low_open else v >= low
        if ok and high is not None:
            ok = v < high if high_open else v <= high
    if not ok:
        if what is None:
            what = _range_text("number", low, high, low_open, high_open)
            if allow_none:
                what += " or None"
        raise invalid(name, value, what)
    return float(value)


def check_positive(name, value, allow_none=False):
    """Returns `value` as a `float` if it is a finite number > 0."""
    return check_number(name, value, low=0.0, low_open=True, allow_none=allow_none)


def check_fraction(name, value, low_open=False, high_open=False, allow_none=False):
    """Returns `value` as a `float` if it is a number in [0, 1] (ends as asked)."""
    return check_number(
        name,
        value,
        low=0.0,
        high=1.0,
        low_open=low_open,
        high_open=high_open,
        allow_none=allow_none,
    )


def check_int(name, value, low=None, high=None, allow_none=False, what=None):
    """Returns `value` as an `int` if it is an integer in `[low, high]`.

    Args:
        name: Argument name, used in the message.
        value: The value received.
        low: Smallest accepted value, or `None`. Defaults to `None`.
        high: Largest accepted value, or `None`. Defaults to `None`.
        allow_none: If `True`, `None` is accepted and returned as `None`.
            Defaults to `False`.
        what: Text describing what is accepted; built from the bounds if
            `None`. Defaults to `None`.

    Returns:
        `int(value)`, or `None` when `allow_none` and `value is None`.

    Raises:
        ValueError: If `value` is not an integer within the bounds.
    """
    if value is None and allow_none:
        return None
    ok = (
        is_integer(value)
        and (low is None or value >= low)
        and (high is None or value <= high)
    )
    if not ok:
        if what is None:
            if low == 1 and high is None:
                what = "a positive integer"
            elif low == 0 and high is None:
                what = "a non-negative integer"
            else:
                what = _range_text("integer", low, high, False, False)
            if allow_none:
                what += " or None"
        raise invalid(name, value, what)
    return int(value)


def check_positive_int(name, value, allow_none=False):
    """Returns `value` as an `int` if it is an integer >= 1."""
    return check_int(name, value, low=1, allow_none=allow_none)


def check_nonnegative_int(name, value, allow_none=False):
    """Returns `value` as an `int` if it is an integer >= 0."""
    return check_int(name, value, low=0, allow_none=allow_none)


def check_bool(name, value):
    """Returns `value` as a `bool` if it is `True` or `False`.

    Strings (`"False"`, `"no"`), numbers and `None` are rejected rather than
    coerced with `bool()`, which would read `"False"` as `True`.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise invalid(name, value, "a bool (True or False)")
    return bool(value)


def check_choice(name, value, choices, allow_none=False):
    """Returns `value` if it is one of `choices` (or `None` when allowed)."""
    if value is None and allow_none:
        return None
    try:
        ok = isinstance(value, str | int | float | bool | type(None)) and (
            value in choices
        )
    except TypeError:
        ok = False
    if not ok:
        shown = ", ".join(repr(c) for c in choices)
        if allow_none:
            shown += ", None"
        raise invalid(name, value, f"one of {shown}")
    return value


def check_str(name, value, allow_none=False, allow_empty=False):
    """Returns `value` if it is a string (non-empty unless `allow_empty`)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or (not allow_empty and not value):
        what = "a string" if allow_empty else "a non-empty string"
        raise invalid(name, value, what + (" or None" if allow_none else ""))
    return value


def check_callable(name, value, allow_none=False):
    """Returns `value` if it is callable (or `None` when allowed)."""
    if value is None and allow_none:
        return None
    if not callable(value):
        raise invalid(name, value, "a callable" + (" or None" if allow_none else ""))
    return value


def check_path(name, value, allow_none=False):
    """Returns `value` as a `str` if it is a non-empty path (`str` or `PathLike`)."""
    if value is None and allow_none:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise invalid(
            name,
            value,
            "a path (str or os.PathLike)" + (" or None" if allow_none else ""),
        )
    return value


def check_verbose(name, value):
    """Returns `value` as an `int` for Keras' `verbose` (0 silent, 1 or 2 verbose).

    Keras' callbacks take `verbose` as an integer; `True`/`False` are accepted
    as 1/0 since Keras' own callbacks accept them too.
    """
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    return check_int(name, value, low=0, high=2)


def check_writable_dir(name, path):
    """Raises `ValueError` unless `path` is a directory that can be created and written.

    Creates the directory (and its parents) if missing, so a read-only or
    impossible location is reported when the user's object is built (or at
    `on_train_begin`), not as a raw TensorFlow or OS error mid-training.
    """
    path = check_path(name, path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise invalid(
            name, path, f"a directory that can be created ({e.strerror})"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise invalid(name, path, "a writable directory")
    return path


def check_writable_file(name, path):
    """Raises `ValueError` unless a file could be written at `path`; creates nothing.

    `path` must not be a directory, and its nearest existing ancestor must be
    a writable directory (the missing ones below it can then be created when
    the file is written). A path under a regular file (`"notes.txt/out.json"`)
    or in a read-only directory is reported when the user's object is built
    or training starts, not when the file is due.
    """
    path = check_path(name, path)
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise invalid(name, path, "a file path (this is a directory)")
    parent = os.path.dirname(full)
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise invalid(name, path, f"a path under a directory ({parent} is a file)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise invalid(name, path, f"a writable location ({parent} is not writable)")
    return path


def check_layer(name, value, built=False, allow_none=False):
    """Returns `value` if it is a Keras layer or model (built, if `built`).

    Args:
        name: Argument name, used in the message.
        value: The value received.
        built: Also require `value.built` (weights exist). Defaults to `False`.
        allow_none: If `True`, `None` is accepted and returned.
            Defaults to `False`.

    Raises:
        ValueError: If `value` is not a Keras layer or model, or not built
            when `built`.
    """
    import keras

    if value is None and allow_none:
        return None
    if not isinstance(value, keras.layers.Layer):
        if (type(value).__module__ or "").split(".")[0] == "tf_keras":
            raise ValueError(
                f"Invalid value for argument `{name}`. Expected a Keras 3 layer or "
                f"model (`import keras`). Received: {name}={value!r}, a tf_keras "
                "(legacy Keras 2) object. `tf.keras` is tf_keras in this process: "
                "`import tensorflow_model_optimization` sets TF_USE_LEGACY_KERAS=1 "
                "and resolves `tf.keras`, so when it comes before anything else "
                "touches `tf.keras` (`from tensorflow import keras` does not), "
                "tf.keras stays legacy. Build the model with `import keras`, or "
                "import keras_stability before tensorflow_model_optimization."
            )
        raise invalid(
            name, value, "a Keras layer or model" + (" or None" if allow_none else "")
        )
    if built and not value.built:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a built Keras layer or "
            "model (give it a `keras.Input`, call it on data or call `build`). "
            f"Received: {name}={value.name!r}, not built"
        )
    return value
