"""Regularization hyperparameters for Keras Tuner build functions."""

import dataclasses
import functools

import keras

from keras_stability._checks import check_number

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

    Attributes:
        l1: L1 strength of kernels.
        l2: L2 strength of kernels.
        dropout: Dropout rate.
        weight_decay: Decoupled weight decay of `AdamW`.
        clipping: One of `CLIPPING_POLICIES`.
        clip_threshold: Threshold of the clipping policy, `None` for `"none"`.
    """

    l1: float = 0.0
    l2: float = 0.0
    dropout: float = 0.0
    weight_decay: float = 0.0
    clipping: str = "none"
    clip_threshold: float | None = None

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


def _float_hp(hp, name, spec, sampling, low_open):
    """A fixed value, a `(min, max)` range, or `None` (0) as a hyperparameter."""
    if spec is None:
        return 0.0
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise ValueError(
                f"Invalid value for argument `{name}`. Expected `None`, a number or "
                f"a `(min, max)` pair. Received: {name}={spec!r}"
            )
        low = check_number(name, spec[0], low=0.0, low_open=low_open)
        high = check_number(name, spec[1], low=low)
        return hp.Float(name, low, high, sampling=sampling)
    return hp.Fixed(name, check_number(name, spec, low=0.0))


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
            `CLIPPING_POLICIES`, or `None` for no clipping.
            Defaults to `("none", "clipnorm", "global_clipnorm")`.
        clip_threshold: Threshold range of the clipping policy.
            Defaults to `(0.1, 10.0)`.
        prefix: Prefix of the hyperparameter names, to declare several sets
            in one search. Defaults to `""`.

    Returns:
        A `RegularizationSettings`.

    Raises:
        ValueError: On a negative bound, a range whose minimum is above its
            maximum, a dropout of 1 or more, or an unknown clipping policy.

    Example:

    >>> import keras_tuner
    >>> hp = keras_tuner.HyperParameters()
    >>> settings = regularization_hyperparameters(hp, l2=(1e-5, 1e-2))
    >>> settings.kernel_regularizer()  # doctest: +ELLIPSIS
    <keras.src.regularizers.regularizers.L1L2 object at ...>
    """
    names = {k: f"{prefix}{k}" for k in ("l1", "l2", "dropout", "weight_decay", "clipping", "clip_threshold")}
    for key, spec in (("dropout", dropout),):
        bounds = spec if isinstance(spec, (tuple, list)) else (spec,)
        for value in bounds:
            if value is not None and (check_number(key, value, low=0.0) >= 1.0):
                raise ValueError(
                    f"Invalid value for argument `{key}`. Expected rates in [0, 1). "
                    f"Received: {key}={spec!r}"
                )
    values = {
        "l1": _float_hp(hp, names["l1"], l1, "log", True),
        "l2": _float_hp(hp, names["l2"], l2, "log", True),
        "dropout": _float_hp(hp, names["dropout"], dropout, "linear", False),
        "weight_decay": _float_hp(hp, names["weight_decay"], weight_decay, "log", True),
    }
    policies = ("none",) if clipping is None else tuple(clipping)
    unknown = [p for p in policies if p not in CLIPPING_POLICIES]
    if not policies or unknown:
        raise ValueError(
            "Invalid value for argument `clipping`. Expected a non-empty subset of "
            f"{CLIPPING_POLICIES} or None. Received: clipping={clipping!r}"
        )
    policy = policies[0] if len(policies) == 1 else hp.Choice(names["clipping"], list(policies))
    threshold = None
    active = [p for p in policies if p != "none"]
    if active and clip_threshold is not None:
        if isinstance(clip_threshold, (tuple, list)):
            low = check_number("clip_threshold", clip_threshold[0], low=0.0, low_open=True)
            high = check_number("clip_threshold", clip_threshold[-1], low=low)
            kwargs = dict(sampling="log")
            if len(policies) > 1:
                kwargs.update(parent_name=names["clipping"], parent_values=active)
            threshold = hp.Float(names["clip_threshold"], low, high, **kwargs)
        else:
            threshold = check_number("clip_threshold", clip_threshold, low=0.0, low_open=True)
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
    if build_fn is None:
        return functools.partial(with_regularization, **ranges)

    @functools.wraps(build_fn)
    def build(hp):
        return build_fn(hp, regularization_hyperparameters(hp, **ranges))

    return build
