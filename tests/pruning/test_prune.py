import os
import zipfile

import keras
import numpy as np
import pytest

from keras_stability import pruning
from keras_stability.pruning import masks
from keras_stability.pruning.pruner import MaskConstraint
from tests.helpers import predict_saved_model
from tests.helpers import run_in_subprocess


def _data(n=64, features=8, outputs=4, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(n, features)).astype("float32"),
        rng.normal(size=(n, outputs)).astype("float32"),
    )


def _sequential():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(10, activation="relu"),
            keras.layers.Dense(4),
        ]
    )


def _functional():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    h = keras.layers.Dense(10, activation="relu")(inputs)
    h = keras.layers.BatchNormalization()(h)
    outputs = keras.layers.Dense(4)(h)
    return keras.Model(inputs, outputs)


class SmallBlock(keras.layers.Layer):
    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.layers.Dense(units, activation="relu")

    def call(self, x):
        return self.inner(x)


class SubclassedNet(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.block = SmallBlock(10)
        self.norm = keras.layers.LayerNormalization()
        self.head = keras.layers.Dense(4)

    def call(self, x):
        return self.head(self.norm(self.block(x)))


def _subclassed():
    keras.utils.set_random_seed(0)
    model = SubclassedNet()
    model(np.zeros((1, 8), "float32"))
    return model


def _fit(model, steps, batch_size=8, jit_compile=False, optimizer="adam"):
    x, y = _data(n=steps * batch_size)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    return model


def _check_masks_are_magnitude_masks(model, sparsity):
    pruner = pruning.find_pruner(model)
    for variable, mask in zip(pruner.variables, pruner.masks, strict=True):
        w = keras.ops.convert_to_numpy(variable)
        m = keras.ops.convert_to_numpy(mask)
        np.testing.assert_array_equal(w * m, w)  # weights are masked
        np.testing.assert_array_equal(m, masks.magnitude_mask(w, sparsity))
        assert (w == 0).sum() == w.size - max(round(w.size * (1 - sparsity)), 1)


@pytest.mark.parametrize("build", [_sequential, _functional, _subclassed])
def test_prunes_every_kind_of_model(build):
    model = build()
    schedule = pruning.ConstantSparsity(0.5, begin_step=0, frequency=1)
    assert pruning.prune_low_magnitude(model, schedule) is model
    assert len(pruning.find_pruner(model).variables) == 2  # the two kernels
    _fit(model, steps=3)
    assert int(pruning.find_pruner(model).step.numpy()) == 3
    _check_masks_are_magnitude_masks(model, 0.5)
    report = pruning.sparsity_report(model)
    assert list(report.values())[:2] == [0.5, 0.5] and report["total"] == 0.5


def test_jit_compile_and_sgd():
    model = pruning.prune_low_magnitude(
        _functional(), pruning.ConstantSparsity(0.8, begin_step=0, frequency=1)
    )
    _fit(model, steps=2, jit_compile=True, optimizer="sgd")
    _check_masks_are_magnitude_masks(model, 0.8)


def test_polynomial_decay_reaches_target_at_end_step_exactly():
    model = _sequential()
    schedule = pruning.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=8, frequency=4)
    pruning.prune_low_magnitude(model, schedule)
    totals = []
    x, y = _data(n=80)
    model.compile(optimizer="adam", loss="mse")
    for step in range(1, 11):
        model.train_on_batch(x[(step - 1) * 8 : step * 8], y[(step - 1) * 8 : step * 8])
        totals.append(pruning.sparsity_report(model)["total"])
    # Masks change at steps 4 and 8 only; kernels of 80 and 40 weights.
    expected_4 = 1 - (0.8 + (0.0 - 0.8) * (1 - 0.5) ** 3)
    assert totals[0] == totals[2] == 0.0
    assert totals[3] == pytest.approx(
        (80 - round(80 * expected_4) + 40 - round(40 * expected_4)) / 120
    )
    assert totals[7] == totals[8] == totals[9] == 0.8
    assert float(pruning.find_pruner(model).target_sparsity()) == pytest.approx(0.8)


def test_masks_change_only_on_scheduled_training_steps():
    model = _sequential()
    pruning.prune_low_magnitude(
        model, pruning.ConstantSparsity(0.5, begin_step=2, end_step=2, frequency=1)
    )
    pruner = pruning.find_pruner(model)
    x, y = _data(n=40)
    model.compile(optimizer="adam", loss="mse")
    model.train_on_batch(x[:8], y[:8])
    assert all(np.all(m.numpy() == 1) for m in pruner.masks)
    model.train_on_batch(x[8:16], y[8:16])
    at_step_2 = [m.numpy().copy() for m in pruner.masks]
    assert [m.mean() for m in at_step_2] == [0.5, 0.5]
    for i in range(2, 5):
        model.train_on_batch(x[i * 8 : (i + 1) * 8], y[i * 8 : (i + 1) * 8])
    # Inference and evaluation touch neither step nor masks.
    model.predict(x, verbose=0)
    model.evaluate(x, y, verbose=0)
    assert int(pruner.step.numpy()) == 5
    for mask, before, variable in zip(
        pruner.masks, at_step_2, pruner.variables, strict=True
    ):
        np.testing.assert_array_equal(mask.numpy(), before)
        # Weights are re-masked after every update though Adam moves them.
        assert np.all(variable.numpy()[before == 0] == 0)


def test_pruning_a_single_layer_and_global_ranking():
    model = _sequential()
    first = model.layers[0]
    pruning.prune_low_magnitude(first, pruning.ConstantSparsity(0.5, 0, frequency=1))
    _fit(model, steps=2)
    first_kernel, second_kernel, total = pruning.sparsity_report(model).values()
    assert (first_kernel, second_kernel) == (0.5, 0.0)
    assert total == pytest.approx(40 / 120)

    model = _functional()
    model.layers[-1].kernel.assign(model.layers[-1].kernel * 0.01)
    pruning.prune_low_magnitude(
        model, pruning.ConstantSparsity(0.5, 0, frequency=1), global_ranking=True
    )
    _fit(model, steps=1, optimizer="sgd")
    first_kernel, second_kernel, total = pruning.sparsity_report(model).values()
    assert total == 0.5
    assert second_kernel > 0.5 > first_kernel


def test_m_by_n_pruning_of_a_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 4)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(4),
        ]
    )
    pruning.prune_low_magnitude(
        model, pruning.ConstantSparsity(0.5, 0, frequency=1), sparsity_m_by_n=(2, 4)
    )
    x = np.random.default_rng(0).normal(size=(16, 6, 6, 4)).astype("float32")
    model.compile("adam", "mse")
    model.fit(x, np.zeros((16, 4)), batch_size=8, verbose=0)
    for variable in pruning.find_pruner(model).variables:
        w = variable.numpy()
        groups = np.moveaxis(w, -2, -1).reshape(-1, 4)
        assert np.all((groups == 0).sum(axis=1) == 2)


def test_m_by_n_groups_multi_head_attention_kernels_along_their_input_axis():
    # The query/key/value kernels of MultiHeadAttention are (in, heads,
    # head_dim): 2:4 runs along `in` (axis 0), not across the 4 heads, which
    # axis -2 would be. The output kernel (heads, head_dim, out) along
    # head_dim.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5, 8))
    h = keras.layers.MultiHeadAttention(num_heads=4, key_dim=8)(inputs, inputs)
    model = keras.Model(inputs, keras.layers.Dense(4)(h))
    pruning.prune_low_magnitude(
        model, pruning.ConstantSparsity(0.5, 0, frequency=1), sparsity_m_by_n=(2, 4)
    )
    x = np.random.default_rng(0).normal(size=(16, 5, 8)).astype("float32")
    model.compile("adam", "mse")
    model.fit(x, np.zeros((16, 5, 4)), batch_size=8, verbose=0)
    axes = {}
    for variable, axis in zip(
        pruning.find_pruner(model).variables,
        pruning.find_pruner(model).input_axes,
        strict=True,
    ):
        w = variable.numpy()
        groups = np.moveaxis(w, axis, -1).reshape(-1, 4)
        assert np.all((groups == 0).sum(axis=1) == 2), variable.path
        axes[variable.path.split("/")[-2]] = (w.shape, axis)
    assert axes["query"] == ((8, 4, 8), -3)
    assert axes["attention_output"] == ((4, 8, 8), -2)


def test_strip_pruning_keeps_zeros_and_predictions(tmp_path):
    model = _functional()
    pruning.prune_low_magnitude(model, pruning.ConstantSparsity(0.8, 0, frequency=1))
    _fit(model, steps=2)
    x, _ = _data(n=16, seed=3)
    before = model.predict(x, verbose=0)
    report = pruning.sparsity_report(model)
    stripped = pruning.strip_pruning(model)
    assert pruning.find_pruner(stripped) is None
    assert not any(isinstance(v.constraint, MaskConstraint) for v in stripped.weights)
    assert [type(layer).__module__.split(".")[0] for layer in stripped.layers] == [
        "keras"
    ] * 4
    np.testing.assert_allclose(stripped.predict(x, verbose=0), before, rtol=1e-6)
    assert pruning.sparsity_report(stripped) == report
    path = os.path.join(tmp_path, "stripped.keras")
    stripped.save(path)
    loaded = keras.saving.load_model(path)
    assert list(pruning.sparsity_report(loaded).values()) == list(report.values())
    # Training after stripping no longer keeps the zeros.
    _fit(stripped, steps=1)
    assert pruning.sparsity_report(stripped)["total"] < report["total"] - 0.3


def test_fit_after_strip_pruning_trains_dense_without_compiling_again():
    # bug_1: the train step traced while pruning kept the mask constraints,
    # so a `fit` after `strip_pruning` (same compile) went on masking and
    # stepping the detached pruner; compiling again trained dense.
    model = _sequential()
    pruning.prune_low_magnitude(model, pruning.ConstantSparsity(0.5, 0, frequency=1))
    _fit(model, steps=2)
    pruner = pruning.find_pruner(model)
    assert pruning.strip_pruning(model) is model  # in place, not a copy
    assert pruning.sparsity_report(model)["total"] == 0.5
    x, y = _data(n=16)
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    assert int(pruner.step.numpy()) == 2  # the detached pruner did not step
    kernels = [layer.kernel.numpy() for layer in model.layers]
    assert all(np.mean(k == 0) < 0.1 for k in kernels)  # trained dense
    # The same as a model compiled again after `strip_pruning`.
    other = _sequential()
    pruning.prune_low_magnitude(other, pruning.ConstantSparsity(0.5, 0, frequency=1))
    _fit(other, steps=2)
    pruning.strip_pruning(other)
    other.compile(optimizer=other.optimizer, loss="mse")
    other.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), other.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_pruning_a_model_that_has_trained_takes_effect_at_the_next_fit():
    # The other way round: a train step traced before `prune_low_magnitude`
    # had no mask constraints, and the next `fit` trained dense.
    model = _fit(_sequential(), steps=2)
    pruning.prune_low_magnitude(model, pruning.ConstantSparsity(0.5, 0, frequency=1))
    model.fit(*_data(n=16), batch_size=8, verbose=0)
    assert int(pruning.find_pruner(model).step.numpy()) == 2
    _check_masks_are_magnitude_masks(model, 0.5)


def test_keras_file_of_a_pruned_model_holds_the_masked_weights(tmp_path):
    model = _sequential()
    pruning.prune_low_magnitude(model, pruning.ConstantSparsity(0.5, 0, frequency=1))
    _fit(model, steps=2)
    path = os.path.join(tmp_path, "pruned.keras")
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        config = archive.read("config.json").decode()
    assert "keras_stability" not in config and "MaskConstraint" not in config
    x, _ = _data(n=16, seed=4)
    loaded_pred = run_in_subprocess(predict_saved_model, path, x, n_cpu_devices=1)
    np.testing.assert_allclose(loaded_pred, model.predict(x, verbose=0), rtol=1e-6)
    loaded = keras.saving.load_model(path)
    assert list(pruning.sparsity_report(loaded).values()) == list(
        pruning.sparsity_report(model).values()
    )
    # Pruning the loaded model again starts from its zeros: sparsity is kept
    # through steps that do not prune.
    pruning.prune_low_magnitude(loaded, pruning.ConstantSparsity(0.5, 10, frequency=10))
    _fit(loaded, steps=2)
    assert pruning.sparsity_report(loaded)["total"] == 0.5


def test_errors_name_the_argument_and_value():
    schedule = pruning.ConstantSparsity(0.5, 0, frequency=1)
    no_prunable = keras.Sequential(
        [keras.Input((4,)), keras.layers.BatchNormalization()]
    )
    with pytest.raises(
        ValueError, match="Expected a model or layer with prunable weights"
    ):
        pruning.prune_low_magnitude(no_prunable, schedule)
    with pytest.raises(ValueError, match="Expected a built Keras layer or model"):
        pruning.prune_low_magnitude(keras.Sequential([keras.layers.Dense(2)]), schedule)
    with pytest.raises(ValueError, match="Expected a Keras layer or model"):
        pruning.prune_low_magnitude("model", schedule)
    with pytest.raises(ValueError, match="Received: sparsity_m_by_n=\\(4, 2\\)"):
        pruning.prune_low_magnitude(_sequential(), schedule, sparsity_m_by_n=(4, 2))
    with pytest.raises(ValueError, match="Expected `n` to divide the input axis"):
        pruning.prune_low_magnitude(_sequential(), schedule, sparsity_m_by_n=(2, 3))
    with pytest.raises(ValueError, match="Received: block_pooling_type='SUM'"):
        pruning.prune_low_magnitude(_sequential(), schedule, block_pooling_type="SUM")
    with pytest.raises(ValueError, match="Received: block_size=\\(0, 2\\)"):
        pruning.prune_low_magnitude(_sequential(), schedule, block_size=(0, 2))
    with pytest.raises(ValueError, match="Received: global_ranking=True"):
        pruning.prune_low_magnitude(
            _sequential(), schedule, global_ranking=True, sparsity_m_by_n=(2, 4)
        )
    with pytest.raises(ValueError, match="Expected a sparsity in \\[0, 1\\)"):
        pruning.prune_low_magnitude(_sequential(), lambda step: (True, 1.5))
    model = pruning.prune_low_magnitude(_sequential(), schedule)
    with pytest.raises(ValueError, match="already pruned"):
        pruning.prune_low_magnitude(model, schedule)


def _train_masks(strategy_devices, sparsity_m_by_n=None):
    """Child: trains a pruned model, optionally under MirroredStrategy."""
    import contextlib

    import tensorflow as tf

    from keras_stability import pruning as kp

    scope = (
        tf.distribute.MirroredStrategy(strategy_devices).scope()
        if strategy_devices
        else contextlib.nullcontext()
    )
    with scope:
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dense(4),
            ]
        )
        kp.prune_low_magnitude(
            model,
            kp.PolynomialDecay(0.0, 0.7, begin_step=0, end_step=6, frequency=2),
            sparsity_m_by_n=sparsity_m_by_n,
        )
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    x, y = _data(n=64, seed=1)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    pruner = kp.find_pruner(model)
    return {
        "step": int(pruner.step.numpy()),
        "masks": [m.numpy() for m in pruner.masks],
        "weights": [v.numpy() for v in pruner.variables],
    }


@pytest.mark.distributed
def test_mirrored_strategy_masks_equal_single_device():
    single = run_in_subprocess(_train_masks, None, n_cpu_devices=1)
    mirrored = run_in_subprocess(_train_masks, ["/cpu:0", "/cpu:1"], n_cpu_devices=2)
    assert single["step"] == mirrored["step"] == 8
    for a, b in zip(single["masks"], mirrored["masks"], strict=True):
        np.testing.assert_array_equal(a, b)
        assert 1 - a.mean() == pytest.approx(0.7, abs=0.01)
    for a, b in zip(single["weights"], mirrored["weights"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_pruned_student_inside_keras_distiller():
    keras.utils.set_random_seed(0)
    teacher = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    student = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(12, activation="relu"),
            keras.layers.Dense(4),
        ]
    )
    pruning.prune_low_magnitude(student, pruning.ConstantSparsity(0.75, 0, frequency=1))
    distiller = keras.distillation.Distiller(
        teacher=teacher,
        student=student,
        distillation_losses=keras.distillation.LogitsDistillation(temperature=2.0),
    )
    distiller.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
    y = np.random.default_rng(1).integers(0, 4, size=32)
    teacher_before = teacher.get_weights()
    distiller.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert int(pruning.find_pruner(student).step.numpy()) == 4
    first, second, _ = pruning.sparsity_report(student).values()
    assert first == 0.75 and second == 0.75
    for a, b in zip(teacher_before, teacher.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # Stripped through the Distiller, whose train step held the constraints,
    # the student trains on dense at the Distiller's next `fit`.
    assert pruning.strip_pruning(distiller) is distiller
    assert pruning.find_pruner(student) is None
    distiller.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert pruning.sparsity_report(student)["total"] < 0.1


def test_pruned_copy_of_the_teacher_distilled_by_our_distiller():
    # Pruning with distillation (issue #17's 80% LM recipe): the student is a
    # copy of the teacher, pruned gradually (block linears, one global
    # threshold) while `keras_stability.Distiller` trains it on the KL term.
    from keras_stability import Distiller
    from keras_stability.models import build_char_transformer

    keras.utils.set_random_seed(0)
    teacher = build_char_transformer(12, 8, num_blocks=1, hidden_dim=16, num_heads=2)
    student = keras.models.clone_model(teacher)
    student.set_weights(teacher.get_weights())
    pruning.prune_low_magnitude(
        student,
        pruning.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=4, frequency=2),
        filters="^block_",
        global_ranking=True,
    )
    distiller = Distiller(student, teacher)
    distiller.compile(
        optimizer="adam",
        student_loss_fn=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        alpha=0.0,
        temperature=1.0,
    )
    x = np.random.default_rng(0).integers(0, 12, size=(48, 8)).astype("int32")
    teacher_before = teacher.get_weights()
    distiller.fit(
        x, epochs=1, batch_size=8, verbose=0, callbacks=[pruning.UpdatePruningStep()]
    )
    assert int(pruning.find_pruner(student).step.numpy()) == 6
    pruning.strip_pruning(student)
    linears = [
        w.numpy()
        for w in student.weights
        if w.path.startswith("block_") and w.path.endswith("kernel")
    ]
    zeros = sum(int((k == 0).sum()) for k in linears)
    assert zeros / sum(k.size for k in linears) == pytest.approx(0.8, abs=1e-3)
    others = [w.numpy() for w in student.weights if not w.path.startswith("block_")]
    assert all(np.all(a != 0) for a in others if a.ndim == 2)
    for a, b in zip(teacher_before, teacher.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_after_apply_hook_for_optimizer_wrappers():
    model = _sequential()
    pruning.prune_low_magnitude(model, pruning.ConstantSparsity(0.5, 0, frequency=1))
    pruner = pruning.find_pruner(model)
    pruner.after_apply(
        model.trainable_variables, skipped=keras.ops.convert_to_tensor(True)
    )
    assert int(pruner.step.numpy()) == 0
    assert all(np.all(m.numpy() == 1) for m in pruner.masks)
    pruner.after_apply(model.trainable_variables, skipped=False)
    assert int(pruner.step.numpy()) == 1
    _check_masks_are_magnitude_masks(model, 0.5)


def test_prunes_the_weights_tfmot_prunes_in_every_supported_layer():
    keras.utils.set_random_seed(0)
    tokens = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(20, 8, name="emb")(tokens)
    h = keras.layers.MultiHeadAttention(2, 4, name="mha")(h, h)
    h = keras.layers.LSTM(8, return_sequences=True, name="lstm")(h)
    h = keras.layers.Conv1D(8, 3, name="conv1d")(h)
    h = keras.layers.SeparableConv1D(8, 2, name="sep")(h)
    h = keras.layers.LayerNormalization(name="ln")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    model = keras.Model(tokens, keras.layers.Dense(2, name="head")(h))
    names = [v.path for v in pruning.prunable_weights(model)]
    assert names == [
        "emb/embeddings",
        "mha/query/kernel",
        "mha/key/kernel",
        "mha/value/kernel",
        "mha/attention_output/kernel",
        "lstm/lstm_cell/kernel",
        "lstm/lstm_cell/recurrent_kernel",
        "conv1d/kernel",
        "sep/pointwise_kernel",
        "head/kernel",
    ]
    pruning.prune_low_magnitude(model, pruning.ConstantSparsity(0.5, 0, frequency=1))
    x = np.random.default_rng(0).integers(0, 20, size=(16, 6))
    model.compile("adam", "mse")
    model.fit(x, np.zeros((16, 2)), batch_size=8, verbose=0)
    report = pruning.sparsity_report(model)
    assert all(abs(report[n] - 0.5) < 0.02 for n in names)
    # Biases and normalisation are left alone.
    assert np.count_nonzero(model.get_layer("ln").gamma.numpy()) == 8


def test_an_existing_constraint_is_kept_and_restored():
    keras.utils.set_random_seed(0)
    non_neg = keras.constraints.NonNeg()
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(6, kernel_constraint=non_neg),
            keras.layers.Dense(4),
        ]
    )
    pruning.prune_low_magnitude(model, pruning.ConstantSparsity(0.5, 0, frequency=1))
    kernel = model.layers[0].kernel
    assert (
        isinstance(kernel.constraint, MaskConstraint)
        and kernel.constraint.inner is non_neg
    )
    _fit(model, steps=2, optimizer="sgd")
    w = kernel.numpy()
    assert w.min() >= 0 and (w == 0).mean() >= 0.5
    pruning.strip_pruning(model)
    assert kernel.constraint is non_neg and model.layers[1].kernel.constraint is None


def test_per_layer_schedules_run_eagerly_and_strip_all():
    model = _sequential()
    pruning.prune_low_magnitude(
        model.layers[0], pruning.ConstantSparsity(0.5, 0, frequency=1)
    )
    pruning.prune_low_magnitude(
        model.layers[1], pruning.ConstantSparsity(0.75, 0, frequency=1)
    )
    x, y = _data(n=16)
    model.compile("adam", "mse", run_eagerly=True)
    model.fit(x, y, batch_size=8, verbose=0)
    first, second, _ = pruning.sparsity_report(model).values()
    assert (first, second) == (0.5, 0.75)
    pruning.strip_pruning(model)
    assert pruning.find_pruner(model) is None
    assert all(v.constraint is None for v in model.weights)


class TinyBlock(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.attention = keras.layers.MultiHeadAttention(2, 4, name="attention")
        self.mlp_in = keras.layers.Dense(16, activation="relu", name="mlp_in")
        self.mlp_out = keras.layers.Dense(8, name="mlp_out")

    def call(self, x):
        x = x + self.attention(x, x)
        return x + self.mlp_out(self.mlp_in(x))


def _tiny_lm():
    keras.utils.set_random_seed(0)
    ids = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(12, 8, name="embedding")(ids)
    h = TinyBlock(name="block_0")(h)
    h = TinyBlock(name="block_1")(h)
    return keras.Model(ids, keras.layers.Dense(12, name="logits")(h))


def _fit_lm(model, steps=2):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 12, (8 * steps, 6)).astype("int32")
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, x, batch_size=8, shuffle=False, verbose=0)


def test_filters_select_weights_by_path_or_by_layer():
    model = _tiny_lm()
    every = [v.path for v in pruning.prunable_weights(model)]
    assert every[0] == "embedding/embeddings" and every[-1] == "logits/kernel"
    blocks = [v.path for v in pruning.prunable_weights(model, filters="^block_")]
    assert blocks == [p for p in every if p.startswith("block_")]
    assert len(blocks) == 12  # Q, K, V, O, FFN in and out, in each of 2 blocks
    assert [
        v.path for v in pruning.prunable_weights(model, filters=["mlp_in", "logits"])
    ] == ["block_0/mlp_in/kernel", "block_1/mlp_in/kernel", "logits/kernel"]
    by_layer = pruning.prunable_weights(
        model, filters=lambda layer: isinstance(layer, keras.layers.EinsumDense)
    )
    assert [v.path for v in by_layer] == [p for p in blocks if "/attention/" in p]


def test_filters_prune_only_the_block_linears_and_strip():
    model = _tiny_lm()
    embeddings = model.get_layer("embedding").embeddings.numpy()
    pruning.prune_low_magnitude(
        model, pruning.ConstantSparsity(0.75, 0, frequency=1), filters="^block_"
    )
    pruner = pruning.find_pruner(model)
    assert all(v.path.startswith("block_") for v in pruner.variables)
    _fit_lm(model)
    report = pruning.sparsity_report(model)
    for path, sparsity in report.items():
        if path.startswith("block_"):
            assert sparsity == 0.75, path
    assert report["embedding/embeddings"] == 0.0 and report["logits/kernel"] == 0.0
    # Trained, not pruned: the embeddings moved but kept every weight.
    assert not np.array_equal(model.get_layer("embedding").embeddings, embeddings)
    pruning.strip_pruning(model)
    assert pruning.find_pruner(model) is None


def test_filters_with_global_ranking_rank_only_the_selected_weights():
    model = _tiny_lm()
    # Scaled down, block_1's weights hold the smallest magnitudes of the
    # blocks: ranked together they are pruned most; the output layer (still
    # smaller) is not ranked at all.
    for v in pruning.prunable_weights(model, filters="^block_1/"):
        v.assign(v * 0.1)
    model.get_layer("logits").kernel.assign(model.get_layer("logits").kernel * 1e-3)
    pruning.prune_low_magnitude(
        model,
        pruning.ConstantSparsity(0.5, 0, frequency=1),
        filters="^block_",
        global_ranking=True,
    )
    _fit_lm(model, steps=1)
    report = pruning.sparsity_report(model)
    selected = pruning.prunable_weights(model, filters="^block_")
    zeros = sum(int((v.numpy() == 0).sum()) for v in selected)
    assert zeros == sum(v.numpy().size for v in selected) // 2
    first = [s for p, s in report.items() if p.startswith("block_0/")]
    second = [s for p, s in report.items() if p.startswith("block_1/")]
    assert min(second) > max(first)
    assert report["logits/kernel"] == 0.0


def test_filters_with_m_by_n_check_only_the_selected_weights():
    model = _tiny_lm()
    # The embeddings' input axis (12 rows) is not a multiple of 8: filtered
    # out, they are not checked.
    with pytest.raises(ValueError, match="embedding/embeddings"):
        pruning.prune_low_magnitude(
            model, pruning.ConstantSparsity(0.5, 0), sparsity_m_by_n=(4, 8)
        )
    pruning.prune_low_magnitude(
        model,
        pruning.ConstantSparsity(0.5, 0, frequency=1),
        sparsity_m_by_n=(2, 4),
        filters="mlp",
    )
    assert [v.path for v in pruning.find_pruner(model).variables] == [
        "block_0/mlp_in/kernel",
        "block_0/mlp_out/kernel",
        "block_1/mlp_in/kernel",
        "block_1/mlp_out/kernel",
    ]


def test_filters_errors_name_the_argument_and_value():
    schedule = pruning.ConstantSparsity(0.5, 0, frequency=1)
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `filters`. Expected None, a regex "
        r"string, a non-empty list of regex strings or a callable `layer -> bool`. "
        r"Received: filters=3",
    ):
        pruning.prune_low_magnitude(_tiny_lm(), schedule, filters=3)
    with pytest.raises(ValueError, match=r"Received: filters=\[\]"):
        pruning.prune_low_magnitude(_tiny_lm(), schedule, filters=[])
    with pytest.raises(ValueError, match=r"Received: filters=\['block', 2\]"):
        pruning.prune_low_magnitude(_tiny_lm(), schedule, filters=["block", 2])
    with pytest.raises(
        ValueError, match=r"Expected valid regular expressions. Received: filters='\('"
    ):
        pruning.prune_low_magnitude(_tiny_lm(), schedule, filters="(")
    with pytest.raises(ValueError, match=r"Received: filters=3"):
        pruning.prunable_weights(_tiny_lm(), filters=3)
    model = _tiny_lm()
    with pytest.raises(
        ValueError,
        match=r"Expected filters that select at least one prunable weight. "
        r"Received: filters='\^decoder' on '.*', whose prunable weights are "
        r"'embedding/embeddings', .* and 9 more",
    ):
        pruning.prune_low_magnitude(model, schedule, filters="^decoder")
    # Nothing was pruned by the failed call.
    assert pruning.find_pruner(model) is None


def test_default_schedule_is_tfmot_constant_sparsity_half():
    # TF-MOT's comprehensive guide: `prune_low_magnitude(base_model)`.
    model = pruning.prune_low_magnitude(_sequential())
    schedule = pruning.find_pruner(model).pruning_schedule
    assert isinstance(schedule, pruning.ConstantSparsity)
    assert schedule.get_config()["config"] == {
        "target_sparsity": 0.5,
        "begin_step": 0,
        "end_step": -1,
        "frequency": 100,
    }
    _fit(model, steps=100, batch_size=1)
    _check_masks_are_magnitude_masks(model, 0.5)


def test_tfmot_pruning_policy_is_refused_with_what_to_use_instead():
    # The comprehensive guide's `pruning_policy=PruneForLatencyOnXNNPack()`.
    policy = pruning.prune_low_magnitude  # any non-None object
    with pytest.raises(
        ValueError,
        match="Invalid value for argument `pruning_policy`. Expected None: .*"
        "`filters=`.* Received: pruning_policy=",
    ):
        pruning.prune_low_magnitude(_sequential(), pruning_policy=policy)
    model = _sequential()
    assert pruning.find_pruner(model) is None
    pruning.prune_low_magnitude(model, pruning_policy=None)
    assert pruning.find_pruner(model) is not None


def test_a_layer_not_built_yet_is_pruned_when_built():
    # TF-MOT's comprehensive guide: prune a layer as the Sequential is defined.
    schedule = pruning.ConstantSparsity(0.5, begin_step=0, frequency=1)
    keras.utils.set_random_seed(0)
    first, second = keras.layers.Dense(10, input_shape=(8,)), keras.layers.Dense(4)
    model = keras.Sequential([pruning.prune_low_magnitude(first, schedule), second])
    assert pruning.find_pruner(model).variables == [first.kernel]
    _fit(model, steps=2)
    report = pruning.sparsity_report(model)
    assert report[first.kernel.path] == 0.5
    assert report[second.kernel.path] == 0.0
    # Functional: pruned when first called on a keras.Input.
    layer = pruning.prune_low_magnitude(keras.layers.Dense(3), schedule)
    assert pruning.find_pruner(layer) is None
    keras.Model(inputs := keras.Input((5,)), layer(inputs))
    assert pruning.find_pruner(layer).variables == [layer.kernel]
    # Built only in the first traced train step (no input shape): refused.
    lazy = keras.Sequential(
        [pruning.prune_low_magnitude(keras.layers.Dense(10), schedule)]
    )
    with pytest.raises(
        ValueError,
        match="Expected a layer built before training .* first built inside a "
        "traced train step",
    ):
        _fit(lazy, steps=1)
    # Checks that need the weights run at build time.
    with pytest.raises(ValueError, match="Expected `n` to divide the input axis"):
        keras.Sequential(
            [
                keras.Input((6,)),
                pruning.prune_low_magnitude(
                    keras.layers.Dense(4), schedule, sparsity_m_by_n=(2, 4)
                ),
            ]
        )


def test_checkpoint_and_reload_continues_the_pruning_run(tmp_path):
    # TF-MOT's comprehensive guide, "Checkpoint and deserialize": save the
    # pruned model with its optimizer, reload it and train on. Here the
    # reloaded model is pruned again from the step its optimizer reached.
    def schedule():
        return pruning.PolynomialDecay(0.2, 0.8, begin_step=0, end_step=8, frequency=2)

    x, y = _data(n=64)

    def fit(model, first, last):
        model.fit(
            x[first * 8 : last * 8],
            y[first * 8 : last * 8],
            batch_size=8,
            shuffle=False,
            verbose=0,
        )

    whole = pruning.prune_low_magnitude(_sequential(), schedule())
    whole.compile(optimizer="adam", loss="mse")
    fit(whole, 0, 8)

    model = pruning.prune_low_magnitude(_sequential(), schedule())
    model.compile(optimizer="adam", loss="mse")
    fit(model, 0, 4)
    model.save(tmp_path / "checkpoint.keras")
    loaded = keras.models.load_model(tmp_path / "checkpoint.keras")
    with pytest.warns(UserWarning, match="pass `initial_step=model.optimizer"):
        pruning.strip_pruning(pruning.prune_low_magnitude(loaded, schedule()))
    loaded = keras.models.load_model(tmp_path / "checkpoint.keras")
    pruning.prune_low_magnitude(
        loaded, schedule(), initial_step=loaded.optimizer.iterations
    )
    assert int(pruning.find_pruner(loaded).step.numpy()) == 4
    fit(loaded, 4, 8)
    assert int(pruning.find_pruner(loaded).step.numpy()) == 8
    for a, b in zip(whole.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    _check_masks_are_magnitude_masks(loaded, 0.8)
    with pytest.raises(ValueError, match="Received: initial_step=-1"):
        pruning.prune_low_magnitude(_sequential(), schedule(), initial_step=-1)


def test_m_by_n_without_a_schedule_prunes_at_step_one_as_tfmot():
    # TF-MOT's 2:4 guide passes `sparsity_m_by_n=(2, 4)` and no schedule;
    # TF-MOT computes N:M masks once, at step 1.
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(8), keras.layers.Dense(4)]
    )
    pruning.prune_low_magnitude(model, sparsity_m_by_n=(2, 4))
    _fit(model, steps=1)
    pruner = pruning.find_pruner(model)
    after_one = [m.numpy() for m in pruner.masks]
    for variable, mask in zip(pruner.variables, after_one, strict=True):
        assert mask.mean() == 0.5
        np.testing.assert_array_equal(variable.numpy() * mask, variable.numpy())
    model.fit(*_data(n=24), batch_size=8, verbose=0)
    for before, mask in zip(after_one, pruner.masks, strict=True):
        np.testing.assert_array_equal(mask.numpy(), before)  # never again
    assert pruning.sparsity_report(pruning.strip_pruning(model))["total"] == 0.5
