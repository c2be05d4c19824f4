"""Distiller: the loss, training behaviour, metrics, errors and saving."""

import os
import warnings

import keras
import numpy as np
import pytest

import keras_stability
from keras_stability.distillation import Distiller
from keras_stability.distillation import FeatureDistillation
from tests.distillation.test_losses import np_kl
from tests.distillation.test_losses import np_softmax

N_FEATURES, N_CLASSES = 6, 4


def make_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, N_FEATURES)).astype("float32")
    y = rng.integers(0, N_CLASSES, size=n).astype("int32")
    return x, y


def make_model(width, name, seed=0, batchnorm=False, dropout=0.0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((N_FEATURES,), name=f"{name}_input")
    h = keras.layers.Dense(width, activation="relu", name=f"{name}_hidden")(inputs)
    if batchnorm:
        h = keras.layers.BatchNormalization(name=f"{name}_bn")(h)
    if dropout:
        h = keras.layers.Dropout(dropout, name=f"{name}_dropout")(h)
    outputs = keras.layers.Dense(N_CLASSES, name=f"{name}_logits")(h)
    return keras.Model(inputs, outputs, name=name)


def make_distiller(
    feature_distillation=None, teacher_width=32, student_width=8, **compile_kwargs
):
    teacher = make_model(teacher_width, "teacher", seed=1)
    student = make_model(student_width, "student", seed=2)
    distiller = Distiller(student, teacher, feature_distillation=feature_distillation)
    kwargs = dict(
        optimizer=keras.optimizers.SGD(0.1),
        metrics=[keras.metrics.SparseCategoricalAccuracy()],
        student_loss_fn=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        distillation_loss_fn=keras.losses.KLDivergence(),
        alpha=0.1,
        temperature=3,
    )
    kwargs.update(compile_kwargs)
    distiller.compile(**kwargs)
    return distiller


def np_sparse_ce(logits, y):
    p = np_softmax(logits)
    return -np.log(p[np.arange(len(y)), y])


def reference_loss(distiller, x, y, alpha, temperature, sample_weight=None, t2=True):
    s = keras.ops.convert_to_numpy(distiller.student(x, training=False))
    t = keras.ops.convert_to_numpy(distiller.teacher(x, training=False))
    w = np.ones(len(x), "float32") if sample_weight is None else sample_weight
    n = len(x)
    student_loss = np.sum(w * np_sparse_ce(s, y)) / n
    kl = np.sum(w * np_kl(np_softmax(t / temperature), np_softmax(s / temperature))) / n
    return alpha * student_loss + (1 - alpha) * (temperature**2 if t2 else 1.0) * kl


# ------------------------------------------------------------------- the loss
@pytest.mark.parametrize(
    "alpha,temperature", [(0.1, 3.0), (0.5, 1.0), (0.0, 10.0), (1.0, 2.0)]
)
def test_loss_equals_hinton_formula(alpha, temperature):
    x, y = make_data(32)
    distiller = make_distiller(alpha=alpha, temperature=temperature)
    got = float(distiller.compute_loss(x, y, training=False))
    expected = reference_loss(distiller, x, y, alpha, temperature)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_temperature_squared_scaling_can_be_turned_off():
    x, y = make_data(32)
    on = make_distiller(temperature=4.0)
    off = make_distiller(temperature=4.0, scale_by_temperature_squared=False)
    got_on = float(on.compute_loss(x, y, training=False))
    got_off = float(off.compute_loss(x, y, training=False))
    np.testing.assert_allclose(got_on, reference_loss(on, x, y, 0.1, 4.0), rtol=1e-5)
    np.testing.assert_allclose(
        got_off, reference_loss(off, x, y, 0.1, 4.0, t2=False), rtol=1e-5
    )
    assert got_on > got_off


def test_sample_weight_enters_every_term():
    x, y = make_data(32)
    w = np.linspace(0.0, 2.0, 32).astype("float32")
    distiller = make_distiller()
    got = float(distiller.compute_loss(x, y, sample_weight=w, training=False))
    np.testing.assert_allclose(
        got, reference_loss(distiller, x, y, 0.1, 3.0, w), rtol=1e-5
    )
    unweighted = float(distiller.compute_loss(x, y, training=False))
    assert abs(got - unweighted) > 1e-3


def test_zero_sample_weight_leaves_student_unchanged_in_fit():
    x, y = make_data(32)
    distiller = make_distiller()
    before = [v.numpy().copy() for v in distiller.student.weights]
    distiller.fit(
        x, y, sample_weight=np.zeros(32, "float32"), batch_size=16, epochs=1, verbose=0
    )
    for a, b in zip(before, distiller.student.weights, strict=True):
        np.testing.assert_array_equal(a, b.numpy())
    distiller.fit(
        x, y, sample_weight=np.ones(32, "float32"), batch_size=16, epochs=1, verbose=0
    )
    assert any(
        not np.array_equal(a, b.numpy())
        for a, b in zip(before, distiller.student.weights, strict=True)
    )


def test_keras_io_compile_signature_positional():
    teacher, student = make_model(16, "teacher", 1), make_model(8, "student", 2)
    distiller = Distiller(student=student, teacher=teacher)
    distiller.compile(
        keras.optimizers.Adam(),
        [keras.metrics.SparseCategoricalAccuracy()],
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        keras.losses.KLDivergence(),
        alpha=0.1,
        temperature=10,
    )
    assert distiller.alpha == pytest.approx(0.1)
    assert distiller.temperature == pytest.approx(10.0)
    x, y = make_data(32)
    history = distiller.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert np.isfinite(history.history["loss"][0])


# ------------------------------------------------------------- training, metrics
def test_teacher_weights_never_change_in_fit():
    teacher = make_model(16, "teacher", seed=1, batchnorm=True, dropout=0.5)
    student = make_model(8, "student", seed=2)
    distiller = Distiller(student, teacher)
    distiller.compile(
        optimizer=keras.optimizers.Adam(0.05),
        student_loss_fn=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = make_data(64)
    teacher_before = [v.numpy().copy() for v in teacher.weights]
    student_before = [v.numpy().copy() for v in student.weights]
    assert not teacher.trainable
    assert {v.path for v in distiller.trainable_variables} == {
        v.path for v in student.trainable_variables
    }
    distiller.fit(x, y, epochs=2, batch_size=16, verbose=0)
    # All teacher variables, BatchNorm moving statistics included, are untouched.
    for a, b in zip(teacher_before, teacher.weights, strict=True):
        np.testing.assert_array_equal(a, b.numpy())
    assert any(
        not np.array_equal(a, b.numpy())
        for a, b in zip(student_before, student.weights, strict=True)
    )


def test_evaluate_reports_agreement_and_predict_returns_student_outputs():
    x, y = make_data(64)
    distiller = make_distiller()
    distiller.fit(x, y, epochs=1, batch_size=16, verbose=0)
    logs = distiller.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    s = np.asarray(distiller.student.predict(x, verbose=0))
    t = np.asarray(distiller.teacher.predict(x, verbose=0))
    assert logs["teacher_agreement"] == pytest.approx(
        np.mean(s.argmax(-1) == t.argmax(-1))
    )
    assert logs["sparse_categorical_accuracy"] == pytest.approx(
        np.mean(s.argmax(-1) == y)
    )
    assert logs["student_loss"] == pytest.approx(np.mean(np_sparse_ce(s, y)), rel=1e-4)
    assert logs["loss"] == pytest.approx(
        reference_loss(distiller, x, y, 0.1, 3.0), rel=1e-4
    )
    np.testing.assert_allclose(distiller.predict(x, verbose=0), s, rtol=1e-6)
    # Keras' convention: one value per `metrics_names`, loss first (the
    # hyperparameters alpha and temperature are logged in training only).
    values = distiller.evaluate(x, y, batch_size=64, verbose=0)
    assert distiller.metrics_names == [
        "loss",
        "compile_metrics",
        "student_loss",
        "distillation_loss",
        "teacher_agreement",
    ]
    assert values == pytest.approx(
        [
            logs["loss"],
            logs["sparse_categorical_accuracy"],
            logs["student_loss"],
            logs["distillation_loss"],
            logs["teacher_agreement"],
        ]
    )
    history = distiller.fit(
        x, y, epochs=1, batch_size=64, validation_data=(x, y), verbose=0
    ).history
    assert history["temperature"] == [3.0] and history["alpha"] == pytest.approx([0.1])
    assert "val_temperature" not in history and "val_alpha" not in history


def test_optimizer_wrapper_composes():
    x, y = make_data(32)
    wrapped = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    distiller = make_distiller(optimizer=wrapped)
    plain = make_distiller(optimizer=keras.optimizers.SGD(0.1))
    distiller.fit(x, y, epochs=1, batch_size=32, shuffle=False, verbose=0)
    plain.fit(x, y, epochs=1, batch_size=32, shuffle=False, verbose=0)
    for a, b in zip(distiller.student.weights, plain.student.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------- caching
@pytest.mark.parametrize("shuffle", [False, True])
def test_cached_and_uncached_give_same_losses(shuffle):
    x, y = make_data(96)
    histories = []
    for cache in (False, True):
        distiller = make_distiller()
        keras.utils.set_random_seed(7)
        history = distiller.fit(
            x,
            y,
            epochs=3,
            batch_size=16,
            shuffle=shuffle,
            verbose=0,
            cache_teacher_outputs=cache,
        )
        histories.append(
            (history.history, [v.numpy() for v in distiller.student.weights])
        )
    (uncached, w_uncached), (cached, w_cached) = histories
    for key in ("loss", "student_loss", "distillation_loss", "teacher_agreement"):
        np.testing.assert_allclose(cached[key], uncached[key], rtol=1e-5, err_msg=key)
    for a, b in zip(w_cached, w_uncached, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_cache_holds_teacher_logits_aligned_with_rows():
    x, _ = make_data(40)
    distiller = make_distiller()
    packed = distiller.cache_teacher_outputs(x)
    logits = packed["keras_stability_teacher_outputs"]["logits"]
    np.testing.assert_allclose(
        logits, keras.ops.convert_to_numpy(distiller.teacher(x)), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(packed["keras_stability_inputs"], x)


def test_cached_fit_never_runs_the_teacher():
    x, y = make_data(32)
    distiller = make_distiller()
    packed = distiller.cache_teacher_outputs(x)
    for v in distiller.teacher.weights:  # a teacher run now would give NaN losses
        v.assign(np.full(v.shape, np.nan, "float32"))
    history = distiller.fit(packed, y, epochs=2, batch_size=16, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert np.all(np.isfinite(history.history["distillation_loss"]))


def test_cache_rejects_datasets():
    import tensorflow as tf

    x, y = make_data(16)
    distiller = make_distiller()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    with pytest.raises(
        ValueError, match=r"Invalid value for argument `x`. Expected in-memory arrays"
    ):
        distiller.fit(ds, epochs=1, verbose=0, cache_teacher_outputs=True)


# -------------------------------------------------------- feature distillation
def test_feature_distillation_with_projection_matches_reference():
    x, y = make_data(32)
    term = FeatureDistillation("teacher_hidden", "student_hidden", weight=0.5)
    distiller = make_distiller(feature_distillation=[term])
    (projection,) = distiller.projections
    assert isinstance(projection, keras.layers.Dense)
    assert tuple(projection.kernel.shape) == (8, 32)
    assert "projection_0_student_hidden/kernel" in {
        v.path for v in distiller.trainable_variables
    }

    t_feat = keras.ops.convert_to_numpy(
        keras.Model(
            distiller.teacher.input,
            distiller.teacher.get_layer("teacher_hidden").output,
        )(x)
    )
    s_feat = keras.ops.convert_to_numpy(
        keras.Model(
            distiller.student.input,
            distiller.student.get_layer("student_hidden").output,
        )(x)
    )
    hint = np.mean((t_feat - s_feat @ projection.kernel.numpy()) ** 2)
    got = float(distiller.compute_loss(x, y, training=False))
    np.testing.assert_allclose(
        got, reference_loss(distiller, x, y, 0.1, 3.0) + 0.5 * hint, rtol=1e-5
    )


def test_several_weighted_terms_and_identity_when_widths_match():
    x, y = make_data(32)
    terms = [
        FeatureDistillation("teacher_hidden", "student_hidden", weight=0.5),
        FeatureDistillation("teacher_logits", "student_logits", loss="mae", weight=2.0),
    ]
    distiller = make_distiller(feature_distillation=terms)
    assert isinstance(distiller.projections[1], keras.layers.Identity)
    one = make_distiller(feature_distillation=terms[:1])
    s = keras.ops.convert_to_numpy(distiller.student(x))
    t = keras.ops.convert_to_numpy(distiller.teacher(x))
    extra = 2.0 * np.mean(np.abs(t - s))
    np.testing.assert_allclose(
        float(distiller.compute_loss(x, y, training=False)),
        float(one.compute_loss(x, y, training=False)) + extra,
        rtol=1e-5,
    )
    history = distiller.fit(
        x, y, epochs=2, batch_size=16, verbose=0, cache_teacher_outputs=True
    )
    assert history.history["feature_loss"][1] < history.history["feature_loss"][0]


def make_sequential(width, name, seed, built_by):
    keras.utils.set_random_seed(seed)
    layers = [
        keras.layers.Dense(width, activation="relu", name=f"{name}_hidden"),
        keras.layers.Dense(N_CLASSES, name=f"{name}_logits"),
    ]
    if built_by == "input":  # the keras.io distillation example's form
        return keras.Sequential([keras.Input((N_FEATURES,))] + layers, name=name)
    model = keras.Sequential(layers, name=name)
    if built_by == "build":
        model.build((None, N_FEATURES))
    else:  # called once on a batch
        model(np.zeros((2, N_FEATURES), "float32"))
    return model


def np_hidden(model, x):
    kernel, bias = model.layers[0].get_weights()
    return np.maximum(x @ kernel + bias, 0.0)


@pytest.mark.parametrize("built_by", ["input", "build", "call"])
def test_feature_distillation_between_sequential_models(built_by):
    # Before: AttributeError "The layer teacher has never been called and thus
    # has no defined input" from `teacher.input` in `Distiller.__init__`.
    x, y = make_data(32)
    teacher = make_sequential(32, "teacher", 1, built_by)
    student = make_sequential(8, "student", 2, built_by)
    term = FeatureDistillation("teacher_hidden", "student_hidden", weight=0.5)
    distiller = Distiller(student=student, teacher=teacher, feature_distillation=term)
    distiller.compile(
        optimizer=keras.optimizers.SGD(0.1),
        student_loss_fn=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        alpha=0.1,
        temperature=3,
    )
    (projection,) = distiller.projections
    kernel_before = projection.kernel.numpy().copy()

    def np_hint():
        s_feat = np_hidden(student, x) @ projection.kernel.numpy()
        return np.mean((np_hidden(teacher, x) - s_feat) ** 2)

    hint = np_hint()
    assert hint > 0
    np.testing.assert_allclose(
        float(distiller.compute_loss(x, y, training=False)),
        reference_loss(distiller, x, y, 0.1, 3.0) + 0.5 * hint,
        rtol=1e-5,
    )
    history = distiller.fit(x, y, epochs=3, batch_size=16, verbose=0).history
    assert history["feature_loss"][0] > 0
    assert history["feature_loss"][-1] < history["feature_loss"][0]
    # The projection trains through the hint term, and the logged term is it.
    assert not np.allclose(projection.kernel.numpy(), kernel_before)
    logs = distiller.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)
    np.testing.assert_allclose(logs["feature_loss"], 0.5 * np_hint(), rtol=1e-5)


def test_projection_false_with_different_widths_raises():
    term = FeatureDistillation("teacher_hidden", "student_hidden", projection=False)
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `projection`.*width 32.*width 8.*Received: projection=False",
    ):
        make_distiller(feature_distillation=[term])


# ---------------------------------------------------- the order of the models
SWAP_WARNING = "has fewer parameters"


def swap_warnings(record):
    return [w for w in record if SWAP_WARNING in str(w.message)]


def test_models_in_keras_order_positionally_warn():
    # Keras' own `keras.distillation.Distiller(teacher, student, ...)` order,
    # given positionally: the trained teacher would be trained toward the
    # small untrained model. Before: accepted without a word.
    student, teacher = make_model(8, "student", 2), make_model(32, "teacher", 1)
    assert (student.count_params(), teacher.count_params()) == (92, 356)
    with pytest.warns(UserWarning, match=SWAP_WARNING) as record:
        distiller = Distiller(teacher, student)
    (warning,) = swap_warnings(record)
    assert warning.filename == __file__  # points at the user's line
    assert str(warning.message) == (
        "The teacher 'student' has fewer parameters (92) than the student "
        "'teacher' (356). `keras_stability.Distiller` takes the student first, "
        "`Distiller(student, teacher)` (the keras.io example's order), while "
        "Keras' own `keras.distillation.Distiller(teacher, student, ...)` takes "
        "the teacher first: if you passed Keras' order, swap the models, or "
        "'teacher' is trained toward 'student' while 'student' stays frozen. If "
        "a larger student is intended (e.g. self-distillation or born-again "
        "networks), pass the models by keyword, "
        "`Distiller(student=..., teacher=...)`, which never warns."
    )
    # A warning, not an error: the distiller is built as asked.
    assert distiller.student is teacher and distiller.teacher is student


def test_models_in_our_order_or_by_keyword_do_not_warn():
    small, big = make_model(8, "small", 2), make_model(32, "big", 1)
    twin = make_model(8, "twin", 3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        Distiller(small, big)  # student first
        Distiller(small, twin)  # equal sizes (self-distillation)
        larger_student = Distiller(student=big, teacher=small)  # by keyword
        Distiller(teacher=small, student=big)
        Distiller.from_config(larger_student.get_config())
    assert swap_warnings(record) == []


# ---------------------------------------------------------------- bad input
def test_bad_input_errors():
    teacher, student = make_model(16, "teacher", 1), make_model(8, "student", 2)
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `student`. Expected the output shape of the teacher 'teacher', \(None, 4\).*Received: student='small' with output shape \(None, 3\)",
    ):
        inputs = keras.Input((N_FEATURES,))
        Distiller(
            keras.Model(inputs, keras.layers.Dense(3)(inputs), name="small"), teacher
        )
    unbuilt = keras.Sequential([keras.layers.Dense(4)], name="lazy")
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `teacher`. Expected a built model.*Received: teacher='lazy' \(not built\)",
    ):
        Distiller(student, unbuilt)
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `teacher`. Expected a `keras.Model`",
    ):
        Distiller(student, "teacher")
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `teacher_layer_name`. Expected the name of a layer of the teacher 'teacher'.*Received: teacher_layer_name='nope'",
    ):
        Distiller(
            student,
            teacher,
            feature_distillation=FeatureDistillation("nope", "student_hidden"),
        )
    with pytest.raises(
        ValueError,
        match=r"`student_layer_name`.*of the student 'student'.*Received: student_layer_name='gone'",
    ):
        Distiller(
            student,
            teacher,
            feature_distillation=FeatureDistillation("teacher_hidden", "gone"),
        )
    distiller = Distiller(student, teacher)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `alpha`. Expected a number in \[0, 1\]. Received: alpha=1.5",
    ):
        distiller.compile(student_loss_fn=loss, alpha=1.5)
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `temperature`. Expected a positive number. Received: temperature=0",
    ):
        distiller.compile(student_loss_fn=loss, temperature=0)
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `student_loss_fn`.*Received: student_loss_fn=None",
    ):
        distiller.compile()
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `loss`. Expected `student_loss_fn=`",
    ):
        distiller.compile(loss="mse", student_loss_fn=loss)
    with pytest.raises(
        ValueError, match=r"Invalid value for argument `weight`.*Received: weight=-1"
    ):
        FeatureDistillation("a", "b", weight=-1)
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `temperature`. Expected a positive number. Received: temperature=-2",
    ):
        distiller.set_distillation_params(temperature=-2)


@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), True, "3"])
def test_non_finite_or_non_number_temperature_is_rejected(temperature):
    # Before: temperature=inf was accepted and training went to NaN.
    student, teacher = make_model(8, "student"), make_model(32, "teacher")
    distiller = Distiller(student, teacher)
    with pytest.raises(ValueError) as info:
        distiller.compile(
            student_loss_fn=keras.losses.SparseCategoricalCrossentropy(
                from_logits=True
            ),
            temperature=temperature,
        )
    assert str(info.value) == (
        "Invalid value for argument `temperature`. Expected a positive number. "
        f"Received: temperature={temperature!r}"
    )
    with pytest.raises(ValueError, match="`temperature`"):
        distiller.set_distillation_params(temperature=temperature)


def test_numpy_numbers_and_bad_compile_arguments():
    distiller = make_distiller(alpha=np.float32(0.25), temperature=np.int64(2))
    assert distiller.alpha == 0.25 and distiller.temperature == 2.0
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for kwargs, name in (
        ({"optimizer": "nope"}, "optimizer"),
        ({"metrics": "accuracy"}, "metrics"),
        ({"scale_by_temperature_squared": "no"}, "scale_by_temperature_squared"),
        ({"distillation_loss_fn": 3}, "distillation_loss_fn"),
    ):
        with pytest.raises(ValueError, match=f"Invalid value for argument `{name}`"):
            distiller.compile(student_loss_fn=loss, **kwargs)


# ------------------------------------------------------------------- saving
def test_get_config_round_trip():
    term = FeatureDistillation(
        "teacher_hidden", "student_hidden", loss="cosine_similarity", weight=0.25
    )
    assert (
        FeatureDistillation.from_config(term.get_config()).get_config()
        == term.get_config()
    )
    distiller = make_distiller(feature_distillation=[term])
    config = distiller.get_config()
    revived = Distiller.from_config(config)
    assert revived.get_config() == config
    assert revived.feature_distillation[0].weight == 0.25


def load_and_predict(path, x):
    """Loads a .keras file in a fresh process; returns predictions and state."""
    import keras

    import keras_stability  # noqa: F401

    model = keras.saving.load_model(path)
    out = {
        "pred": np.asarray(model.predict(x, verbose=0)),
        "class": type(model).__name__,
    }
    if isinstance(model, keras_stability.Distiller):
        out["temperature"] = model.temperature
        out["alpha"] = model.alpha
        out["n_projections"] = len(model.projections)
        out["teacher_pred"] = np.asarray(model.teacher.predict(x, verbose=0))
        out["compiled"] = model.compiled
        out["eval"] = model.evaluate(
            x, np.zeros(len(x), "int32"), verbose=0, return_dict=True
        )
    return out


def test_keras_round_trip_distiller_and_student_in_fresh_process(
    tmp_path, fresh_process
):
    x, y = make_data(48)
    term = FeatureDistillation("teacher_hidden", "student_hidden", weight=0.5)
    distiller = make_distiller(feature_distillation=[term])
    distiller.fit(x, y, epochs=1, batch_size=16, verbose=0)
    distiller.set_distillation_params(temperature=5.0, alpha=0.3)
    d_path = os.path.join(tmp_path, "distiller.keras")
    s_path = os.path.join(tmp_path, "student.keras")
    distiller.save(d_path)
    distiller.student.save(s_path)

    expected = np.asarray(distiller.predict(x, verbose=0))
    loaded = fresh_process(load_and_predict, d_path, x)
    assert loaded["class"] == "Distiller"
    np.testing.assert_allclose(loaded["pred"], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        loaded["teacher_pred"],
        distiller.teacher.predict(x, verbose=0),
        rtol=1e-6,
        atol=1e-6,
    )
    assert loaded["temperature"] == pytest.approx(5.0) and loaded[
        "alpha"
    ] == pytest.approx(0.3)
    assert loaded["n_projections"] == 1 and loaded["compiled"]
    ref = distiller.evaluate(x, np.zeros(len(x), "int32"), verbose=0, return_dict=True)
    assert loaded["eval"]["loss"] == pytest.approx(ref["loss"], rel=1e-5)

    student = fresh_process(load_and_predict, s_path, x)
    assert student["class"] == "Functional"
    np.testing.assert_allclose(student["pred"], expected, rtol=1e-6, atol=1e-6)


def test_top_level_export():
    assert keras_stability.Distiller is Distiller
    assert "Distiller" in keras_stability.__all__


class SubclassedStudent(keras.Model):
    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(units)

    def call(self, inputs):
        return self.dense(inputs)


def test_subclassed_student_wrong_width_fails_at_first_step_and_numpy_scalars_accepted():
    x, y = make_data(16)
    student = SubclassedStudent(3, name="sub")
    student(x[:1])
    distiller = Distiller(student, make_model(8, "teacher", 1))
    distiller.compile(
        student_loss_fn=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        alpha=np.float32(0.25),
        temperature=np.int64(2),
    )
    assert distiller.alpha == pytest.approx(0.25) and distiller.temperature == 2.0
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `student`. Expected outputs shaped like the teacher 'teacher' logits \(16, 4\).*Received: student='sub' with outputs shaped \(16, 3\)",
    ):
        distiller.fit(x, y, batch_size=16, epochs=1, verbose=0)
    good = SubclassedStudent(N_CLASSES, name="sub_ok")
    good(x[:1])
    distiller = Distiller(good, make_model(8, "teacher", 1))
    distiller.compile(
        student_loss_fn=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    np.testing.assert_allclose(
        float(distiller.compute_loss(x, y, training=False)),
        reference_loss(distiller, x, y, 0.1, 3.0),
        rtol=1e-5,
    )
