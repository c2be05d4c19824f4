"""GuardedOptimizer on one device: skip semantics, statistics, observers, config."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_stability import clipping
from keras_stability.optimizers import GradientObserver
from keras_stability.optimizers import GuardedOptimizer
from keras_stability.optimizers import ensure_guarded
from tests.helpers import run_in_subprocess


def _variables():
    return [
        keras.Variable(np.ones((3, 2), "float32"), name="kernel"),
        keras.Variable(np.zeros((2,), "float32"), name="bias"),
    ]


def _grads(scale=1.0):
    return [
        tf.constant(np.full((3, 2), scale, "float32")),
        tf.constant(np.full((2,), scale, "float32")),
    ]


def _values(variables):
    return [np.array(v.numpy()) for v in variables]


def test_global_norm_clips_to_threshold_and_records_statistics():
    variables = _variables()
    optimizer = GuardedOptimizer(
        keras.optimizers.SGD(1.0), clipping=clipping.GlobalNorm(1.0)
    )
    before = _values(variables)
    optimizer.apply(_grads(2.0), variables)  # norm = 2 * sqrt(8)
    update = [b - a for a, b in zip(_values(variables), before, strict=True)]
    update_norm = np.sqrt(sum(float(np.sum(u**2)) for u in update))
    assert update_norm == pytest.approx(1.0, rel=1e-5)
    stats = optimizer.statistics()
    assert stats["grad_norm"] == pytest.approx(2 * np.sqrt(8), rel=1e-6)
    assert stats["clip_threshold"] == 1.0
    assert stats["steps_clipped"] == 1
    # Below the threshold the gradient is untouched.
    before = _values(variables)
    optimizer.apply(_grads(0.01), variables)
    np.testing.assert_allclose(before[0] - _values(variables)[0], 0.01, rtol=1e-5)
    assert optimizer.statistics()["steps_clipped"] == 1


def test_skipped_step_leaves_weights_moments_iterations_and_schedule():
    variables = _variables()
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 1, 0.5)
    optimizer = GuardedOptimizer(keras.optimizers.Adam(schedule))
    optimizer.apply(_grads(1.0), variables)
    weights = _values(variables)
    inner_state = _values(optimizer.inner_optimizer.variables)
    lr = float(optimizer.learning_rate)
    nan_grads = _grads(1.0)
    nan_grads[1] = tf.constant([np.nan, 1.0])
    optimizer.apply(nan_grads, variables)
    for a, b in zip(weights, _values(variables), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        inner_state, _values(optimizer.inner_optimizer.variables), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert int(optimizer.iterations) == 1
    assert float(optimizer.learning_rate) == lr
    stats = optimizer.statistics()
    assert stats["steps_skipped_nonfinite"] == 1
    assert stats["last_step_skipped"] == 1
    assert stats["step"] == 2
    # Inf is skipped too; a finite step afterwards applies and advances.
    inf_grads = _grads(1.0)
    inf_grads[0] = tf.constant(np.full((3, 2), np.inf, "float32"))
    optimizer.apply(inf_grads, variables)
    assert optimizer.statistics()["steps_skipped_nonfinite"] == 2
    optimizer.apply(_grads(1.0), variables)
    assert int(optimizer.iterations) == 2
    assert optimizer.statistics()["last_step_skipped"] == 0
    assert not np.array_equal(weights[0], _values(variables)[0])


def test_skip_nonfinite_false_lets_nan_through():
    variables = _variables()
    optimizer = GuardedOptimizer(keras.optimizers.SGD(1.0), skip_nonfinite=False)
    grads = _grads(1.0)
    grads[1] = tf.constant([np.nan, 1.0])
    optimizer.apply(grads, variables)
    assert np.isnan(variables[1].numpy()[0])
    assert optimizer.statistics()["steps_skipped_nonfinite"] == 0


def test_skip_next_skips_requested_steps_in_graph():
    variables = _variables()
    optimizer = GuardedOptimizer(keras.optimizers.SGD(1.0))
    optimizer.build(variables)

    @tf.function
    def step(grads):
        optimizer.apply(grads, variables)

    optimizer.skip_next(2)
    before = _values(variables)
    step(_grads(1.0))
    step(_grads(1.0))
    np.testing.assert_array_equal(before[0], _values(variables)[0])
    stats = optimizer.statistics()
    assert stats["steps_skipped_requested"] == 2
    assert stats["skip_remaining"] == 0
    step(_grads(1.0))
    np.testing.assert_allclose(_values(variables)[0], before[0] - 1.0)
    assert int(optimizer.iterations) == 1


def test_trip_holds_every_step_after_too_many_nonfinite_steps_until_cleared():
    variables = _variables()
    optimizer = GuardedOptimizer(keras.optimizers.SGD(1.0))
    assert optimizer.set_trip(1) is True  # before build: applied when built
    optimizer.build(variables)
    assert int(optimizer._loss_record.trip_limit.numpy()) == 1

    @tf.function
    def step(grads):
        optimizer.apply(grads, variables)

    step(_grads(1.0))
    before = _values(variables)
    step(_grads(np.nan))  # 1 non-finite in a row: skipped, no trip
    assert int(optimizer.tripped.numpy()) == 0
    step(_grads(1.0))  # finite: applied, the run restarts
    np.testing.assert_allclose(_values(variables)[0], before[0] - 1.0)
    before = _values(variables)
    step(_grads(np.nan))
    step(_grads(np.nan))  # 2 in a row > 1: tripped
    assert int(optimizer.tripped.numpy()) == 1
    for _ in range(3):  # finite steps are held back while tripped
        step(_grads(1.0))
    for a, b in zip(_values(variables), before, strict=True):
        np.testing.assert_array_equal(a, b)
    stats = optimizer.statistics()
    assert stats["steps_skipped_nonfinite"] == 3
    assert stats["steps_skipped_requested"] == 3  # the held steps
    assert stats["skip_remaining"] == 0
    optimizer.clear_trip()
    step(_grads(1.0))
    np.testing.assert_allclose(_values(variables)[0], before[0] - 1.0)
    # Off (a variable): no retrace needed, a NaN run no longer trips.
    assert optimizer.set_trip(None) is False
    for _ in range(3):
        step(_grads(np.nan))
    assert int(optimizer.tripped.numpy()) == 0
    with pytest.raises(ValueError, match="max_consecutive_nonfinite=-1"):
        optimizer.set_trip(-1)


def test_trip_on_a_nonfinite_loss_with_finite_gradients():
    variables = _variables()
    optimizer = GuardedOptimizer(keras.optimizers.SGD(1.0))
    optimizer.build(variables)
    optimizer.set_trip(3)

    @tf.function
    def step(loss, grads):
        optimizer.scale_loss(loss)
        optimizer.apply(grads, variables)

    before = _values(variables)
    step(tf.constant(float("nan")), _grads(1.0))  # the loss alone is NaN
    assert int(optimizer.tripped.numpy()) == 1
    step(tf.constant(1.0), _grads(1.0))
    for a, b in zip(_values(variables), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_spike_skipping_rejects_outlier_without_recording_it():
    variables = [keras.Variable(np.zeros((1,), "float32"))]
    spikes = clipping.SpikeSkipping(window=8, z_threshold=3.0, min_samples=4)
    optimizer = GuardedOptimizer(keras.optimizers.SGD(0.0), skip_spikes=spikes)
    rng = np.random.default_rng(0)
    norms = 1.0 + 0.1 * rng.normal(size=6)
    for n in norms:
        optimizer.apply([tf.constant([n], "float32")], variables)
    history = spikes.history.numpy().copy()
    optimizer.apply([tf.constant([50.0])], variables)
    stats = optimizer.statistics()
    assert stats["steps_skipped_spike"] == 1
    assert stats["last_step_skipped"] == 1
    np.testing.assert_array_equal(spikes.history.numpy(), history)
    assert int(spikes.count.numpy()) == 6
    optimizer.apply([tf.constant([1.0])], variables)
    assert optimizer.statistics()["last_step_skipped"] == 0
    np.testing.assert_allclose(spikes.history.numpy()[:6], np.abs(norms), rtol=1e-6)


class RecordingObserver(GradientObserver):
    def build(self, optimizer, variables):
        self.norm = optimizer.add_variable((), name="observed_norm")
        self.first = optimizer.add_variable(variables[0].shape, name="observed_grad")
        self.after = optimizer.add_variable((), name="after_calls")
        self.skipped = optimizer.add_variable((), name="after_skipped")
        self.step = optimizer.add_variable((), name="observed_step")

    def observe(self, grads, variables, stats):
        self.norm.assign(stats["global_norm"])
        self.first.assign(grads[0])
        self.step.assign(keras.ops.cast(stats["step"], "float32"))

    def after_apply(self, variables, skipped):
        self.after.assign_add(1.0)
        self.skipped.assign_add(keras.ops.cast(skipped, "float32"))


def test_observer_sees_preclip_grads_and_after_apply():
    variables = _variables()
    observer = RecordingObserver()
    optimizer = GuardedOptimizer(
        keras.optimizers.SGD(1.0),
        clipping=clipping.GlobalNorm(0.1),
        observers=[observer],
    )
    optimizer.apply(_grads(2.0), variables)
    np.testing.assert_allclose(observer.first.numpy(), 2.0)  # pre-clip
    assert float(observer.norm.numpy()) == pytest.approx(2 * np.sqrt(8), rel=1e-6)
    nan_grads = _grads(1.0)
    nan_grads[0] = tf.constant(np.full((3, 2), np.nan, "float32"))
    optimizer.apply(nan_grads, variables)
    assert float(observer.after.numpy()) == 2.0
    assert float(observer.skipped.numpy()) == 1.0
    assert float(observer.step.numpy()) == 1.0
    # Added after build: built at once.
    late = RecordingObserver()
    optimizer.add_observer(late)
    optimizer.apply(_grads(3.0), variables)
    np.testing.assert_allclose(late.first.numpy(), 3.0)


def test_remove_observer_drops_its_variables_and_stops_observing():
    variables = _variables()
    kept, removed = RecordingObserver(), RecordingObserver()
    optimizer = GuardedOptimizer(keras.optimizers.SGD(1.0), observers=[kept, removed])
    optimizer.apply(_grads(2.0), variables)
    before = len(optimizer.variables)
    assert optimizer.remove_observer(removed) is True
    assert optimizer.remove_observer(removed) is False  # not registered any more
    assert optimizer.observers == [kept]
    assert len(optimizer.variables) == before - 5  # its 5 variables
    removed_ids = {
        id(v)
        for v in (
            removed.norm,
            removed.first,
            removed.step,
            removed.after,
            removed.skipped,
        )
    }
    assert not removed_ids & {id(v) for v in optimizer.variables}
    optimizer.apply(_grads(3.0), variables)  # eager: no stale trace
    np.testing.assert_allclose(kept.first.numpy(), 3.0)
    np.testing.assert_allclose(
        removed.first.numpy(), 2.0
    )  # last value kept, not updated
    # A save/load round trip no longer carries it.
    store = {}
    optimizer.save_own_variables(store)
    assert len([k for k in store if k.startswith("observer:")]) == 5


def test_fit_jit_compile_skips_nan_batch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.normal(size=(32, 1)).astype("float32")
    x[8:16] = np.nan  # the second batch
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    optimizer = GuardedOptimizer(keras.optimizers.Adam(0.01), clipping=clipping.ZClip())
    model.compile(optimizer, "mse", jit_compile=True)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert all(np.all(np.isfinite(w.numpy())) for w in model.weights)
    stats = optimizer.statistics()
    assert stats["steps_skipped_nonfinite"] == 1
    assert stats["step"] == 4
    assert int(optimizer.iterations) == 3


def _adamw():
    return keras.optimizers.AdamW(
        0.01,
        weight_decay=0.1,
        use_ema=True,
        ema_overwrite_frequency=3,
        gradient_accumulation_steps=2,
    )


def _fit(optimizer, steps=8):
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(steps * 4, 5)).astype("float32")
    y = rng.normal(size=(steps * 4, 1)).astype("float32")
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(3), keras.layers.Dense(1)]
    )
    model.compile(optimizer, "mse")
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    return model


def test_inner_weight_decay_ema_accumulation_identical_when_not_clipping():
    plain = _fit(_adamw())
    guarded_opt = GuardedOptimizer(_adamw(), clipping=clipping.GlobalNorm(1e9))
    guarded = _fit(guarded_opt)
    for a, b in zip(plain.weights, guarded.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)
    assert int(guarded_opt.iterations) == int(plain.optimizer.iterations) == 4


def _embedding_model(optimizer):
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((6,), dtype="int32"),
            keras.layers.Embedding(5, 3),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer, "mse")
    return model


# Token 1 four times and token 2 twice in every row: the embedding's
# gradient is a tf.IndexedSlices whose indices repeat.
_TOKENS = np.array([[1, 1, 1, 1, 2, 2]] * 4, "int32")
_TARGETS = np.ones((4, 1), "float32")


def test_embedding_gradient_norm_is_measured_on_its_values_as_keras_does():
    # Keras' own `global_clipnorm` squares an IndexedSlices' values (repeated
    # rows are not added up first); the guard measures it the same way, and
    # hands the optimizer the IndexedSlices untouched (see the next test).
    optimizer = GuardedOptimizer(keras.optimizers.SGD(0.0))
    model = _embedding_model(optimizer)
    with tf.GradientTape() as tape:
        loss = keras.ops.mean(keras.losses.mean_squared_error(_TARGETS, model(_TOKENS)))
    grads = tape.gradient(loss, model.trainable_variables)
    assert isinstance(grads[0], tf.IndexedSlices)
    of_values = np.sqrt(
        sum(np.sum(np.square(getattr(g, "values", g).numpy())) for g in grads)
    )
    model.train_on_batch(_TOKENS, _TARGETS)
    np.testing.assert_allclose(float(optimizer.grad_norm), of_values, rtol=1e-5)


@pytest.mark.parametrize("make", [keras.optimizers.Adam, keras.optimizers.SGD])
def test_embedding_updates_equal_the_unguarded_optimizer(make):
    # Keras' Adam updates only the rows an IndexedSlices gradient touches; a
    # guard that made the gradient dense would change that (all rows' moments
    # would decay).
    plain = _embedding_model(make(0.05))
    guarded = _embedding_model(GuardedOptimizer(make(0.05)))
    for _ in range(3):
        plain.train_on_batch(_TOKENS, _TARGETS)
        guarded.train_on_batch(_TOKENS, _TARGETS)
    for a, b in zip(plain.weights, guarded.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


def test_mixed_precision_measures_unscaled_gradients():
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        mixed_opt = GuardedOptimizer(keras.optimizers.SGD(0.01))
        mixed = _fit(mixed_opt, steps=1)
        assert isinstance(mixed.optimizer, keras.optimizers.LossScaleOptimizer)
        assert mixed.optimizer.inner_optimizer is mixed_opt
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    full_opt = GuardedOptimizer(keras.optimizers.SGD(0.01))
    _fit(full_opt, steps=1)
    # The loss scale is 32768; the measured norm is the unscaled one.
    assert float(mixed_opt.grad_norm) == pytest.approx(
        float(full_opt.grad_norm), rel=2e-2
    )


@pytest.mark.parametrize("accumulate", [None, 2])
def test_inner_loss_scale_factor_is_unscaled_before_clipping(accumulate):
    # Keras' static loss scaling (`loss_scale_factor`, a power of two: exact)
    # must change nothing the guard measures or does: the clipping policy
    # sees the unscaled norm (with gradient accumulation, the unscaled
    # mean), so the run equals the unscaled one. Before, the guard refused
    # the optimizer.
    def run(scale):
        inner = keras.optimizers.Adam(
            0.01, loss_scale_factor=scale, gradient_accumulation_steps=accumulate
        )
        guard = GuardedOptimizer(inner, clipping=clipping.GlobalNorm(0.5))
        return _fit(guard), guard

    scaled, scaled_guard = run(1024.0)
    unscaled, unscaled_guard = run(None)
    assert int(scaled_guard.steps_clipped) > 0
    assert int(scaled_guard.steps_clipped) == int(unscaled_guard.steps_clipped)
    assert float(scaled_guard.grad_norm) == float(unscaled_guard.grad_norm)
    assert float(scaled_guard.step_loss) == float(unscaled_guard.step_loss)
    for a, b in zip(scaled.weights, unscaled.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # The factor stays the inner optimizer's (its config, `scale_loss`).
    assert scaled_guard.inner_optimizer.loss_scale_factor == 1024.0
    assert scaled_guard.loss_scale_factor == 1024.0


def test_mixed_precision_drops_the_inner_loss_scale_factor_as_keras_does():
    # Under 'mixed_float16' `compile` wraps the optimizer in a
    # LossScaleOptimizer, which turns off the static scale of what it wraps
    # (Keras: LossScaleOptimizer(Adam(loss_scale_factor=...)) never applies
    # it). Wrapping the guard, that must reach the inner optimizer, or the
    # guard would divide by a factor no one multiplied by.
    def run(guard):
        keras.mixed_precision.set_dtype_policy("mixed_float16")
        try:
            optimizer = keras.optimizers.Adam(0.01, loss_scale_factor=128.0)
            if guard:
                optimizer = GuardedOptimizer(optimizer)
            return _fit(optimizer)
        finally:
            keras.mixed_precision.set_dtype_policy("float32")

    plain, guarded = run(False), run(True)
    assert isinstance(guarded.optimizer, keras.optimizers.LossScaleOptimizer)
    for a, b in zip(plain.weights, guarded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_get_config_round_trip():
    optimizer = GuardedOptimizer(
        keras.optimizers.Adam(0.003),
        clipping=clipping.ZClip(alpha=0.9, max_norm=2.0),
        skip_nonfinite=True,
        skip_spikes=clipping.SpikeSkipping(window=16, min_samples=4),
        name="guard",
    )
    config = optimizer.get_config()
    clone = GuardedOptimizer.from_config(config)
    assert clone.get_config() == config
    assert isinstance(clone.clipping, clipping.ZClip)
    assert clone.clipping.max_norm == 2.0
    assert clone.skip_spikes.window == 16
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, GuardedOptimizer)
    assert restored.get_config() == config


def test_bad_arguments_raise_in_keras_form():
    with pytest.raises(
        ValueError,
        match="Invalid value for argument `inner_optimizer`. Expected a Keras 3",
    ):
        GuardedOptimizer("adam")
    with pytest.raises(
        ValueError,
        match=r"does not clip by itself \(global_clipnorm=None\) when GuardedOptimizer "
        r"clips too .* Received: inner_optimizer with global_clipnorm=1.0",
    ):
        GuardedOptimizer(keras.optimizers.SGD(global_clipnorm=1.0), clipping=1.0)
    with pytest.raises(ValueError, match="clipnorm=2.0"):
        GuardedOptimizer(keras.optimizers.SGD(clipnorm=2.0), clipping=clipping.ZClip())
    with pytest.raises(ValueError, match="not a LossScaleOptimizer"):
        GuardedOptimizer(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()))
    with pytest.raises(ValueError, match="Invalid value for argument `clipping`"):
        GuardedOptimizer(keras.optimizers.SGD(), clipping="zclip")
    with pytest.raises(ValueError, match="Invalid value for argument `skip_spikes`"):
        GuardedOptimizer(keras.optimizers.SGD(), skip_spikes=3)
    with pytest.raises(ValueError, match="does not support `weight_decay`"):
        GuardedOptimizer(keras.optimizers.SGD(), weight_decay=0.1)
    with pytest.raises(ValueError, match="Invalid value for argument `n`"):
        GuardedOptimizer(keras.optimizers.SGD()).skip_next(-1)


def test_ensure_guarded_before_and_after_fit_and_refuses_clipping():
    model = _fit(keras.optimizers.Adam(0.01), steps=2)
    adam = model.optimizer
    traced = model.train_function
    guarded = ensure_guarded(model, clipping=clipping.GlobalNorm(0.001))
    assert model.optimizer is guarded and guarded.inner_optimizer is adam
    assert model.train_function is not traced
    assert ensure_guarded(model) is guarded
    x = np.ones((8, 5), "float32")
    model.fit(x, np.ones((8, 1), "float32"), batch_size=4, verbose=0)
    assert guarded.statistics()["steps_clipped"] == 2
    assert int(adam.iterations) == 4
    with pytest.raises(ValueError, match="already a GuardedOptimizer"):
        ensure_guarded(model, clipping=clipping.ZClip())
    clipped = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    clipped.compile(keras.optimizers.SGD(clipnorm=1.0), "mse")
    with pytest.raises(ValueError, match="clipnorm=1.0"):
        ensure_guarded(clipped, clipping=clipping.GlobalNorm(1.0))
    # Without a policy asked for, the optimizer's own clipping is kept; a
    # policy asked for later (another callback) is refused, naming `clipping`.
    guard = ensure_guarded(clipped)
    assert guard.clipping is None and guard.inner_optimizer.clipnorm == 1.0
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `clipping`. Expected no clipping policy "
        r"for this GuardedOptimizer: its inner optimizer clips by itself "
        r"\(clipnorm=1.0\).* Received: clipping=",
    ):
        ensure_guarded(clipped, clipping=clipping.ZClip())
    assert guard.clipping is None


def _continue_from_file(path, x, y):
    import keras

    import keras_stability  # noqa: F401

    model = keras.saving.load_model(path)
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    stats = model.optimizer.statistics()
    return [w.numpy() for w in model.weights], stats


def _guarded_model():
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(
        GuardedOptimizer(
            keras.optimizers.Adam(0.01),
            clipping=clipping.AutoClip(percentile=50, history_size=16),
            skip_spikes=clipping.SpikeSkipping(window=8, min_samples=4),
        ),
        "mse",
    )
    return model


@pytest.mark.slow
def test_keras_save_fresh_process_continue_equals_uninterrupted(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(24, 5)).astype("float32")
    y = rng.normal(size=(24, 1)).astype("float32")
    whole = _guarded_model()
    whole.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    half = _guarded_model()
    half.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    path = os.path.join(tmp_path, "guarded.keras")
    half.save(path)
    weights, stats = run_in_subprocess(_continue_from_file, path, x, y, n_cpu_devices=1)
    for a, b in zip(whole.weights, weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-6, atol=1e-7)
    assert stats == whole.optimizer.statistics()
    assert stats["step"] == 12


def test_observer_state_saved_by_name_and_restored_when_added_later(tmp_path):
    x = np.ones((8, 5), "float32")
    y = np.ones((8, 1), "float32")
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)])
    observer = RecordingObserver()
    model.compile(
        GuardedOptimizer(keras.optimizers.SGD(0.1), observers=[observer]), "mse"
    )
    model.fit(x, y, batch_size=4, verbose=0)
    path = os.path.join(tmp_path, "observed.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)  # no observer attached: state kept aside
    assert loaded.optimizer.statistics() == model.optimizer.statistics()
    late = loaded.optimizer.add_observer(RecordingObserver())
    np.testing.assert_allclose(late.norm.numpy(), observer.norm.numpy())
    np.testing.assert_allclose(late.first.numpy(), observer.first.numpy())
    assert float(late.after.numpy()) == 2.0


def test_ensure_guarded_adds_missing_parts_in_any_order():
    model = _fit(keras.optimizers.Adam(0.01), steps=2)
    bare = ensure_guarded(model)  # e.g. a monitoring callback first
    assert bare.clipping is None and bare.built
    same = ensure_guarded(model, clipping=clipping.GlobalNorm(1e-3), skip_spikes=True)
    assert same is bare and isinstance(bare.clipping, clipping.GlobalNorm)
    assert isinstance(bare.skip_spikes, clipping.SpikeSkipping)
    x = np.ones((8, 5), "float32")
    model.fit(x, np.ones((8, 1), "float32"), batch_size=4, verbose=0)
    assert bare.statistics()["steps_clipped"] == 2
    assert int(bare.skip_spikes.count.numpy()) == 2
    with pytest.raises(ValueError, match="skip_nonfinite=True; cannot also"):
        ensure_guarded(model, skip_nonfinite=False)


# --- the step's loss, seen in scale_loss -------------------------------------


class _LossObserver(GradientObserver):
    """Collects `stats["loss"]` / `stats["loss_seen"]` of every step in-graph."""

    def build(self, optimizer, variables):
        self.losses = keras.Variable(np.zeros(8, "float32"), trainable=False)
        self.seen = keras.Variable(np.zeros(8, "int32"), trainable=False)

    def observe(self, grads, variables, stats):
        i = stats["step"]
        self.losses.assign(
            tf.tensor_scatter_nd_update(self.losses, [[i]], [stats["loss"]])
        )
        self.seen.assign(
            tf.tensor_scatter_nd_update(
                self.seen, [[i]], [tf.cast(stats["loss_seen"], "int32")]
            )
        )


def _linear_data():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(24, 3)).astype("float32")
    y = rng.normal(size=(24, 1)).astype("float32")
    return x, y


def _batch_losses(x, y, kernel):
    pred = x @ kernel
    return [float(np.mean((pred[i : i + 8] - y[i : i + 8]) ** 2)) for i in (0, 8, 16)]


@pytest.mark.parametrize("steps_per_execution", [1, 3])
def test_step_loss_is_each_batch_loss_seen_in_scale_loss(steps_per_execution):
    # SGD(0): the weights stay, so each step's loss is the batch loss at the
    # initial weights. Every step's value reaches the observers in-graph, also
    # with steps_per_execution > 1, and `step_loss` holds the last one.
    x, y = _linear_data()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.layers[0].kernel.assign(np.ones((3, 1), "float32"))
    observer = _LossObserver()
    guard = GuardedOptimizer(keras.optimizers.SGD(0.0), observers=[observer])
    model.compile(guard, "mse", steps_per_execution=steps_per_execution)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    expected = _batch_losses(x, y, np.ones((3, 1), "float32"))
    np.testing.assert_allclose(observer.losses.numpy()[:3], expected, rtol=1e-5)
    np.testing.assert_array_equal(observer.seen.numpy()[:3], [1, 1, 1])
    assert float(guard.step_loss) == pytest.approx(expected[-1], rel=1e-5)
    assert int(guard.loss_seen) == 1
    loss, seen = guard.step_loss_info()
    assert float(loss) == pytest.approx(expected[-1], rel=1e-5) and bool(seen)
    assert "step_loss" not in guard.statistics()  # not saved, not compared


def test_step_loss_is_nan_when_scale_loss_is_not_called():
    # A custom loop that applies gradients without `scale_loss` (the keras.io
    # lower-level pattern): nothing is seen, and an older value does not stay.
    variables = _variables()
    guard = GuardedOptimizer(keras.optimizers.SGD(0.1))
    assert guard.step_loss is None and guard.loss_seen is None
    loss, seen = guard.step_loss_info()
    assert np.isnan(float(loss)) and not bool(seen)
    guard.build(variables)
    guard.scale_loss(tf.constant(2.5))
    guard.apply(_grads(), variables)
    assert float(guard.step_loss) == 2.5 and int(guard.loss_seen) == 1
    guard.apply(_grads(), variables)  # no scale_loss this step
    assert np.isnan(float(guard.step_loss)) and int(guard.loss_seen) == 0


def test_step_loss_variables_are_not_saved_with_the_optimizer(tmp_path):
    # They are kept out of `variables`: a file saved before they existed loads.
    x, y = _linear_data()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    guard = GuardedOptimizer(keras.optimizers.Adam(0.01))
    model.compile(guard, "mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    names = [v.name for v in guard.variables]
    assert "step_loss" not in names and "pending_loss" not in names
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert np.isnan(float(loaded.optimizer.step_loss))


# --- gradient accumulation: one decision per update, on the accumulated mean ---


def _accumulating_guard(steps=2, learning_rate=1.0, momentum=0.0, **kwargs):
    weight = keras.Variable(np.zeros((1,), "float32"))
    inner = keras.optimizers.SGD(
        learning_rate, momentum=momentum, gradient_accumulation_steps=steps
    )
    guard = GuardedOptimizer(inner, **kwargs)
    guard.build([weight])
    return guard, weight


def _accumulators(guard):
    return [a.numpy().copy() for a in guard.inner_optimizer._accumulated_gradients]


def test_gradient_accumulation_clips_the_accumulated_mean_once():
    # Micro-batches 4 and 0: the update uses their mean, 2, clipped to 1
    # (clipping each micro-batch first would give (1 + 0) / 2 = 0.5).
    guard, weight = _accumulating_guard(clipping=clipping.GlobalNorm(1.0))
    guard.apply([tf.constant([4.0])], [weight])
    assert float(weight.numpy()[0]) == 0.0  # accumulated, not applied yet
    stats = guard.statistics()
    assert stats["grad_norm"] == 4.0  # the micro-batch's norm
    assert stats["steps_clipped"] == 0  # nothing is clipped before the update
    guard.apply([tf.constant([0.0])], [weight])
    assert float(weight.numpy()[0]) == -1.0
    stats = guard.statistics()
    assert stats["grad_norm"] == 2.0  # the accumulated mean's norm
    assert stats["clip_threshold"] == 1.0
    assert stats["steps_clipped"] == 1
    assert int(guard.iterations) == 1
    assert _accumulators(guard) == [0.0]  # the next window starts empty


def test_gradient_accumulation_skips_nonfinite_micro_batches_and_averages_n_finite():
    # N = 3. A NaN micro-batch is not accumulated, whether it falls before
    # or on the update step: the update waits for 3 finite ones, 1, 2 and 6,
    # and clips their mean, 3, to 2.5.
    guard, weight = _accumulating_guard(steps=3, clipping=clipping.GlobalNorm(2.5))
    for g in (1.0, float("nan"), 2.0, float("nan")):
        guard.apply([tf.constant([g])], [weight])
        assert float(weight.numpy()[0]) == 0.0
    assert _accumulators(guard) == [3.0]  # 1 + 2, never NaN
    guard.apply([tf.constant([6.0])], [weight])
    assert float(weight.numpy()[0]) == -2.5
    stats = guard.statistics()
    assert stats["steps_skipped_nonfinite"] == 2
    assert stats["steps_clipped"] == 1 and stats["step"] == 5
    assert int(guard.iterations) == 1


@pytest.mark.parametrize(
    "make_policy",
    [
        lambda: clipping.AutoClip(percentile=50.0, history_size=8),
        lambda: clipping.ZClip(alpha=0.5, warmup_steps=2),
    ],
    ids=["autoclip", "zclip"],
)
def test_gradient_accumulation_policies_learn_only_from_update_steps(make_policy):
    policy = make_policy()
    guard, weight = _accumulating_guard(learning_rate=0.0, clipping=policy)
    for g in (1.0, 3.0, 5.0, 7.0):  # two windows: means 2 and 6
        guard.apply([tf.constant([g])], [weight])
    assert int(policy.count.numpy()) == 2
    if isinstance(policy, clipping.AutoClip):
        np.testing.assert_array_equal(policy.history.numpy()[:2], [2.0, 6.0])
    else:
        assert float(policy.mean.numpy()) == 4.0  # the mean of 2 and 6
    assert guard.statistics()["grad_norm"] == 6.0


def _spike_guard():
    return _accumulating_guard(
        learning_rate=0.1,
        momentum=0.9,
        skip_spikes=clipping.SpikeSkipping(window=8, z_threshold=3.0, min_samples=4),
    )


# Pairs of micro-batches whose norms are about 1 but whose means are about 0.1.
_CALM_WINDOWS = [(1.2, -1.0), (1.22, -1.0), (1.18, -1.0), (1.2, -1.0), (1.21, -1.0)]


def test_gradient_accumulation_spike_in_the_mean_drops_the_whole_window():
    # The window (1, 1) has calm micro-batch norms, but its mean, 1, is a
    # spike against the means ~0.1 before it: the update is skipped, and
    # the window is dropped as if its micro-batches never came.
    guard, weight = _spike_guard()
    twin, twin_weight = _spike_guard()  # never sees the spiking window
    for window in _CALM_WINDOWS:
        for g in window:
            guard.apply([tf.constant([g])], [weight])
            twin.apply([tf.constant([g])], [twin_weight])
    weights = weight.numpy().copy()
    moments = [v.numpy().copy() for v in guard.inner_optimizer.variables]
    for g in (1.0, 1.0):
        guard.apply([tf.constant([g])], [weight])
    stats = guard.statistics()
    assert stats["steps_skipped_spike"] == 1 and stats["last_step_skipped"] == 1
    assert stats["grad_norm"] == 1.0
    np.testing.assert_array_equal(weight.numpy(), weights)
    for before, after in zip(moments, guard.inner_optimizer.variables, strict=True):
        np.testing.assert_array_equal(before, after.numpy())  # momentum, counter
    assert int(guard.iterations) == 5
    assert _accumulators(guard) == [0.0]
    for g in (0.3, -0.1):  # the next window starts clean
        guard.apply([tf.constant([g])], [weight])
        twin.apply([tf.constant([g])], [twin_weight])
    assert guard.statistics()["last_step_skipped"] == 0
    np.testing.assert_array_equal(weight.numpy(), twin_weight.numpy())
    assert not np.array_equal(weight.numpy(), weights)


def test_gradient_accumulation_requested_skip_of_an_update_drops_the_window():
    guard, weight = _accumulating_guard()
    guard.apply([tf.constant([5.0])], [weight])
    guard.skip_next(1)
    guard.apply([tf.constant([7.0])], [weight])  # the update step: skipped
    assert float(weight.numpy()[0]) == 0.0 and _accumulators(guard) == [0.0]
    assert guard.statistics()["steps_skipped_requested"] == 1
    for g in (1.0, 3.0):
        guard.apply([tf.constant([g])], [weight])
    assert float(weight.numpy()[0]) == -2.0  # the mean of 1 and 3 only


def test_gradient_accumulation_observers_see_what_was_measured():
    observer = RecordingObserver()
    weight = keras.Variable(np.zeros((3, 2), "float32"))
    inner = keras.optimizers.SGD(1.0, gradient_accumulation_steps=2)
    guard = GuardedOptimizer(inner, observers=[observer])
    guard.apply([tf.constant(np.full((3, 2), 3.0, "float32"))], [weight])
    np.testing.assert_array_equal(observer.first.numpy(), 3.0)  # the micro-batch
    guard.apply([tf.constant(np.full((3, 2), 1.0, "float32"))], [weight])
    np.testing.assert_array_equal(observer.first.numpy(), 2.0)  # the mean
    assert float(observer.norm.numpy()) == pytest.approx(2.0 * np.sqrt(6), rel=1e-6)
    np.testing.assert_array_equal(weight.numpy(), -2.0)


def test_fit_with_gradient_accumulation_equals_a_hand_computation():
    # Dense(1), MSE, micro-batches of 2 rows, 2 per update, SGD(0.1), the
    # mean clipped to global norm 1: two updates computed by hand.
    x = np.array(
        [[1, 0], [0, 2], [3, 1], [1, 1], [0.5, 0], [0, 1], [1.5, 0.5], [0.5, 0.5]],
        "float32",
    )
    y = np.array([[1.0], [-1.0], [2.0], [0.0], [0.5], [1.0], [-2.0], [1.0]], "float32")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.layers[0].kernel.assign(np.ones((2, 1), "float32"))
    inner = keras.optimizers.SGD(0.1, gradient_accumulation_steps=2)
    guard = GuardedOptimizer(inner, clipping=clipping.GlobalNorm(1.0))
    model.compile(guard, "mse")
    model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0)

    kernel, bias = np.ones((2, 1)), np.zeros((1,))
    norms = []
    for start in (0, 4):
        grads = []
        for i in (start, start + 2):
            xb, yb = x[i : i + 2].astype("float64"), y[i : i + 2].astype("float64")
            error = xb @ kernel + bias - yb
            grads.append((2 * xb.T @ error / 2, 2 * error.sum(axis=0) / 2))
        mean = [(a + b) / 2 for a, b in zip(*grads, strict=True)]
        norm = np.sqrt(sum(np.sum(g**2) for g in mean))
        norms.append(norm)
        scale = min(1.0, 1.0 / norm)
        kernel = kernel - 0.1 * scale * mean[0]
        bias = bias - 0.1 * scale * mean[1]
    assert all(n > 1.0 for n in norms)  # both updates clipped
    np.testing.assert_allclose(model.layers[0].kernel.numpy(), kernel, rtol=1e-5)
    np.testing.assert_allclose(model.layers[0].bias.numpy(), bias, rtol=1e-5)
    assert guard.statistics()["steps_clipped"] == 2
    assert int(guard.iterations) == 2
