"""Temperature/alpha schedules: values per epoch, logging, use in the loss."""

import keras
import numpy as np
import pytest

from keras_stability.distillation import DistillationScheduler
from keras_stability.distillation import LinearSchedule
from tests.distillation.test_distiller import make_data
from tests.distillation.test_distiller import make_distiller
from tests.distillation.test_distiller import reference_loss


def test_linear_schedule_values_and_config():
    schedule = LinearSchedule(start=8.0, end=2.0, epochs=3)
    assert [schedule(e) for e in range(5)] == [8.0, 6.0, 4.0, 2.0, 2.0]
    assert LinearSchedule.from_config(schedule.get_config()).get_config() == schedule.get_config()
    with pytest.raises(ValueError, match=r"Invalid value for argument `epochs`. Expected a positive integer. Received: epochs=0"):
        LinearSchedule(1.0, 2.0, 0)
    with pytest.raises(ValueError, match=r"Invalid value for argument `start`. Expected a number. Received: start='a'"):
        LinearSchedule("a", 2.0, 1)


def test_compiled_schedules_are_applied_and_logged_per_epoch():
    x, y = make_data(32)
    distiller = make_distiller(
        temperature=LinearSchedule(6.0, 2.0, epochs=2), alpha=LinearSchedule(0.0, 1.0, epochs=4)
    )
    history = distiller.fit(x, y, epochs=3, batch_size=16, verbose=0)
    np.testing.assert_allclose(history.history["temperature"], [6.0, 4.0, 2.0])
    np.testing.assert_allclose(history.history["alpha"], [0.0, 0.25, 0.5])
    # The last epoch's values are in the variables the loss reads.
    assert distiller.temperature == pytest.approx(2.0)
    got = float(distiller.compute_loss(x, y, training=False))
    np.testing.assert_allclose(got, reference_loss(distiller, x, y, 0.5, 2.0), rtol=1e-5)


def test_scheduler_callback_and_out_of_range_values():
    x, y = make_data(32)
    distiller = make_distiller()
    history = distiller.fit(
        x, y, epochs=2, batch_size=16, verbose=0,
        callbacks=[DistillationScheduler(alpha=lambda epoch: 0.2 * (epoch + 1))],
    )
    np.testing.assert_allclose(history.history["alpha"], [0.2, 0.4], rtol=1e-6)
    np.testing.assert_allclose(history.history["temperature"], [3.0, 3.0])
    with pytest.raises(ValueError, match=r"Invalid value for argument `temperature`. Expected a positive number. Received: temperature=-1"):
        distiller.fit(
            x, y, epochs=1, verbose=0,
            callbacks=[DistillationScheduler(temperature=lambda epoch: -1)],
        )
    with pytest.raises(ValueError, match=r"Invalid value for argument `alpha\(0\)`. Expected a number in \[0.0, 1.0\]. Received: alpha\(0\)=2.0"):
        make_distiller(alpha=LinearSchedule(2.0, 0.0, epochs=1))
    with pytest.raises(ValueError, match=r"Expected at least one schedule"):
        DistillationScheduler()
    with pytest.raises(ValueError, match=r"Invalid value for argument `alpha`. Expected a callable"):
        DistillationScheduler(alpha=0.5)


def test_scheduler_needs_a_distiller():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match=r"Expected a `keras_stability.Distiller`. Received: model of type Sequential"):
        model.fit(
            np.zeros((4, 2)), np.zeros((4, 1)), epochs=1, verbose=0,
            callbacks=[DistillationScheduler(alpha=lambda e: 0.5)],
        )
