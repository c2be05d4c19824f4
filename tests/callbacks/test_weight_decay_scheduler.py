import keras
import numpy as np
import pytest

from keras_stability.callbacks import WeightDecayScheduler


class Counting(keras.Sequential):
    """Counts the traces of its train step (Python runs only when tracing)."""

    traces = 0

    def train_step(self, data):
        type(self).traces += 1
        return super().train_step(data)


def _model(weight_decay=0.1, learning_rate=0.1, cls=keras.Sequential):
    keras.utils.set_random_seed(0)
    model = cls([keras.Input((3,)), keras.layers.Dense(2, use_bias=False)])
    # A loss with zero gradient: only the decoupled decay moves the weights.
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate, weight_decay=weight_decay),
        loss=lambda y_true, y_pred: 0.0 * keras.ops.sum(y_pred),
    )
    return model


X = np.ones((8, 3), "float32")
Y = np.zeros((8, 2), "float32")


def test_function_schedule_sets_decay_each_epoch_exactly():
    model = _model()
    kernel = model.layers[0].kernel
    w0 = kernel.numpy().copy()
    schedule = WeightDecayScheduler(lambda epoch, wd: [0.1, 0.0, 0.5][epoch])
    history = model.fit(X, Y, epochs=3, batch_size=4, verbose=0, callbacks=[schedule])
    # Two steps per epoch, each w *= 1 - lr * wd.
    expected = w0 * (1 - 0.1 * 0.1) ** 2 * (1 - 0.1 * 0.5) ** 2
    np.testing.assert_allclose(kernel.numpy(), expected, rtol=1e-6)
    assert history.history["weight_decay"] == pytest.approx([0.1, 0.0, 0.5])
    assert isinstance(model.optimizer.weight_decay, float)
    assert model.optimizer.weight_decay == pytest.approx(0.5)


def test_receives_current_value_and_reuses_across_fits():
    model = _model(weight_decay=0.2)
    seen = []

    def halve(epoch, wd):
        seen.append((epoch, round(wd, 6)))
        return wd / 2

    callback = WeightDecayScheduler(halve)
    model.fit(X, Y, epochs=2, batch_size=8, verbose=0, callbacks=[callback])
    model.fit(X, Y, epochs=1, batch_size=8, verbose=0, callbacks=[callback])
    assert seen == [(0, 0.2), (1, 0.1), (0, 0.05)]
    assert model.optimizer.weight_decay == pytest.approx(0.025)


def test_a_new_scheduler_in_each_fit_does_not_retrace():
    # `callbacks=[WeightDecayScheduler(...)]` written in each `fit` call.
    # Before, each new instance made its own variable and traced the step
    # again; now it takes the one the traced step reads.
    model = _model(weight_decay=0.2, cls=Counting)
    kernel = model.layers[0].kernel
    functions, values = [], []
    for factor in (0.5, 0.25, 1.0):
        w0 = kernel.numpy().copy()
        scheduler = WeightDecayScheduler(lambda epoch, wd, f=factor: wd * f)
        model.fit(X, Y, epochs=1, batch_size=4, verbose=0, callbacks=[scheduler])
        functions.append(model.train_function)
        values.append(model.optimizer.weight_decay)
        # Two steps at this fit's value (decay only: the loss has no gradient).
        expected = w0 * (1 - 0.1 * values[-1]) ** 2
        np.testing.assert_allclose(kernel.numpy(), expected, rtol=1e-6)
    assert values == pytest.approx([0.1, 0.025, 0.025])
    assert functions[1] is functions[0] and functions[2] is functions[0]
    assert Counting.traces == 1


def test_learning_rate_schedule_object_is_evaluated_at_the_step():
    model = _model(weight_decay=1.0)
    cosine = keras.optimizers.schedules.CosineDecay(0.4, decay_steps=4)
    history = model.fit(
        X,
        Y,
        epochs=3,
        batch_size=4,
        verbose=0,
        callbacks=[WeightDecayScheduler(cosine)],
    )
    expected = [float(cosine(step)) for step in (0, 2, 4)]
    np.testing.assert_allclose(history.history["weight_decay"], expected, rtol=1e-6)


def test_config_stays_a_float_during_fit_and_model_saves(tmp_path):
    model = _model()
    configs = []
    probe = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda e, logs: configs.append(
            model.optimizer.get_config()["weight_decay"]
        )
    )
    model.fit(
        X,
        Y,
        epochs=2,
        verbose=0,
        callbacks=[WeightDecayScheduler(lambda e, wd: 0.3 + e), probe],
    )
    assert configs == [pytest.approx(0.3), pytest.approx(1.3)]
    assert all(type(c) is float for c in configs)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, compile=True, safe_mode=False)
    assert loaded.optimizer.weight_decay == pytest.approx(1.3)


def test_optimizer_without_weight_decay_is_rejected():
    model = _model(weight_decay=None)
    with pytest.raises(
        ValueError,
        match=r"Invalid optimizer for `WeightDecayScheduler`\. Expected an optimizer with decoupled weight decay .* Received: SGD with weight_decay=None",
    ):
        model.fit(
            X,
            Y,
            epochs=1,
            verbose=0,
            callbacks=[WeightDecayScheduler(lambda e, wd: 0.1)],
        )


def test_bad_schedule_and_bad_values():
    with pytest.raises(
        ValueError, match="Invalid value for argument `schedule`. Expected a function"
    ):
        WeightDecayScheduler(0.1)
    model = _model()
    with pytest.raises(
        ValueError,
        match=r"Invalid value returned by `schedule`\. Expected a finite number >= 0\. Received: weight_decay=-1\.0 at epoch 0",
    ):
        model.fit(
            X,
            Y,
            epochs=1,
            verbose=0,
            callbacks=[WeightDecayScheduler(lambda e, wd: -1.0)],
        )
