"""The pure loss maths against a NumPy reference."""

import keras
import numpy as np
import pytest

from keras_stability.distillation import combine_losses
from keras_stability.distillation import soft_target_loss
from keras_stability.distillation import soften
from keras_stability.distillation import top1_agreement
from keras_stability.distillation.losses import as_loss


def np_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(p, q):
    p = np.clip(p, 1e-7, 1.0)
    q = np.clip(q, 1e-7, 1.0)
    return np.sum(p * np.log(p / q), axis=-1)


T_LOGITS = np.array(
    [[2.0, 1.0, -1.0, 0.5], [0.1, 3.0, 0.2, -2.0], [1.0, 1.0, 1.0, 4.0]], "float32"
)
S_LOGITS = np.array(
    [[0.5, 0.4, 0.0, 0.1], [1.0, 0.0, 2.0, -1.0], [0.0, 0.3, 0.2, 1.0]], "float32"
)


def test_soften_is_softmax_of_scaled_logits():
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(soften(T_LOGITS, 3.0)),
        np_softmax(T_LOGITS / 3.0),
        rtol=1e-6,
    )


@pytest.mark.parametrize("temperature", [1.0, 3.0, 10.0])
def test_soft_target_loss_is_t2_times_kl(temperature):
    expected = temperature**2 * np.mean(
        np_kl(np_softmax(T_LOGITS / temperature), np_softmax(S_LOGITS / temperature))
    )
    got = float(soft_target_loss(T_LOGITS, S_LOGITS, temperature))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    unscaled = float(
        soft_target_loss(
            T_LOGITS, S_LOGITS, temperature, scale_by_temperature_squared=False
        )
    )
    np.testing.assert_allclose(unscaled, expected / temperature**2, rtol=1e-5)


def test_soft_target_loss_sample_weight():
    w = np.array([1.0, 0.0, 2.0], "float32")
    per_sample = 9.0 * np_kl(np_softmax(T_LOGITS / 3.0), np_softmax(S_LOGITS / 3.0))
    got = float(soft_target_loss(T_LOGITS, S_LOGITS, 3.0, sample_weight=w))
    # Keras' "sum_over_batch_size": weighted sum over the batch size.
    np.testing.assert_allclose(got, np.sum(w * per_sample) / 3, rtol=1e-5)


def test_soft_target_loss_zero_when_student_equals_teacher():
    assert abs(float(soft_target_loss(T_LOGITS, T_LOGITS, 4.0))) < 1e-6


def test_combine_losses():
    np.testing.assert_allclose(
        float(combine_losses(2.0, 5.0, 0.1)), 0.1 * 2 + 0.9 * 5, rtol=1e-6
    )
    assert float(combine_losses(2.0, 5.0, 1.0)) == pytest.approx(2.0)
    assert float(combine_losses(2.0, 5.0, 0.0)) == pytest.approx(5.0)


def test_top1_agreement():
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(top1_agreement(T_LOGITS, S_LOGITS)), [1.0, 0.0, 1.0]
    )


def test_as_loss_wraps_names_and_functions_with_sample_weight():
    y_true = np.array([[1.0, 0.0], [0.0, 2.0]], "float32")
    y_pred = np.zeros_like(y_true)
    for loss in (
        "mse",
        keras.losses.mean_squared_error,
        lambda a, b: keras.ops.mean((a - b) ** 2, axis=-1),
    ):
        fn = as_loss(loss)
        assert isinstance(fn, keras.losses.Loss)
        got = float(fn(y_true, y_pred, sample_weight=np.array([1.0, 0.0], "float32")))
        assert got == pytest.approx(0.5 / 2)


def test_as_loss_rejects_unknown():
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `student_loss_fn`.*Received: student_loss_fn='nope'",
    ):
        as_loss("nope", "student_loss_fn")
    with pytest.raises(ValueError, match="Received: loss=3"):
        as_loss(3)
