import os

import keras
import numpy as np
import pytest

from keras_stability import pruning
from keras_stability.pruning import schedules
from tests.helpers import run_in_subprocess


def _import_order_check():
    """Child: the brief's import order; `tf.keras` must stay Keras 3."""
    import tensorflow as tf

    import keras_stability.pruning as kp

    before = os.environ.get("TF_USE_LEGACY_KERAS")
    schedule_cls = kp.PolynomialDecay  # lazy TF-MOT import through our guard
    after_ours = os.environ.get("TF_USE_LEGACY_KERAS")
    import keras
    import tensorflow_model_optimization as tfmot  # the user's own import

    return {
        "same_dense": tf.keras.layers.Dense is keras.layers.Dense,
        "keras_version": tf.keras.__version__,
        "env_before": before,
        "env_after_ours": after_ours,
        "is_tfmot_class": issubclass(
            schedule_cls, tfmot.sparsity.keras.PolynomialDecay
        ),
    }


def _tfmot_first_check():
    """Child: TF-MOT imported by us before anything touched `tf.keras`."""
    from keras_stability.pruning import _tfmot

    _tfmot.import_tfmot()
    import keras
    import tensorflow as tf

    return {
        "same_dense": tf.keras.layers.Dense is keras.layers.Dense,
        "env": os.environ.get("TF_USE_LEGACY_KERAS"),
    }


def test_importing_pruning_and_tfmot_leaves_tf_keras_as_keras3():
    result = run_in_subprocess(_import_order_check, n_cpu_devices=1)
    assert result["same_dense"] is True
    assert result["keras_version"].startswith("3.")
    assert result["env_before"] is None
    assert result["env_after_ours"] is None
    assert result["is_tfmot_class"] is True


def test_our_tfmot_import_restores_the_environment():
    result = run_in_subprocess(_tfmot_first_check, n_cpu_devices=1)
    assert result == {"same_dense": True, "env": None}


def test_tfmot_schedules_are_accepted_and_validated():
    schedule = pruning.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=10, frequency=2)
    assert schedules.validate_schedule(schedule) is schedule
    should, sparsity = schedules.call_schedule(schedule, np.int64(10))
    assert bool(should) and float(sparsity) == pytest.approx(0.8)
    should, _ = schedules.call_schedule(schedule, np.int64(3))
    assert not bool(should)
    constant = pruning.ConstantSparsity(0.5, begin_step=0, frequency=1)
    assert schedules.validate_schedule(constant) is constant


def test_plain_callables_are_schedules():
    fn = lambda step: (step % 2 == 0, 0.5)  # noqa: E731
    assert schedules.validate_schedule(fn) is fn
    should, sparsity = schedules.call_schedule(fn, np.int64(4))
    assert bool(should) and float(sparsity) == 0.5


@pytest.mark.parametrize(
    "schedule, message",
    [
        (0.5, "Expected a callable `step -> \\(should_prune, sparsity\\)` such as"),
        (lambda step: 0.5, "returning a boolean scalar and a float scalar"),
        (lambda step: (True, 0.5, 1), "returning a boolean scalar and a float scalar"),
        (
            lambda step: (True, [0.5, 0.5]),
            "returning a boolean scalar and a float scalar",
        ),
        (lambda step: (True, 1.0), "Expected a sparsity in \\[0, 1\\) at every step"),
        (lambda step: (True, -0.1), "giving sparsity=-0.1"),
        (
            lambda step: (True, [0.5, 0.9][int(step)]),
            "raising IndexError: list index out of range at step=2",
        ),
    ],
)
def test_bad_schedules_raise_in_keras_form(schedule, message):
    with pytest.raises(
        ValueError, match="Invalid value for argument `pruning_schedule`"
    ):
        schedules.validate_schedule(schedule)
    with pytest.raises(ValueError, match=message):
        schedules.validate_schedule(schedule)


def test_a_schedule_that_never_prunes_is_refused():
    # TF-MOT's default frequency=100 with an end_step the data allows (a
    # small data set): TF-MOT never prunes, silently. Steps count from 1.
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4)])
    for schedule in (
        pruning.PolynomialDecay(0.5, 0.8, begin_step=0, end_step=20),
        pruning.ConstantSparsity(0.5, begin_step=0, end_step=99),
    ):
        with pytest.raises(
            ValueError,
            match="Invalid value for argument `pruning_schedule`. Expected a "
            "schedule with a pruning step between `begin_step` and `end_step`.* "
            "first would be step 100, after end_step.* Received: pruning_schedule=",
        ):
            pruning.prune_low_magnitude(model, schedule)
    # A pruning step exists: at `frequency`, or at `begin_step` >= 1.
    for schedule in (
        pruning.PolynomialDecay(0.5, 0.8, begin_step=0, end_step=20, frequency=20),
        pruning.PolynomialDecay(0.5, 0.8, begin_step=5, end_step=20),
        pruning.ConstantSparsity(0.5, begin_step=0, end_step=100),
        pruning.ConstantSparsity(0.5, begin_step=0),
    ):
        pruning.strip_pruning(pruning.prune_low_magnitude(model, schedule))


def test_tfmot_only_names_say_what_to_use_instead():
    # TF-MOT's comprehensive guide reloads with `with prune_scope(): ...`.
    with pytest.raises(
        AttributeError,
        match="no attribute 'prune_scope' \\(TF-MOT's\\): .*load_model` needs no "
        "scope.*initial_step=model.optimizer.iterations",
    ):
        pruning.prune_scope  # noqa: B018
    with pytest.raises(AttributeError, match="'PruneForLatencyOnXNNPack'.*filters="):
        pruning.PruneForLatencyOnXNNPack  # noqa: B018
    with pytest.raises(AttributeError, match="'PrunableLayer'.*filters="):
        pruning.PrunableLayer  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nothing'$"):
        pruning.nothing  # noqa: B018


@pytest.mark.parametrize(
    "schedule, step, previous, following",
    [
        # TF-MOT's default frequency=100 from step 0: the first turn is 100.
        (lambda: pruning.ConstantSparsity(0.5, 0), 6, None, 100),
        (lambda: pruning.ConstantSparsity(0.5, 0), 250, 200, 300),
        (lambda: pruning.ConstantSparsity(0.5, 5, frequency=10), 4, None, 5),
        (lambda: pruning.ConstantSparsity(0.5, 5, frequency=10), 15, 15, 25),
        (lambda: pruning.PolynomialDecay(0.0, 0.8, 0, 30, frequency=20), 35, 20, None),
        (lambda: pruning.PolynomialDecay(0.0, 0.8, 0, 40, frequency=10), 40, 40, None),
    ],
)
def test_previous_and_next_pruning_steps(schedule, step, previous, following):
    schedule = schedule()
    assert schedules.previous_pruning_step(schedule, step) == previous
    assert schedules.next_pruning_step(schedule, step) == following
    # The same as asking the schedule itself, step by step.
    turns = [
        s
        for s in range(1, 400)
        if bool(schedules.call_schedule(schedule, keras.ops.convert_to_tensor(s))[0])
    ]
    assert previous == max([s for s in turns if s <= step], default=None)
    assert following == min([s for s in turns if s > step], default=None)
    assert schedules.next_pruning_step(lambda s: (True, 0.5), step) is None
