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
