"""Attaching guards and observers: `ensure_guarded`, `set_clipping`, `ModelObservers`."""

import keras
import numpy as np
import pytest

from keras_stability import clipping
from keras_stability.optimizers import GradientObserver
from keras_stability.optimizers import GuardedOptimizer
from keras_stability.optimizers import attach_observer
from keras_stability.optimizers import detach_observer
from keras_stability.optimizers import ensure_guarded
from keras_stability.optimizers.attach import ModelObservers


def _model(optimizer="sgd"):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2), keras.layers.Dense(1)]
    )
    model.compile(optimizer, "mse")
    return model


def _fit(model, steps=2):
    x = np.ones((4 * steps, 3), "float32")
    model.fit(x, np.ones((4 * steps, 1), "float32"), batch_size=4, verbose=0)


class Counter(GradientObserver):
    def build(self, optimizer, variables):
        self.calls = optimizer.add_variable((), name="counter_calls")

    def observe(self, grads, variables, stats):
        self.calls.assign_add(1.0)


def test_set_clipping_adds_a_policy_once_and_refuses_another():
    guard = GuardedOptimizer(keras.optimizers.SGD(0.1))
    variable = keras.Variable(np.ones(3, "float32"))
    guard.build([variable])
    assert guard.set_clipping(clipping.ZClip(warmup_steps=2)) is True
    assert guard.clipping.mean in guard.variables  # built at once
    assert guard.set_clipping(clipping.ZClip(warmup_steps=2)) is False  # same config
    with pytest.raises(
        ValueError, match="already a GuardedOptimizer with clipping=ZClip"
    ):
        guard.set_clipping(clipping.GlobalNorm(1.0))
    with pytest.raises(ValueError, match="Invalid value for argument `clipping`"):
        guard.set_clipping(None)
    assert guard.set_skip_spikes(True) is True
    assert (
        guard.set_skip_spikes(
            {
                "module": None,
                **keras.saving.serialize_keras_object(clipping.SpikeSkipping()),
            }
        )
        is False
    )
    with pytest.raises(ValueError, match="Invalid value for argument `skip_spikes`"):
        guard.set_skip_spikes(clipping.SpikeSkipping(window=16, min_samples=4))
    guard.apply([keras.ops.ones(3)], [variable])
    assert (
        int(guard.clipping.count.numpy()) == 1
        and int(guard.skip_spikes.count.numpy()) == 1
    )


def test_ensure_guarded_reconfigures_without_a_throwaway_optimizer(monkeypatch):
    model = _model()
    _fit(model)
    guard = ensure_guarded(model)
    made = []
    original = GuardedOptimizer.__init__

    def counting_init(self, *args, **kwargs):
        made.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(GuardedOptimizer, "__init__", counting_init)
    assert ensure_guarded(model, clipping=1.0, skip_spikes=True) is guard
    assert made == []  # set_clipping / set_skip_spikes, no second optimizer
    assert guard.clipping.get_config() == {"max_norm": 1.0}


def test_ensure_guarded_checks_its_arguments_before_touching_the_model():
    model = _model()
    optimizer = model.optimizer
    for kwargs, name in [
        ({"clipping": "zclip"}, "clipping"),
        ({"skip_spikes": "yes"}, "skip_spikes"),
        ({"skip_nonfinite": "False"}, "skip_nonfinite"),
    ]:
        with pytest.raises(ValueError, match=f"Invalid value for argument `{name}`"):
            ensure_guarded(model, **kwargs)
        assert model.optimizer is optimizer
    with pytest.raises(ValueError, match="Invalid value for argument `model`"):
        ensure_guarded(keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)]))


def test_attach_and_detach_observer():
    model = _model()
    _fit(model)
    observer = Counter()
    guard = attach_observer(model, observer)
    assert attach_observer(model, observer) is guard and guard.observers == [observer]
    _fit(model, steps=3)
    assert float(observer.calls.numpy()) == 3.0
    assert detach_observer(model, observer) and not detach_observer(model, observer)
    _fit(model)
    assert float(observer.calls.numpy()) == 3.0  # no longer computed
    with pytest.raises(ValueError, match="Invalid value for argument `observer`"):
        attach_observer(model, "counter")


def test_model_observers_one_per_model_however_many_fits():
    """The audit's leak: a callback reused on two models added an observer per
    fit (2 -> 4 -> 6 -> 8); bound to its model, each guard keeps one."""
    a, b = _model(), _model()
    registry = ModelObservers()
    made = []

    def make():
        made.append(Counter())
        return made[-1]

    counts = []
    for _ in range(4):
        for model in (a, b):
            _, observer = registry.attach(model, make)
            _fit(model)
        counts.append((len(a.optimizer.observers), len(b.optimizer.observers)))
    assert counts == [(1, 1)] * 4
    assert len(made) == 2 and registry.get(a) is made[0] and registry.get(b) is made[1]
    assert float(made[0].calls.numpy()) == 8.0  # 4 fits of 2 steps on `a`
    # A model compiled again: its new guard gets the observer, the old one loses it.
    old_guard = a.optimizer
    a.compile("sgd", "mse")
    _, observer = registry.attach(a, make)
    assert old_guard.observers == [] and a.optimizer.observers == [observer]
    assert (
        registry.detach()
        and a.optimizer.observers == []
        and b.optimizer.observers == []
    )


_LOAD_WITH_KERAS_ALONE = """
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras
import numpy as np
for path in sys.argv[1:]:
    try:
        model = keras.models.load_model(path)
    except Exception as e:
        print("FAIL", type(e).__name__)
        continue
    x = np.ones((4, 3), "float32")
    print(
        "OK", type(model.optimizer).__name__, int(model.optimizer.iterations.numpy()),
        float(model.predict(x, verbose=0)[0, 0]),
    )
assert "keras_stability" not in sys.modules
"""


def test_strip_guard_leaves_a_file_keras_alone_loads(tmp_path):
    # After `fit` with the detector the optimizer is a `GuardedOptimizer`:
    # its `.keras` file loads only where keras_stability is imported. After
    # `strip_guard` the file holds the Adam compiled, with its state.
    import subprocess
    import sys
    import warnings

    from keras_stability.callbacks import GradientExplosionDetector
    from keras_stability.optimizers import strip_guard

    model = _model(keras.optimizers.Adam(1e-3))
    adam = model.optimizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        callbacks = [GradientExplosionDetector(verbose=0)]
        x = np.linspace(-1, 1, 24, dtype="float32").reshape(8, 3)
        model.fit(x, x[:, :1], batch_size=4, epochs=2, verbose=0, callbacks=callbacks)
    assert isinstance(model.optimizer, GuardedOptimizer)
    guarded = str(tmp_path / "guarded.keras")
    model.save(guarded)
    assert strip_guard(model) is adam and model.optimizer is adam
    assert int(adam.iterations.numpy()) == 4
    stripped = str(tmp_path / "stripped.keras")
    model.save(stripped)
    out = subprocess.run(
        [sys.executable, "-c", _LOAD_WITH_KERAS_ALONE, guarded, stripped],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line.split() for line in out.stdout.splitlines()]
    assert lines[0] == ["FAIL", "TypeError"], out.stderr[-2000:]
    assert lines[1][:3] == ["OK", "Adam", "4"], out.stderr[-2000:]
    expected = float(model.predict(np.ones((4, 3), "float32"), verbose=0)[0, 0])
    assert float(lines[1][3]) == pytest.approx(expected, rel=1e-6)


def test_strip_guard_then_fit_again_wraps_the_same_optimizer():
    import warnings

    from keras_stability.callbacks import GradientExplosionDetector
    from keras_stability.optimizers import strip_guard

    model = _model(keras.optimizers.Adam(1e-3))
    adam = model.optimizer
    detector = GradientExplosionDetector(verbose=0)
    x = np.linspace(-1, 1, 24, dtype="float32").reshape(8, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, x[:, :1], batch_size=4, verbose=0, callbacks=[detector])
        strip_guard(model)
        assert model.get_compile_config()["optimizer"]["class_name"] == "Adam"
        model.fit(x, x[:, :1], batch_size=4, verbose=0, callbacks=[detector])
    assert isinstance(model.optimizer, GuardedOptimizer)
    assert model.optimizer.inner_optimizer is adam
    assert int(adam.iterations.numpy()) == 4  # 2 + 2 steps, the moments kept


def test_strip_guard_under_loss_scaling_and_without_a_guard():
    from keras_stability.optimizers import strip_guard

    adam = keras.optimizers.Adam(1e-3)
    scaled = keras.optimizers.LossScaleOptimizer(adam)
    model = _model(scaled)
    ensure_guarded(model)
    assert isinstance(scaled.inner_optimizer, GuardedOptimizer)
    assert strip_guard(model) is scaled and scaled.inner_optimizer is adam
    plain = _model(keras.optimizers.SGD(0.1))
    assert strip_guard(plain) is plain.optimizer
    with pytest.raises(ValueError, match=r"`model`.*a Keras model"):
        strip_guard("model")
    with pytest.raises(ValueError, match=r"`optimizer`.*Received: optimizer='nope'"):
        strip_guard(plain, optimizer="nope")


_LOAD_ONE_WITH_KERAS_ALONE = """
import sys
import keras
model = keras.saving.load_model(sys.argv[1])
rate = model.optimizer.learning_rate
print("OK", type(model.optimizer._learning_rate).__name__, float(rate))
assert "keras_stability" not in sys.modules
"""


@pytest.mark.parametrize(
    "schedule",
    [
        keras.optimizers.schedules.CosineDecay(
            1.0, 200, warmup_target=2.0, warmup_steps=3
        ),
        keras.optimizers.schedules.ExponentialDecay(0.5, 10, 0.9),
        keras.optimizers.schedules.PiecewiseConstantDecay([2, 5], [1.0, 0.5, 0.1]),
        keras.optimizers.schedules.PolynomialDecay(1.0, 50, end_learning_rate=0.1),
    ],
    ids=lambda s: type(s).__name__,
)
def test_strip_guard_turns_a_lowered_schedule_into_keras_own(schedule, tmp_path):
    # After a rollback the detector's schedule is a `ScaledSchedule`: the file
    # failed to load without keras_stability although `strip_guard` ran.
    import subprocess
    import sys

    from keras_stability.callbacks.lr_scaling import ScaledSchedule
    from keras_stability.callbacks.lr_scaling import scale_learning_rate
    from keras_stability.callbacks.lr_scaling import wrap_schedule
    from keras_stability.optimizers import strip_guard

    model = _model(keras.optimizers.Adam(schedule))
    guard = ensure_guarded(model)
    wrap_schedule(guard)
    scale_learning_rate(guard, 0.1)  # what a rollback does
    scaled = guard.inner_optimizer._learning_rate
    assert isinstance(scaled, ScaledSchedule)
    expected = [float(scaled(step)) for step in range(0, 60, 3)]
    adam = strip_guard(model)
    plain = adam._learning_rate
    assert type(plain) is type(schedule)
    np.testing.assert_allclose(
        [float(plain(step)) for step in range(0, 60, 3)], expected, rtol=1e-6
    )
    path = str(tmp_path / "stripped.keras")
    model.save(path)
    out = subprocess.run(
        [sys.executable, "-c", _LOAD_ONE_WITH_KERAS_ALONE, path],
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = out.stdout.split()
    assert line[:2] == ["OK", type(schedule).__name__], out.stderr[-2000:]
    assert float(line[2]) == pytest.approx(expected[0], rel=1e-6)


def test_strip_guard_warns_about_a_lowered_schedule_keras_cannot_load():
    from keras_stability.callbacks.lr_scaling import ScaledSchedule
    from keras_stability.callbacks.lr_scaling import scale_learning_rate
    from keras_stability.callbacks.lr_scaling import wrap_schedule
    from keras_stability.optimizers import strip_guard

    class Halving(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            return 0.5 ** keras.ops.cast(step, "float32")

        def get_config(self):
            return {}

    model = _model(keras.optimizers.Adam(Halving()))
    guard = ensure_guarded(model)
    wrap_schedule(guard)
    scale_learning_rate(guard, 0.1)
    with pytest.warns(UserWarning, match="ScaledSchedule` of a `Halving`"):
        adam = strip_guard(model)
    assert isinstance(adam._learning_rate, ScaledSchedule)  # kept, exact
