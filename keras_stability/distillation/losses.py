"""Pure loss maths of knowledge distillation (Hinton et al., 2015).

Nothing here knows about models or training: each function maps tensors to
tensors with `keras.ops`, so it runs under `tf.function`, XLA and
`tf.distribute` and is easy to test against a NumPy reference.

Both models are expected to output logits. The soft-target term compares the
softened distributions `softmax(t / T)` (teacher) and `softmax(s / T)`
(student); its gradient shrinks as `1 / T**2`, which Hinton's `T**2` factor
undoes so that the mix with the hard-label term does not depend on `T`.
"""

import keras
from keras import ops

from keras_stability._checks import check_bool
from keras_stability._checks import check_callable
from keras_stability._checks import check_number

__all__ = [
    "as_loss",
    "combine_losses",
    "soften",
    "soft_target_loss",
    "top1_agreement",
]


class _FunctionLoss(keras.losses.Loss):
    """Gives a plain `fn(y_true, y_pred) -> per-sample values` the `Loss` API.

    `keras.losses.Loss.__call__` then applies `sample_weight`, the batch
    reduction and the `tf.distribute` scaling, as for any built-in loss.
    """

    def __init__(self, fn, name=None):
        super().__init__(name=name or getattr(fn, "__name__", "loss"))
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)


def as_loss(loss, argument="loss"):
    """Turns a loss identifier into a `keras.losses.Loss` instance.

    Args:
        loss: A `keras.losses.Loss`, a string known to `keras.losses.get`
            (`"mse"`, `"kl_divergence"`, ...) or a callable
            `(y_true, y_pred) -> per-sample values`.
        argument: Argument name used in the error message. Defaults to
            `"loss"`.

    Returns:
        A `keras.losses.Loss` that accepts `sample_weight`.

    Raises:
        ValueError: If `loss` is none of the above.
    """
    if isinstance(loss, keras.losses.Loss):
        return loss
    fn = loss
    if isinstance(loss, str):
        try:
            fn = keras.losses.get(loss)
        except ValueError:
            fn = None
    if not callable(fn):
        raise ValueError(
            f"Invalid value for argument `{argument}`. Expected a "
            "`keras.losses.Loss`, a loss name such as 'mse' or a callable "
            f"`(y_true, y_pred)`. Received: {argument}={loss!r}"
        )
    if isinstance(fn, keras.losses.Loss):
        return fn
    return _FunctionLoss(fn)


def _is_tensor(value):
    return isinstance(value, keras.Variable) or ops.is_tensor(value)


def _check_temperature(temperature):
    """A Python temperature is checked; a tensor or variable (traced) is not."""
    if _is_tensor(temperature):
        return temperature
    return check_number("temperature", temperature, low=0.0, low_open=True)


def soften(logits, temperature):
    """Softmax of `logits / temperature` over the last axis.

    Args:
        logits: Tensor of logits, classes on the last axis.
        temperature: Positive scalar (number or tensor).

    Returns:
        Probabilities with the shape of `logits`.

    Raises:
        ValueError: If `temperature` is a number that is not finite and
            positive.
    """
    temperature = _check_temperature(temperature)
    logits = ops.convert_to_tensor(logits)
    temperature = ops.cast(temperature, logits.dtype)
    return ops.softmax(ops.divide(logits, temperature), axis=-1)


def soft_target_loss(
    teacher_logits,
    student_logits,
    temperature,
    loss_fn=None,
    scale_by_temperature_squared=True,
    sample_weight=None,
):
    """Soft-target loss `T**2 * loss_fn(softmax(t/T), softmax(s/T))`.

    With the default `loss_fn` this is Hinton's
    `T**2 * KL(softmax(t/T) || softmax(s/T))`, averaged over the batch.

    Args:
        teacher_logits: Teacher logits, shape `(batch, ..., classes)`.
        student_logits: Student logits of the same shape.
        temperature: Positive scalar.
        loss_fn: Callable `(teacher_probs, student_probs, sample_weight=...)`
            returning a scalar, as the keras.io example's
            `distillation_loss_fn`. Defaults to `keras.losses.KLDivergence()`.
        scale_by_temperature_squared: Multiply by `T**2`. Defaults to `True`.
        sample_weight: Optional per-sample weights, shape `(batch,)`.
            Defaults to `None`.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: If `temperature` is a number that is not finite and
            positive, `loss_fn` is not callable or
            `scale_by_temperature_squared` is not a bool.
    """
    temperature = _check_temperature(temperature)
    loss_fn = check_callable("loss_fn", loss_fn, allow_none=True)
    scale_by_temperature_squared = check_bool(
        "scale_by_temperature_squared", scale_by_temperature_squared
    )
    if loss_fn is None:
        loss_fn = keras.losses.KLDivergence()
    teacher_probs = soften(teacher_logits, temperature)
    student_probs = soften(student_logits, temperature)
    value = loss_fn(teacher_probs, student_probs, sample_weight=sample_weight)
    if scale_by_temperature_squared:
        t = ops.cast(temperature, value.dtype)
        value = ops.multiply(value, ops.square(t))
    return value


def combine_losses(student_loss, soft_loss, alpha):
    """Hinton's mix `alpha * student_loss + (1 - alpha) * soft_loss`.

    Args:
        student_loss: Scalar hard-label loss.
        soft_loss: Scalar soft-target loss.
        alpha: Weight of the hard-label term, in `[0, 1]`.

    Returns:
        Scalar tensor.

    Raises:
        ValueError: If `alpha` is a number outside `[0, 1]`.
    """
    if not _is_tensor(alpha):
        alpha = check_number("alpha", alpha, low=0.0, high=1.0)
    student_loss = ops.convert_to_tensor(student_loss)
    alpha = ops.cast(alpha, student_loss.dtype)
    return ops.add(
        ops.multiply(alpha, student_loss),
        ops.multiply(ops.subtract(1.0, alpha), ops.cast(soft_loss, student_loss.dtype)),
    )


def top1_agreement(teacher_logits, student_logits):
    """Per-sample 1.0 where student and teacher pick the same top-1 class.

    Args:
        teacher_logits: Teacher logits (or probabilities), classes last.
        student_logits: Student logits of the same shape.

    Returns:
        Float tensor of shape `teacher_logits.shape[:-1]`.
    """
    same = ops.equal(
        ops.argmax(teacher_logits, axis=-1), ops.argmax(student_logits, axis=-1)
    )
    return ops.cast(same, "float32")
