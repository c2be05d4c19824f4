import keras
import numpy as np
import pytest

from keras_stability.callbacks import ScaledSchedule
from keras_stability.callbacks.lr_scaling import scale_learning_rate
from keras_stability.callbacks.lr_scaling import wrap_schedule


def _schedule():
    return keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)


def test_scaled_schedule_keeps_shape():
    base = _schedule()
    scaled = ScaledSchedule(base, factor=0.25)
    for step in (0, 5, 10, 40):
        assert float(scaled(step)) == pytest.approx(0.25 * float(base(step)))


def test_scaled_schedule_config_round_trip_and_serialization():
    scaled = ScaledSchedule(_schedule(), factor=0.5)
    config = scaled.get_config()
    again = ScaledSchedule.from_config(config)
    assert again.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(scaled))
    assert isinstance(restored, ScaledSchedule)
    assert float(restored(7)) == pytest.approx(float(scaled(7)))


def test_scale_constant_and_schedule_learning_rates():
    opt = keras.optimizers.SGD(0.2)
    assert scale_learning_rate(opt, 0.5) == pytest.approx(0.1)
    assert float(np.asarray(opt.learning_rate)) == pytest.approx(0.1)

    opt = keras.optimizers.SGD(_schedule())
    assert wrap_schedule(opt) is True and wrap_schedule(opt) is False
    opt.iterations.assign(10)
    assert scale_learning_rate(opt, 0.5) == pytest.approx(0.025)
    assert scale_learning_rate(opt, 0.5) == pytest.approx(0.0125)
    assert isinstance(opt._learning_rate, ScaledSchedule)
    assert isinstance(opt._learning_rate.schedule, keras.optimizers.schedules.ExponentialDecay)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="Invalid value for argument `factor`. Expected a positive number. Received: factor=0"):
        ScaledSchedule(_schedule(), factor=0)
    with pytest.raises(ValueError, match="Invalid value for argument `schedule`"):
        ScaledSchedule(0.1)
