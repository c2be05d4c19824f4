"""Regularization hyperparameters for Keras Tuner build functions."""

import dataclasses
import functools
import inspect

import keras
import keras_tuner

from keras_stability._checks import check_callable
from keras_stability._checks import check_choice
from keras_stability._checks import check_number
from keras_stability._checks import check_str
from keras_stability._checks import invalid
from keras_stability._checks import is_number

__all__ = [
    "CLIPPING_POLICIES",
    "RegularizationSettings",
    "regularization_hyperparameters",
    "with_regularization",
]

# Names of the clipping arguments of every Keras optimizer, plus "none".
CLIPPING_POLICIES = ("none", "clipnorm", "global_clipnorm", "clipvalue")


@dataclasses.dataclass(frozen=True)
class RegularizationSettings:
    """The regularization values of one trial, and Keras objects built from them.

    Args:
        l1: L1 strength of kernels, >= 0. Defaults to `0.0`.
        l2: L2 strength of kernels, >= 0. Defaults to `0.0`.
        dropout: Dropout rate, in [0, 1). Defaults to `0.0`.
        weight_decay: Decoupled weight decay of `AdamW`, >= 0.
            Defaults to `0.0`.
        clipping: One of `CLIPPING_POLICIES`. Defaults to `"none"`.
        clip_threshold: Threshold of the clipping policy (> 0), required
            unless `clipping` is `"none"`, when it must be `None`.
            Defaults to `None`.

    Raises:
        ValueError: On a bad value, a clipping policy without threshold or
            a threshold without clipping policy.
    """

    l1: float = 0.0
    l2: float = 0.0
    dropout: float = 0.0
    weight_decay: float = 0.0
    clipping: str = "none"
    clip_threshold: float | None = None

    def __post_init__(self):
        values = {
            "l1": check_number("l1", self.l1, low=0.0),
            "l2": check_number("l2", self.l2, low=0.0),
            "dropout": check_number(
                "dropout", self.dropout, low=0.0, high=1.0, high_open=True
            ),
            "weight_decay": check_number("weight_decay", self.weight_decay, low=0.0),
            "clipping": check_choice("clipping", self.clipping, CLIPPING_POLICIES),
            "clip_threshold": check_number(
                "clip_threshold",
                self.clip_threshold,
                low=0.0,
                low_open=True,
                allow_none=True,
            ),
        }
        if values["clipping"] == "none" and values["clip_threshold"] is not None:
            raise invalid(
                "clip_threshold", self.clip_threshold, "None when clipping='none'"
            )
        if values["clipping"] != "none" and values["clip_threshold"] is None:
            raise invalid(
                "clip_threshold",
                None,
                f"a positive number when clipping={values['clipping']!r}",
            )
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def kernel_regularizer(self):
        """`keras.regularizers.L1L2(l1, l2)`, or `None` if both are zero."""
        if not self.l1 and not self.l2:
            return None
        return keras.regularizers.L1L2(l1=self.l1, l2=self.l2)

    def clipping_kwargs(self):
        """Optimizer keyword arguments of the clipping policy, e.g. `{"clipnorm": 1.0}`."""
        if self.clipping == "none" or self.clip_threshold is None:
            return {}
        return {self.clipping: self.clip_threshold}

    def optimizer(self, learning_rate=1e-3, **kwargs):
        """`keras.optimizers.AdamW` with this weight decay and clipping policy.

        Args:
            learning_rate: Learning rate or schedule. Defaults to `1e-3`.
            **kwargs: Further `AdamW` arguments.

        Returns:
            A `keras.optimizers.AdamW`.
        """
        return keras.optimizers.AdamW(
            learning_rate=learning_rate,
            weight_decay=self.weight_decay,
            **self.clipping_kwargs(),
            **kwargs,
        )


def _check_spec(arg, spec, low_open, high=None):
    """`None`, a number or a `(min, max)` pair, checked; returns it normalised.

    `low_open` says whether 0 itself is refused as a range's minimum (log
    sampling needs a positive minimum); `high` is an exclusive upper bound.
    """
    bounds = ">= 0" if high is None else f"in [0, {high:g})"
    what = (
        f"None, a number {bounds} or a (min, max) pair with "
        f"{'0 <' if low_open else '0 <='} min <= max"
        + ("" if high is None else f" < {high:g}")
    )
    if spec is None:
        return None
    if is_number(spec):
        try:
            return check_number(arg, spec, low=0.0, high=high, high_open=True)
        except ValueError:
            raise invalid(arg, spec, what) from None
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and all(map(is_number, spec)):
        try:
            low = check_number(arg, spec[0], low=0.0, low_open=low_open)
            top = check_number(arg, spec[1], low=low, high=high, high_open=True)
        except ValueError:
            raise invalid(arg, spec, what) from None
        return (low, top)
    raise invalid(arg, spec, what)


def _float_hp(hp, name, spec, sampling):
    """A checked spec as a hyperparameter: fixed, a range, or 0 when `None`."""
    if spec is None:
        return 0.0
    if isinstance(spec, tuple):
        return hp.Float(name, spec[0], spec[1], sampling=sampling)
    return hp.Fixed(name, spec)


def regularization_hyperparameters(
    hp,
    l1=None,
    l2=(1e-6, 1e-1),
    dropout=(0.0, 0.5),
    weight_decay=(1e-6, 1e-2),
    clipping=("none", "clipnorm", "global_clipnorm"),
    clip_threshold=(0.1, 10.0),
    prefix="",
):
    """Declares regularization hyperparameters on `hp` and returns this trial's values.

    Strengths (`l1`, `l2`, `weight_decay`, `clip_threshold`) are searched on
    a log scale, `dropout` on a linear one. Each argument is a `(min, max)`
    range to search, a number to fix, or `None` to switch the knob off.
    The clipping threshold is a conditional hyperparameter: it exists only in
    trials whose policy is not `"none"`, so Bayesian optimization does not
    waste trials on it.

    Args:
        hp: A `keras_tuner.HyperParameters`.
        l1: L1 range of kernels. Defaults to `None` (off).
        l2: L2 range of kernels. Defaults to `(1e-6, 1e-1)`.
        dropout: Dropout range, within [0, 1). Defaults to `(0.0, 0.5)`.
        weight_decay: AdamW decoupled weight decay range.
            Defaults to `(1e-6, 1e-2)`.
        clipping: Clipping policies to choose from, a subset of
            `CLIPPING_POLICIES` (or one policy name), or `None` for no
            clipping.
            Defaults to `("none", "clipnorm", "global_clipnorm")`.
        clip_threshold: Threshold range of the clipping policy.
            Defaults to `(0.1, 10.0)`.
        prefix: Prefix of the hyperparameter names (`l1`, `l2`, `dropout`,
            `weight_decay`, `clipping`, `clip_threshold`), to declare several
            sets in one search or to keep clear of a name the model builder
            declares too: Keras Tuner gives a name declared twice its first
            value, whatever the second declaration's type (the Getting
            started guide's `hp.Boolean("dropout")` would get this float).
            Defaults to `""`.

    Returns:
        A `RegularizationSettings`.

    Raises:
        ValueError: If `hp` is not a `keras_tuner.HyperParameters`, on a
            negative bound (or a zero minimum of a log-scale range), a range
            whose minimum is above its maximum, a dropout of 1 or more, an
            unknown clipping policy or a `prefix` that is not a string.

    Example:

    >>> import keras_tuner
    >>> hp = keras_tuner.HyperParameters()
    >>> settings = regularization_hyperparameters(hp, l2=(1e-5, 1e-2))
    >>> settings.kernel_regularizer()  # doctest: +ELLIPSIS
    <keras.src.regularizers.regularizers.L1L2 object at ...>
    """
    if not isinstance(hp, keras_tuner.HyperParameters):
        raise invalid("hp", hp, "a `keras_tuner.HyperParameters`")
    prefix = check_str("prefix", prefix, allow_empty=True)
    specs = {
        "l1": _check_spec("l1", l1, low_open=True),
        "l2": _check_spec("l2", l2, low_open=True),
        "dropout": _check_spec("dropout", dropout, low_open=False, high=1.0),
        "weight_decay": _check_spec("weight_decay", weight_decay, low_open=True),
    }
    clip_spec = _check_spec("clip_threshold", clip_threshold, low_open=True)
    if clip_spec == 0.0:
        raise invalid(
            "clip_threshold", clip_threshold, "a positive number, a range or None"
        )
    policies = (clipping,) if isinstance(clipping, str) else clipping
    if policies is None:
        policies = ("none",)
    if (
        not isinstance(policies, (tuple, list))
        or not policies
        or not all(isinstance(p, str) and p in CLIPPING_POLICIES for p in policies)
    ):
        raise invalid(
            "clipping",
            clipping,
            f"a non-empty subset of {CLIPPING_POLICIES} or None",
        )
    policies = tuple(policies)
    sampling = {"dropout": "linear"}
    values = {
        key: _float_hp(hp, prefix + key, spec, sampling.get(key, "log"))
        for key, spec in specs.items()
    }
    name = prefix + "clipping"
    policy = policies[0] if len(policies) == 1 else hp.Choice(name, list(policies))
    threshold = None
    active = [p for p in policies if p != "none"]
    if active and clip_spec is None:
        raise invalid(
            "clip_threshold",
            None,
            f"a positive number or a (min, max) range with clipping={clipping!r}",
        )
    if active:
        if isinstance(clip_spec, tuple):
            kwargs = dict(sampling="log")
            if len(policies) > 1:
                kwargs.update(parent_name=name, parent_values=active)
            threshold = hp.Float(prefix + "clip_threshold", *clip_spec, **kwargs)
        else:
            threshold = clip_spec
    if policy == "none":
        threshold = None
    return RegularizationSettings(clipping=policy, clip_threshold=threshold, **values)


def with_regularization(build_fn=None, **ranges):
    """Decorates `build_fn(hp, settings)` into a Keras Tuner build function `build(hp)`.

    The wrapper declares the regularization hyperparameters with
    `regularization_hyperparameters(hp, **ranges)` and passes the trial's
    `RegularizationSettings` to `build_fn`.

    Args:
        build_fn: Function `(hp, settings) -> compiled keras.Model`.
        **ranges: Arguments of `regularization_hyperparameters`.

    Returns:
        A function `hp -> model`, or a decorator if `build_fn` is `None`.

    Raises:
        ValueError: If `build_fn` is not callable, a name in `ranges` is not
            an argument of `regularization_hyperparameters`, or a range is
            invalid (checked when decorating, not at the first trial).

    Example:

    >>> @with_regularization(l2=(1e-5, 1e-2), clipping=None)
    ... def build(hp, settings):
    ...     model = keras.Sequential([
    ...         keras.Input((4,)),
    ...         keras.layers.Dense(8, kernel_regularizer=settings.kernel_regularizer()),
    ...         keras.layers.Dropout(settings.dropout),
    ...         keras.layers.Dense(1)])
    ...     model.compile(optimizer=settings.optimizer(1e-3), loss="mse")
    ...     return model
    """
    build_fn = check_callable("build_fn", build_fn, allow_none=True)
    known = [
        name
        for name in inspect.signature(regularization_hyperparameters).parameters
        if name != "hp"
    ]
    for name, value in ranges.items():
        if name not in known:
            raise invalid(name, value, f"an argument of one of {', '.join(known)}")
    regularization_hyperparameters(keras_tuner.HyperParameters(), **ranges)
    if build_fn is None:
        return functools.partial(with_regularization, **ranges)

    @functools.wraps(build_fn)
    def build(hp):
        return build_fn(hp, regularization_hyperparameters(hp, **ranges))

    return build
