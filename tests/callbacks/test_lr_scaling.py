import keras
import numpy as np
import pytest

from keras_stability.callbacks import ScaledSchedule
from keras_stability.callbacks.lr_scaling import learning_rate_variable
from keras_stability.callbacks.lr_scaling import scale_learning_rate
from keras_stability.callbacks.lr_scaling import wrap_schedule


def _schedule():
    return keras.optimizers.schedules.ExponentialDecay(
        0.1, decay_steps=10, decay_rate=0.5
    )


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
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(scaled)
    )
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
    assert isinstance(
        opt._learning_rate.schedule, keras.optimizers.schedules.ExponentialDecay
    )


def test_invalid_arguments():
    with pytest.raises(
        ValueError,
        match="Invalid value for argument `factor`. Expected a positive number. Received: factor=0",
    ):
        ScaledSchedule(_schedule(), factor=0)
    with pytest.raises(ValueError, match="Invalid value for argument `schedule`"):
        ScaledSchedule(0.1)


@pytest.mark.parametrize("schedule", [False, True])
def test_learning_rate_variable_undoes_scalings_exactly(schedule):
    optimizer = keras.optimizers.SGD(_schedule() if schedule else 0.1)
    wrap_schedule(optimizer)
    variable = learning_rate_variable(optimizer)
    assert variable is (
        optimizer._learning_rate.factor if schedule else optimizer._learning_rate
    )
    saved = np.array(variable.numpy(), copy=True)
    before = float(np.asarray(optimizer.learning_rate))
    assert scale_learning_rate(optimizer, 0.3) == pytest.approx(0.3 * before)
    variable.assign(saved)
    assert float(np.asarray(optimizer.learning_rate)) == before


def test_learning_rate_variable_of_a_callable_is_none():
    optimizer = keras.optimizers.SGD(lambda: 0.1)
    assert learning_rate_variable(optimizer) is None
    assert scale_learning_rate(optimizer, 0.5) is None
