"""Distiller on language models: 3-D logits, padding masks, unlabeled data."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_stability.distillation import Distiller
from keras_stability.models import build_char_transformer
from tests.distillation.test_losses import np_kl
from tests.distillation.test_losses import np_softmax
from tests.hub_models import tiny_gemma
from tests.hub_models import tiny_gpt2

VOCAB, SEQ, BATCH = 64, 8, 16
SPARSE_CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def char_lm(num_blocks, hidden_dim, seed):
    keras.utils.set_random_seed(seed)
    return build_char_transformer(
        VOCAB, SEQ, num_blocks=num_blocks, hidden_dim=hidden_dim, num_heads=2
    )


def lm_data(n=BATCH, seed=0):
    """Token ids, next-token labels and a padding mask (last tokens of half the rows)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (n, SEQ)).astype("int32")
    mask = np.ones((n, SEQ), "float32")
    mask[: n // 2, -3:] = 0.0
    return ids, np.roll(ids, -1, axis=1), mask


def by_hand(student_logits, teacher_logits, y, weight, alpha, temperature, divisor):
    """sum over weighted tokens of alpha * CE + (1 - alpha) * T**2 * KL, / divisor."""
    s = np.asarray(student_logits, "float64")
    t = np.asarray(teacher_logits, "float64")
    ce = -np.log(np.take_along_axis(np_softmax(s), y[..., None], -1)[..., 0])
    kl = np_kl(np_softmax(t / temperature), np_softmax(s / temperature))
    per_token = alpha * ce + (1.0 - alpha) * temperature**2 * kl
    return np.sum(weight * per_token) / divisor


def make_distiller(student, teacher, **compile_kwargs):
    distiller = Distiller(student, teacher)
    kwargs = dict(
        optimizer=keras.optimizers.Adam(1e-2),
        student_loss_fn=SPARSE_CE,
        alpha=0.3,
        temperature=2.0,
    )
    kwargs.update(compile_kwargs)
    distiller.compile(**kwargs)
    return distiller


# ----------------------------------------------------------- padding masks
@pytest.mark.parametrize(
    "reduction", ["sum_over_batch_size", "mean_with_sample_weight"]
)
def test_char_lm_padding_mask_counts_in_neither_term(reduction):
    ids, y, mask = lm_data()
    distiller = make_distiller(
        char_lm(1, 16, seed=2),
        char_lm(2, 32, seed=1),
        student_loss_fn=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=reduction
        ),
        distillation_loss_fn=keras.losses.KLDivergence(reduction=reduction),
    )
    got = float(distiller.compute_loss(ids, y, sample_weight=mask, training=False))
    s = distiller.student.predict(ids, verbose=0)
    t = distiller.teacher.predict(ids, verbose=0)
    keep = mask.astype(bool)  # by hand: only the unpadded tokens
    divisor = mask.size if reduction == "sum_over_batch_size" else keep.sum()
    expected = by_hand(s[keep], t[keep], y[keep], 1.0, 0.3, 2.0, divisor)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Labels at padded positions do not matter.
    y_other = np.where(keep, y, (y + 7) % VOCAB)
    got_other = float(
        distiller.compute_loss(ids, y_other, sample_weight=mask, training=False)
    )
    np.testing.assert_allclose(got_other, got, rtol=1e-6)
    unmasked = float(distiller.compute_loss(ids, y, training=False))
    assert abs(unmasked - got) > 1e-3


def test_char_lm_short_fit_with_padding_mask_lowers_the_loss():
    ids, y, mask = lm_data(64)
    distiller = make_distiller(char_lm(1, 16, seed=2), char_lm(2, 32, seed=1))
    history = distiller.fit(
        ids, y, sample_weight=mask, batch_size=16, epochs=3, verbose=0
    )
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert (
        history.history["distillation_loss"][-1]
        < history.history["distillation_loss"][0]
    )


# ------------------------------------------------------------ keras-hub GPT-2
def gpt2(num_layers, seed):
    pytest.importorskip("keras_hub")  # the `hub` extra
    return tiny_gpt2(VOCAB, num_layers=num_layers, seed=seed)


def gpt2_data(n=BATCH, seed=0):
    ids, y, mask = lm_data(n, seed)
    return {"token_ids": ids, "padding_mask": mask.astype("int32")}, y, mask


def test_gpt2_padding_mask_as_sample_weight_matches_unpadded_tokens():
    x, y, mask = gpt2_data()
    distiller = make_distiller(gpt2(1, seed=2), gpt2(2, seed=1))
    got = float(distiller.compute_loss(x, y, sample_weight=mask, training=False))
    s = np.asarray(distiller.student.predict(x, verbose=0))
    t = np.asarray(distiller.teacher.predict(x, verbose=0))
    keep = mask.astype(bool)
    np.testing.assert_allclose(
        got, by_hand(s[keep], t[keep], y[keep], 1.0, 0.3, 2.0, mask.size), rtol=1e-5
    )


def load_and_predict(path, x):
    import keras
    import keras_hub  # noqa: F401

    import keras_stability  # noqa: F401

    model = keras.saving.load_model(path)
    return type(model).__name__, np.asarray(model.predict(x, verbose=0))


def test_gpt2_short_fit_and_save_reload_in_fresh_process(tmp_path, fresh_process):
    x, y, mask = gpt2_data(32)
    distiller = make_distiller(gpt2(1, seed=2), gpt2(2, seed=1))
    history = distiller.fit(
        x, y, sample_weight=mask, batch_size=16, epochs=3, verbose=0
    )
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    d_path = os.path.join(tmp_path, "distiller.keras")
    s_path = os.path.join(tmp_path, "student.keras")
    distiller.save(d_path)
    distiller.student.save(s_path)
    expected = np.asarray(distiller.predict(x, verbose=0))
    for path, cls in ((d_path, "Distiller"), (s_path, "GPT2CausalLM")):
        name, pred = fresh_process(load_and_predict, path, x)
        assert name == cls
        np.testing.assert_allclose(pred, expected, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------- unlabeled data
def test_unlabeled_batch_is_the_distillation_term_alone():
    ids, _, mask = lm_data()
    distiller = make_distiller(
        char_lm(1, 16, seed=2), char_lm(2, 32, seed=1), alpha=0.5
    )
    got = float(distiller.compute_loss(ids, None, sample_weight=mask, training=False))
    s = distiller.student.predict(ids, verbose=0)
    t = distiller.teacher.predict(ids, verbose=0)
    # alpha is 0 for unlabeled data: no (1 - alpha) factor on the soft term.
    expected = by_hand(s, t, np.zeros_like(ids), mask, 0.0, 2.0, mask.size)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("as_dataset", [False, True])
def test_fit_without_labels_trains_on_distillation(as_dataset):
    ids, _, _ = lm_data(64)
    distiller = make_distiller(
        char_lm(1, 16, seed=2),
        char_lm(2, 32, seed=1),
        metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )
    before = [w.numpy().copy() for w in distiller.student.weights]
    data = tf.data.Dataset.from_tensor_slices(ids).batch(16) if as_dataset else ids
    history = distiller.fit(
        data, batch_size=None if as_dataset else 16, epochs=3, verbose=0
    )
    logs = history.history
    np.testing.assert_allclose(logs["loss"], logs["distillation_loss"], rtol=1e-5)
    assert logs["student_loss"] == [0.0, 0.0, 0.0]
    assert "sparse_categorical_accuracy" not in logs  # no labels, no accuracy
    assert logs["loss"][-1] < logs["loss"][0]
    # Nor after a labeled fit has built the metric (it read 0.0 then).
    distiller.fit(ids, ids, batch_size=16, epochs=1, verbose=0)
    unlabeled = distiller.evaluate(data, verbose=0, return_dict=True)
    assert "sparse_categorical_accuracy" not in unlabeled
    labeled = distiller.evaluate(ids, ids, verbose=0, return_dict=True)
    assert labeled["sparse_categorical_accuracy"] > 0
    assert any(
        not np.array_equal(a, b.numpy())
        for a, b in zip(before, distiller.student.weights, strict=True)
    )


def tabular(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, 4, n).astype(
        "int32"
    )


def mlp(width, seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(width, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(4)(hidden))


@pytest.mark.parametrize("as_dataset", [False, True])
def test_unlabeled_fit_logs_the_alpha_it_used(as_dataset):
    # Before: `fit(x)` logged the compiled alpha (0.5) although the hard term
    # had weight 0 (loss == distillation_loss).
    x, y = tabular(32)
    distiller = make_distiller(mlp(8, 2), mlp(32, 1), alpha=0.5)
    data = tf.data.Dataset.from_tensor_slices(x).batch(16) if as_dataset else x
    logs = distiller.fit(
        data, batch_size=None if as_dataset else 16, epochs=2, verbose=0
    ).history
    assert logs["alpha"] == [0.0, 0.0]
    np.testing.assert_allclose(logs["loss"], logs["distillation_loss"], rtol=1e-6)
    # The compiled alpha is kept, and logged where it is used.
    assert distiller.alpha == 0.5
    labeled = distiller.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    assert labeled["alpha"] == [0.5]
    np.testing.assert_allclose(
        labeled["loss"][0],
        0.5 * labeled["student_loss"][0] + 0.5 * labeled["distillation_loss"][0],
        rtol=1e-5,
    )


def test_ignore_class_mixes_labeled_and_unlabeled_rows():
    x, y = tabular()
    known = np.arange(len(y)) % 4 == 0
    y_partial = np.where(known, y, -1).astype("int32")
    w = np.linspace(0.5, 1.5, len(y)).astype("float32")
    distiller = make_distiller(
        mlp(8, 2),
        mlp(32, 1),
        ignore_class=-1,
        alpha=0.4,
        metrics=[keras.metrics.SparseCategoricalAccuracy()],
        weighted_metrics=[
            keras.metrics.SparseCategoricalAccuracy(
                name="weighted_sparse_categorical_accuracy"
            )
        ],
    )
    got = float(distiller.compute_loss(x, y_partial, sample_weight=w, training=False))
    s = distiller.student.predict(x, verbose=0)
    t = distiller.teacher.predict(x, verbose=0)
    # alpha on labeled rows, 0 on the others; the mean over all rows.
    expected = by_hand(
        s[known], t[known], y[known], w[known], 0.4, 2.0, len(y)
    ) + by_hand(s[~known], t[~known], y[~known], w[~known], 0.0, 2.0, len(y))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Metrics count known labels only.
    logs = distiller.evaluate(
        x, y_partial, batch_size=len(y), verbose=0, return_dict=True
    )
    np.testing.assert_allclose(
        logs["sparse_categorical_accuracy"],
        np.mean(s[known].argmax(-1) == y[known]),
        rtol=1e-5,
    )
    logs = distiller.evaluate(
        x, y_partial, sample_weight=w, batch_size=8, verbose=0, return_dict=True
    )
    np.testing.assert_allclose(
        logs["weighted_sparse_categorical_accuracy"],
        np.sum(w[known] * (s[known].argmax(-1) == y[known])) / np.sum(w[known]),
        rtol=1e-5,
    )


def test_all_unknown_labels_train_like_no_labels():
    x, y = tabular(32)
    runs = []
    for labels, kwargs in ((np.full_like(y, -1), {"ignore_class": -1}), (None, {})):
        distiller = make_distiller(
            mlp(8, 2), mlp(32, 1), optimizer=keras.optimizers.SGD(0.1), **kwargs
        )
        distiller.fit(x, labels, batch_size=16, epochs=2, shuffle=False, verbose=0)
        runs.append([w.numpy() for w in distiller.student.weights])
    for a, b in zip(*runs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_ignore_class_per_token_on_lm_labels():
    ids, y, _ = lm_data()
    known = np.zeros_like(y, dtype=bool)
    known[:4] = True  # labels for the first 4 sequences only
    distiller = make_distiller(
        char_lm(1, 16, seed=2), char_lm(2, 32, seed=1), ignore_class=-1
    )
    got = float(distiller.compute_loss(ids, np.where(known, y, -1), training=False))
    s = distiller.student.predict(ids, verbose=0)
    t = distiller.teacher.predict(ids, verbose=0)
    expected = by_hand(s[known], t[known], y[known], 1.0, 0.3, 2.0, y.size) + by_hand(
        s[~known], t[~known], y[~known], 1.0, 0.0, 2.0, y.size
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_ignore_class_is_validated_and_saved():
    distiller = Distiller(mlp(8, 2), mlp(32, 1))
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `ignore_class`.*Received: ignore_class=0.5",
    ):
        distiller.compile(student_loss_fn=SPARSE_CE, ignore_class=0.5)
    distiller.compile(student_loss_fn=SPARSE_CE, ignore_class=-1)
    assert distiller.get_compile_config()["ignore_class"] == -1


def test_gemma_padding_mask_as_sample_weight_matches_unpadded_tokens():
    pytest.importorskip("keras_hub")

    def gemma(num_layers, seed):
        return tiny_gemma(VOCAB, num_layers=num_layers, seed=seed)

    x, y, mask = gpt2_data()
    distiller = make_distiller(gemma(1, seed=2), gemma(2, seed=1))
    got = float(distiller.compute_loss(x, y, sample_weight=mask, training=False))
    s = np.asarray(distiller.student.predict(x, verbose=0))
    t = np.asarray(distiller.teacher.predict(x, verbose=0))
    keep = mask.astype(bool)
    np.testing.assert_allclose(
        got, by_hand(s[keep], t[keep], y[keep], 1.0, 0.3, 2.0, mask.size), rtol=1e-5
    )
    history = distiller.fit(x, y, sample_weight=mask, batch_size=8, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def test_ignore_class_with_column_labels_as_keras_datasets_give_them():
    # keras.datasets' labels are (N, 1); the metrics' mask must not break on them.
    x, y = tabular()
    known = np.arange(len(y)) % 4 == 0
    column = np.where(known, y, -1).astype("int32")[:, None]
    distiller = make_distiller(
        mlp(8, 2),
        mlp(32, 1),
        ignore_class=-1,
        metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )
    distiller.fit(x, column, batch_size=8, epochs=1, verbose=0)
    s = distiller.student.predict(x, verbose=0)
    logs = distiller.evaluate(x, column, batch_size=len(y), verbose=0, return_dict=True)
    np.testing.assert_allclose(
        logs["sparse_categorical_accuracy"],
        np.mean(s[known].argmax(-1) == y[known]),
        rtol=1e-5,
    )
