import keras
import numpy as np
import pytest

from keras_stability.callbacks import GradualUnfreezing
from keras_stability.callbacks.gradual_unfreezing import unfrozen_count


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    backbone = [
        keras.layers.Dense(8, activation="tanh", name=f"b{i}") for i in range(3)
    ]
    model = keras.Sequential(
        [keras.Input((4,)), *backbone, keras.layers.Dense(2, name="head")]
    )
    for layer in backbone:
        layer.trainable = False
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model, backbone


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(32, 4)).astype("float32"), rng.normal(size=(32, 2)).astype(
        "float32"
    )


class _Recorder(keras.callbacks.Callback):
    def __init__(self, names):
        super().__init__()
        self.names = names
        self.changed = []
        self.optimizers = []
        self.head_moment_begin = []
        self.head_moment_end = []

    def _kernels(self):
        return {n: self.model.get_layer(n).kernel.numpy().copy() for n in self.names}

    def _head_moment(self):
        opt = self.model.optimizer
        index = opt._get_variable_index(self.model.get_layer("head").kernel)
        return opt._momentums[index].numpy().copy()

    def on_epoch_begin(self, epoch, logs=None):
        self._before = self._kernels()
        self.optimizers.append(self.model.optimizer)
        self.head_moment_begin.append(self._head_moment())

    def on_epoch_end(self, epoch, logs=None):
        after = self._kernels()
        self.changed.append(
            [n for n in self.names if not np.array_equal(after[n], self._before[n])]
        )
        self.head_moment_end.append(self._head_moment())


def test_unfreezes_top_down_one_layer_per_epoch():
    model, backbone = _model()
    x, y = _data()
    recorder = _Recorder(["b0", "b1", "b2", "head"])
    history = model.fit(
        x,
        y,
        epochs=4,
        batch_size=16,
        verbose=0,
        callbacks=[GradualUnfreezing(1), recorder],
    )
    assert recorder.changed == [
        ["head"],
        ["b2", "head"],
        ["b1", "b2", "head"],
        ["b0", "b1", "b2", "head"],
    ]
    assert history.history["unfrozen_layers"] == [0, 1, 2, 3]
    assert all(layer.trainable for layer in backbone)


def test_optimizer_state_is_kept_for_layers_already_training():
    model, _ = _model()
    x, y = _data()
    recorder = _Recorder(["head"])
    model.fit(
        x,
        y,
        epochs=3,
        batch_size=16,
        verbose=0,
        callbacks=[GradualUnfreezing(1), recorder],
    )
    optimizer = model.optimizer
    # One optimizer for the whole fit, never rebuilt or reset ...
    assert all(opt is optimizer for opt in recorder.optimizers)
    assert int(optimizer.iterations.numpy()) == 3 * 2
    # ... so the head's Adam moment carries over each unfreezing.
    for epoch in (1, 2):
        np.testing.assert_array_equal(
            recorder.head_moment_begin[epoch], recorder.head_moment_end[epoch - 1]
        )
        assert np.abs(recorder.head_moment_begin[epoch]).sum() > 0


def test_dict_schedule_and_named_layers_and_reuse():
    model, backbone = _model()
    x, y = _data()
    callback = GradualUnfreezing({0: 0, 2: 2}, layers=["b1", "b2"])
    history = model.fit(x, y, epochs=3, batch_size=32, verbose=0, callbacks=[callback])
    assert history.history["unfrozen_layers"] == [0, 0, 2]
    assert [layer.trainable for layer in backbone] == [False, True, True]
    # A second fit starts frozen again and follows the schedule.
    recorder = _Recorder(["b1", "b2"])
    model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[callback, recorder])
    assert recorder.changed == [[]]
    assert [layer.trainable for layer in backbone] == [False, False, False]


def test_optimizer_with_steps_but_without_frozen_weights_is_rejected():
    model, _ = _model()
    x, y = _data()
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    with pytest.raises(
        ValueError,
        match=r"Invalid optimizer for `GradualUnfreezing`: it has taken 1 steps without the weights of the frozen layers",
    ):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[GradualUnfreezing(1)])


def test_unfrozen_count():
    assert [unfrozen_count(2, e) for e in range(5)] == [0, 0, 1, 1, 2]
    assert [unfrozen_count({1: 1, 3: 3}, e) for e in range(5)] == [0, 1, 1, 3, 3]
    assert unfrozen_count(lambda e: e - 1, 0) == 0


@pytest.mark.parametrize(
    "schedule, message",
    [
        (
            0,
            "Invalid value for argument `schedule`. Expected a positive integer (epochs per unfrozen layer), a dict {epoch: number of layers unfrozen} or a function. Received: schedule=0",
        ),
        (
            {1: -1},
            "Invalid value for argument `schedule`. Expected a non-empty dict {epoch: number of layers unfrozen} of non-negative integers. Received: schedule={1: -1}",
        ),
        ("fast", "Received: schedule='fast'"),
    ],
)
def test_bad_schedule(schedule, message):
    with pytest.raises(ValueError) as info:
        GradualUnfreezing(schedule)
    assert message in str(info.value)


def test_unknown_layer_name():
    model, _ = _model()
    x, y = _data()
    with pytest.raises(ValueError, match="Received: unknown layer 'nope'"):
        model.fit(
            x, y, epochs=1, verbose=0, callbacks=[GradualUnfreezing(1, layers=["nope"])]
        )


def test_works_with_the_guard_and_the_detector():
    # The optimizer (and the detector's per-layer statistics) are built over
    # every scheduled weight, while a step's gradients cover only the unfrozen
    # ones: the per-layer sums used to fail at the first step on the length
    # mismatch (seen in benchmarks/fine_tuning's gradual row).
    from keras_stability.callbacks import GradientExplosionDetector
    from keras_stability.callbacks import GradientMonitor

    model, backbone = _model()
    x, y = _data()
    detector = GradientExplosionDetector()
    monitor = GradientMonitor()
    recorder = _Recorder([layer.name for layer in backbone] + ["head"])
    recorder._head_moment = lambda: None  # the guard wraps Adam's slots
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=3,
        verbose=0,
        callbacks=[GradualUnfreezing(schedule=1), detector, monitor, recorder],
    )
    assert recorder.changed[0] == ["head"]
    assert set(recorder.changed[2]) == {"b1", "b2", "head"}
    assert detector.rollbacks == 0
    # The monitor saw every step, and measured the frozen layers as zero.
    history = monitor.history
    assert len(history["global_norm"]) == 12
    assert all(np.isfinite(history["global_norm"]))
    assert all(np.isfinite(w).all() for w in model.get_weights())


# --------------------------------------------------- discriminative rates
def _two_groups(seed=0):
    """b0 (lower group), b1 (upper group), head; b0 and b1 scheduled."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh", name="b0"),
            keras.layers.Dense(8, activation="tanh", name="b1"),
            keras.layers.Dense(2, name="head"),
        ],
        name="m",
    )
    return model


def _weights(model):
    return {v.path: np.array(v.numpy()) for v in model.weights}


def _reference(optimizer_fn, factor, x, y, batch_size, steps):
    """Per-layer rates the plain way: one optimizer per group, own lr."""
    import tensorflow as tf

    model = _two_groups()
    rates = {"b0": factor**-2, "b1": factor**-1, "head": 1.0}
    groups = {name: model.get_layer(name).trainable_variables for name in rates}
    optimizers = {name: optimizer_fn(rates[name]) for name in rates}
    loss_fn = keras.losses.MeanSquaredError()
    for step in range(steps):
        xb = x[step * batch_size : (step + 1) * batch_size]
        yb = y[step * batch_size : (step + 1) * batch_size]
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        by_path = {
            v.path: g for v, g in zip(model.trainable_variables, grads, strict=True)
        }
        for name, variables in groups.items():
            optimizers[name].apply([by_path[v.path] for v in variables], variables)
    return _weights(model)


@pytest.mark.parametrize(
    "optimizer_fn",
    [
        lambda scale: keras.optimizers.SGD(0.1 * scale, momentum=0.9),
        lambda scale: keras.optimizers.Adam(1e-2 * scale),
        lambda scale: keras.optimizers.AdamW(1e-2 * scale, weight_decay=0.5),
    ],
    ids=["sgd_momentum", "adam", "adamw"],
)
def test_discriminative_rates_equal_per_layer_learning_rates(optimizer_fn):
    factor, batch_size, steps = 2.6, 8, 4
    x, y = _data()
    model = _two_groups()
    start = _weights(model)
    model.compile(optimizer=optimizer_fn(1.0), loss="mse")
    callback = GradualUnfreezing(
        {0: 2}, layers=["b0", "b1"], discriminative_factor=factor
    )
    model.fit(
        x[: batch_size * steps],
        y[: batch_size * steps],
        batch_size=batch_size,
        shuffle=False,
        epochs=1,
        verbose=0,
        callbacks=[callback],
    )
    assert callback.multipliers == {
        "m/b0/kernel": pytest.approx(factor**-2),
        "m/b0/bias": pytest.approx(factor**-2),
        "m/b1/kernel": pytest.approx(factor**-1),
        "m/b1/bias": pytest.approx(factor**-1),
    }
    got = _weights(model)
    want = _reference(optimizer_fn, factor, x, y, batch_size, steps)
    full = _reference(optimizer_fn, 1.0, x, y, batch_size, steps)
    for path in got:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-6)
    # Not the full-rate run: the lower group moved about f**2 less.
    moved = np.abs(got["m/b0/kernel"] - start["m/b0/kernel"]).sum()
    moved_full = np.abs(full["m/b0/kernel"] - start["m/b0/kernel"]).sum()
    assert moved < 0.3 * moved_full
    # The optimizer is back to its own method after fit.
    assert "_backend_apply_gradients" not in vars(model.optimizer)


def test_discriminative_rates_scale_one_step_exactly_with_guard_and_detector():
    from keras_stability.callbacks import GradientExplosionDetector
    from keras_stability.clipping import ZClip
    from keras_stability.optimizers import GuardedOptimizer

    factor = 3.0
    x, y = _data()

    def one_step(discriminative_factor):
        model = _two_groups()
        start = _weights(model)
        model.compile(
            optimizer=GuardedOptimizer(keras.optimizers.Adam(1e-2), clipping=ZClip()),
            loss="mse",
        )
        detector = GradientExplosionDetector(action="rollback", verbose=0)
        callback = GradualUnfreezing(
            {0: 2},
            layers=["b0", "b1"],
            discriminative_factor=discriminative_factor,
        )
        model.fit(
            x, y, batch_size=32, epochs=1, verbose=0, callbacks=[callback, detector]
        )
        assert detector.events == []
        assert "_backend_apply_gradients" not in vars(model.optimizer.inner_optimizer)
        return {p: w - start[p] for p, w in _weights(model).items()}

    scaled, full = one_step(factor), one_step(1.0)
    for path in full:
        rate = {"b0": factor**-2, "b1": factor**-1, "head": 1.0}[path.split("/")[1]]
        assert np.abs(full[path]).min() > 0, path
        np.testing.assert_allclose(scaled[path], rate * full[path], rtol=1e-4)


def test_discriminative_factor_config_and_errors():
    callback = GradualUnfreezing(2, layers=["b0"], discriminative_factor=2.6)
    assert callback.get_config() == {
        "schedule": 2,
        "layers": ["b0"],
        "discriminative_factor": 2.6,
        "verbose": 0,
    }
    assert GradualUnfreezing(**callback.get_config()).get_config() == (
        callback.get_config()
    )
    for bad in (0.5, 0, -2, "2", None, True, float("nan")):
        with pytest.raises(ValueError) as info:
            GradualUnfreezing(1, discriminative_factor=bad)
        assert str(info.value).startswith(
            "Invalid value for argument `discriminative_factor`. Expected a number"
        ), str(info.value)
        assert f"Received: discriminative_factor={bad!r}" in str(info.value)
    model = _two_groups()
    model.compile(optimizer=keras.optimizers.Adam(use_ema=True), loss="mse")
    x, y = _data()
    with pytest.raises(ValueError, match="does not support an optimizer with `use_ema"):
        model.fit(
            x,
            y,
            epochs=1,
            verbose=0,
            callbacks=[GradualUnfreezing(1, layers=["b0"], discriminative_factor=2)],
        )


def test_config_round_trip_through_json_with_a_dict_schedule():
    import json

    callback = GradualUnfreezing({0: 1, 3: 2}, layers=["b1", "b2"], verbose=1)
    config = json.loads(json.dumps(callback.get_config()))
    revived = GradualUnfreezing.from_config(config)
    assert revived.schedule == {0: 1, 3: 2}
    assert revived.get_config() == callback.get_config()
