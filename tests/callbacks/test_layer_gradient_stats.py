import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_stability.callbacks import LayerGradientStats
from keras_stability.callbacks.layer_gradient_stats import HISTOGRAM_RANGE
from keras_stability.callbacks.layer_gradient_stats import group_variables_by_layer


def _model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(20, 4, name="tok")(inputs)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(6, name="hidden")(h)
    out = keras.layers.Dense(3, name="head")(h)
    return keras.Model(inputs, out)


def _grads(model, seed=1):
    rng = np.random.default_rng(seed)
    return [
        tf.constant(rng.normal(size=v.shape).astype("float32"))
        for v in model.trainable_variables
    ]


def _compiled_sgd_step(obs, grads, variables, lr=0.1):
    """A compiled step: observe, plain SGD update, after_apply."""

    @tf.function
    def step():
        obs.observe(grads, variables, {})
        for g, v in zip(grads, variables, strict=True):
            v.assign_sub(lr * g)
        obs.after_apply(variables, False)

    return step


def _norm(arrays, idx):
    """L2 norm of the arrays at `idx` together, in float64."""
    return np.sqrt(sum(np.sum(arrays[i].astype(np.float64) ** 2) for i in idx))


def test_groups_by_layer_with_embedding_on_its_own():
    model = _model()
    groups = group_variables_by_layer(model)
    assert [(n, k) for n, k, _ in groups] == [
        ("tok", "embedding"),
        ("hidden", "layer"),
        ("head", "layer"),
    ]
    assert sorted(p for _, _, ps in groups for p in ps) == sorted(
        v.path for v in model.trainable_variables
    )


def test_observe_per_layer_norms_and_update_ratio_match_numpy():
    model = _model()
    variables = model.trainable_variables
    obs = LayerGradientStats(groups=group_variables_by_layer(model), histogram_bins=16)
    obs.build(keras.optimizers.SGD(0.1), variables)
    grads = _grads(model)
    before = [v.numpy().copy() for v in variables]

    step = _compiled_sgd_step(obs, grads, variables)

    step()
    stats = obs.read()
    g = [x.numpy() for x in grads]
    # tok: embeddings; hidden: kernel+bias; head: kernel+bias.
    members = [[0], [1, 2], [3, 4]]

    expected = [_norm(g, m) for m in members]
    np.testing.assert_allclose(stats["grad_norms"], expected, rtol=1e-5)
    np.testing.assert_allclose(stats["global_norm"], _norm(g, range(5)), rtol=1e-5)
    np.testing.assert_allclose(
        stats["weight_norms"], [_norm(before, m) for m in members], rtol=1e-5
    )
    after = [v.numpy() for v in variables]
    diff = [a - b for a, b in zip(after, before, strict=True)]
    np.testing.assert_allclose(
        stats["update_ratios"],
        [_norm(diff, m) / _norm(before, m) for m in members],
        rtol=1e-4,
    )
    assert stats["step"] == 1
    # Histogram of log10|g|: every gradient entry counted once per group.
    assert stats["histograms"].shape == (3, 16)
    np.testing.assert_array_equal(
        stats["histograms"].sum(axis=1), [sum(g[i].size for i in m) for m in members]
    )
    lo, hi = HISTOGRAM_RANGE
    edges = np.linspace(lo, hi, 17)
    ref = np.histogram(np.log10(np.abs(g[0].ravel())), bins=edges)[0]
    np.testing.assert_array_equal(stats["histograms"][0], ref)


def test_update_ratio_only_on_report_steps_and_zero_when_skipped():
    model = _model()
    variables = model.trainable_variables
    obs = LayerGradientStats(check_freq=2)
    obs.build(keras.optimizers.SGD(0.1), variables)
    # Without groups each variable's layer (path prefix) is a group.
    assert obs.layer_names == sorted(
        {v.path.rsplit("/", 1)[0] for v in variables}, key=obs.layer_names.index
    )
    assert [n.rsplit("/", 1)[-1] for n in obs.layer_names] == ["tok", "hidden", "head"]
    grads = _grads(model)
    obs.observe(grads, variables, {})  # step 1: not a report step
    obs.after_apply(variables, True)  # skipped: weights unchanged
    assert np.all(obs.read()["update_ratios"] == 0)
    obs.observe(grads, variables, {})  # step 2: report step, still skipped
    obs.after_apply(variables, True)
    assert obs.read()["step"] == 2
    assert np.all(obs.read()["update_ratios"] == 0)
    obs.reset()
    assert obs.read()["step"] == 0


def test_none_gradients_count_as_zero():
    model = _model()
    variables = model.trainable_variables
    obs = LayerGradientStats(
        groups=group_variables_by_layer(model), track_updates=False
    )
    obs.build(keras.optimizers.SGD(0.1), variables)
    grads = _grads(model)
    grads[0] = None
    obs.observe(grads, variables, {})
    stats = obs.read()
    assert stats["grad_norms"][0] == 0.0 and "update_ratios" not in stats


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"check_freq": 0},
            "Invalid value for argument `check_freq`. Expected a positive integer. Received: check_freq=0",
        ),
        ({"histogram_bins": -1}, "Received: histogram_bins=-1"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError) as info:
        LayerGradientStats(**kwargs)
    assert message in str(info.value)


def test_per_layer_norms_only_on_report_or_anomalous_steps():
    model = _model()
    variables = model.trainable_variables
    obs = LayerGradientStats(check_freq=10, track_updates=False, anomaly_factor=3.0)
    obs.build(keras.optimizers.SGD(0.1), variables)
    grads = _grads(model)
    obs.observe(grads, variables, {})  # step 1: first norm, no report
    assert np.all(obs.read()["grad_norms"] == 0)
    assert obs.read()["global_norm"] > 0  # the global norm is kept every step
    obs.observe(grads, variables, {})  # step 2: same norm, nothing computed
    assert np.all(obs.read()["grad_norms"] == 0)
    big = [10.0 * g for g in grads]
    obs.observe(big, variables, {})  # step 3: norm x10 > 3x previous: computed
    expected = np.sqrt(sum(float(np.sum(np.square(g.numpy()))) for g in big[:1]))
    assert obs.read()["grad_norms"][0] == pytest.approx(expected, rel=1e-5)
    nan = [g * np.nan for g in grads]
    obs.observe(nan, variables, {"global_norm": tf.constant(np.nan)})  # non-finite
    assert np.all(np.isnan(obs.read()["grad_norms"]))
    with pytest.raises(ValueError, match="Received: anomaly_factor=1"):
        LayerGradientStats(anomaly_factor=1)


def test_ring_buffer_keeps_the_last_rows_in_step_order():
    model = _model()
    variables = model.trainable_variables
    obs = LayerGradientStats(
        groups=group_variables_by_layer(model),
        check_freq=2,
        histogram_bins=4,
        buffer_size=3,
    )
    obs.build(keras.optimizers.SGD(0.1), variables)
    assert obs.row_width == 1 + 3 * 3 + 3 * 4
    assert len(obs.read_rows()["step"]) == 0  # empty before any step
    latest = {}
    for i in range(10):
        obs.observe(_grads(model, seed=i), variables, {})
        for v in variables:
            v.assign_sub(0.01 * v)
        obs.after_apply(variables, False)
        if (i + 1) % 2 == 0:
            latest[i + 1] = obs.read()
    rows = obs.read_rows()
    assert rows["step"].tolist() == [6, 8, 10]  # 5 reports, 3 rows kept
    for r, step in enumerate(rows["step"].tolist()):
        expected = latest[step]
        for key in ("grad_norms", "weight_norms", "update_ratios", "histograms"):
            np.testing.assert_array_equal(
                rows[key][r], expected[key].astype(np.float32)
            )
        assert rows["global_norm"][r] == np.float32(expected["global_norm"])
    assert rows["update_ratios"].shape == (3, 3) and rows["histograms"].shape == (
        3,
        3,
        4,
    )
    assert obs.read_rows(after_step=8)["step"].tolist() == [10]
    obs.reset()
    assert len(obs.read_rows()["step"]) == 0


def test_read_rows_needs_a_buffer_and_buffer_size_is_validated():
    model = _model()
    obs = LayerGradientStats()
    obs.build(keras.optimizers.SGD(0.1), model.trainable_variables)
    with pytest.raises(ValueError, match="`read_rows` needs a ring buffer"):
        obs.read_rows()
    with pytest.raises(ValueError) as info:
        LayerGradientStats(buffer_size=-1)
    assert str(info.value) == (
        "Invalid value for argument `buffer_size`. Expected a non-negative integer. "
        "Received: buffer_size=-1"
    )


def test_shared_squared_norms_give_the_same_statistics():
    model = _model()
    variables = model.trainable_variables
    grads = _grads(model)
    from keras_stability.clipping.base import global_norm
    from keras_stability.clipping.base import squared_norms

    squares = squared_norms(grads)
    assert float(global_norm(grads, squares)) == float(global_norm(grads))
    results = []
    for stats in ({}, {"squared_norms": squares}):
        obs = LayerGradientStats(
            groups=group_variables_by_layer(model), track_updates=False
        )
        obs.build(keras.optimizers.SGD(0.1), variables)
        obs.observe(grads, variables, stats)
        results.append(obs.read()["grad_norms"])
    np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("check_freq", [1, 2])
def test_update_ratio_in_a_compiled_step_matches_numpy(check_freq):
    # Every step: the ratio uses the weights read before the update (no
    # copy); every other step: a copy taken on report steps. Both exact.
    model = _model()
    variables = model.trainable_variables
    obs = LayerGradientStats(
        groups=group_variables_by_layer(model), check_freq=check_freq
    )
    obs.build(keras.optimizers.SGD(0.1), variables)
    grads = _grads(model)

    step = _compiled_sgd_step(obs, grads, variables)

    for _ in range(check_freq - 1):
        step()  # not a report step
    before = [v.numpy().copy() for v in variables]
    step()
    after = [v.numpy() for v in variables]
    members = [[0], [1, 2], [3, 4]]

    diff = [a - b for a, b in zip(after, before, strict=True)]
    np.testing.assert_allclose(
        obs.read()["update_ratios"],
        [_norm(diff, m) / _norm(before, m) for m in members],
        rtol=1e-4,
    )


def test_every_step_update_ratios_keep_no_copy_of_the_weights():
    model = _model()
    variables = model.trainable_variables
    n_params = sum(int(np.prod(v.shape)) for v in variables)

    def state_size(check_freq):
        # Every number the observer keeps in variables.
        obs = LayerGradientStats(check_freq=check_freq)
        obs.build(keras.optimizers.SGD(0.1), variables)
        held = []
        for value in vars(obs).values():
            held += value if isinstance(value, list) else [value]
        return sum(int(np.prod(v.shape)) for v in held if isinstance(v, keras.Variable))

    # Every step: a few numbers per layer. Every 2 steps: plus a weight copy.
    assert state_size(1) < 20
    assert state_size(2) == state_size(1) + n_params


def test_passed_to_fit_as_a_callback_it_says_where_it_goes():
    from keras_stability.callbacks import ScaledSchedule

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    x, y = np.zeros((4, 3)), np.zeros((4, 2))
    with pytest.raises(ValueError, match=r"observers=\[stats\]"):
        model.fit(x, y, verbose=0, callbacks=[LayerGradientStats()])
    schedule = ScaledSchedule(keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9))
    with pytest.raises(ValueError, match="optimizer's `learning_rate`"):
        model.fit(x, y, verbose=0, callbacks=[schedule])
