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
