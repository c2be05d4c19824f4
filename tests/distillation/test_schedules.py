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
    assert [schedule(e) for e in range(5)] == [8.0, 5.0, 2.0, 2.0, 2.0]
    assert (
        LinearSchedule.from_config(schedule.get_config()).get_config()
        == schedule.get_config()
    )
    assert LinearSchedule(np.float32(1.0), np.int64(2), np.int32(2)).get_config() == {
        "start": 1.0,
        "end": 2.0,
        "epochs": 2,
    }
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `epochs`. Expected an integer >= 2. Received: epochs=1",
    ):
        LinearSchedule(1.0, 2.0, 1)
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `start`. Expected a finite number. Received: start='a'",
    ):
        LinearSchedule("a", 2.0, 2)


def test_linear_schedule_ends_at_end_on_the_last_epoch_of_fit():
    # The README's schedule in a fit of as many epochs. Before: it ended at 3.2.
    x, y = make_data(32)
    distiller = make_distiller(temperature=LinearSchedule(start=8, end=2, epochs=5))
    history = distiller.fit(x, y, epochs=5, batch_size=32, verbose=0)
    assert history.history["temperature"] == pytest.approx([8.0, 6.5, 5.0, 3.5, 2.0])
    assert history.history["temperature"][-1] == 2.0
    assert distiller.temperature == 2.0


def test_compiled_schedules_are_applied_and_logged_per_epoch():
    x, y = make_data(32)
    distiller = make_distiller(
        temperature=LinearSchedule(6.0, 2.0, epochs=2),
        alpha=LinearSchedule(0.0, 1.0, epochs=4),
    )
    history = distiller.fit(x, y, epochs=3, batch_size=16, verbose=0)
    np.testing.assert_allclose(history.history["temperature"], [6.0, 2.0, 2.0])
    np.testing.assert_allclose(history.history["alpha"], [0.0, 1 / 3, 2 / 3], rtol=1e-6)
    # The last epoch's values are in the variables the loss reads.
    assert distiller.temperature == pytest.approx(2.0)
    got = float(distiller.compute_loss(x, y, training=False))
    np.testing.assert_allclose(
        got, reference_loss(distiller, x, y, 2 / 3, 2.0), rtol=1e-5
    )


def test_scheduler_callback_and_out_of_range_values():
    x, y = make_data(32)
    distiller = make_distiller()
    history = distiller.fit(
        x,
        y,
        epochs=2,
        batch_size=16,
        verbose=0,
        callbacks=[DistillationScheduler(alpha=lambda epoch: 0.2 * (epoch + 1))],
    )
    np.testing.assert_allclose(history.history["alpha"], [0.2, 0.4], rtol=1e-6)
    np.testing.assert_allclose(history.history["temperature"], [3.0, 3.0])
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `temperature`. Expected a positive number or a schedule of them; the schedule gives -1 at epoch 0",
    ):
        DistillationScheduler(temperature=lambda epoch: -1)
    # A schedule that leaves the range later is caught when its value is set.
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `temperature`. Expected a positive number. Received: temperature=0.0",
    ):
        distiller.fit(
            x,
            y,
            epochs=2,
            verbose=0,
            callbacks=[DistillationScheduler(temperature=lambda epoch: 1.0 - epoch)],
        )
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `alpha`. Expected a number in \[0, 1\] or a schedule of them; the schedule gives 2.0 at epoch 0. Received: alpha=LinearSchedule\(start=2.0, end=0.0, epochs=2\)",
    ):
        make_distiller(alpha=LinearSchedule(2.0, 0.0, epochs=2))
    with pytest.raises(ValueError, match=r"the schedule gives 2.0 at epoch 3"):
        make_distiller(alpha=LinearSchedule(0.0, 2.0, epochs=4))
    with pytest.raises(ValueError, match=r"Expected at least one schedule"):
        DistillationScheduler()
    with pytest.raises(
        ValueError, match=r"Invalid value for argument `alpha`. Expected a callable"
    ):
        DistillationScheduler(alpha=0.5)


def test_scheduler_needs_a_distiller():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(
        ValueError,
        match=r"Expected a `keras_stability.Distiller`. Received: model of type Sequential",
    ):
        model.fit(
            np.zeros((4, 2)),
            np.zeros((4, 1)),
            epochs=1,
            verbose=0,
            callbacks=[DistillationScheduler(alpha=lambda e: 0.5)],
        )
