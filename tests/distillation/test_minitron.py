"""`prune_and_distill` (Minitron: shrink, then distill from the unpruned teacher)."""

import keras
import numpy as np
import pytest

from keras_stability.distillation import prune_and_distill
from keras_stability.models import build_char_transformer
from tests.hub_models import tiny_gpt2

VOCAB, SEQ = 16, 8
CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def sequences(n, seed):
    """Each next token is a fixed function of the current one: learnable per token."""
    rng = np.random.default_rng(seed)
    ids = np.empty((n, SEQ + 1), "int32")
    ids[:, 0] = rng.integers(0, VOCAB, n)
    for t in range(SEQ):
        ids[:, t + 1] = (3 * ids[:, t] + 1) % VOCAB
    return ids[:, :-1], ids[:, 1:]


@pytest.fixture(scope="module")
def teacher():
    keras.utils.set_random_seed(0)
    model = build_char_transformer(VOCAB, SEQ, num_blocks=2, hidden_dim=32, num_heads=4)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=CE)
    x, y = sequences(256, seed=0)
    model.fit(x, y, batch_size=32, epochs=4, verbose=0)
    return model


def held_out_loss(model, x, y):
    return float(CE(y, model.predict(x, verbose=0)))


def test_distilled_student_beats_the_shrunk_model(teacher):
    from keras_stability.pruning import shrink_transformer

    x, y = sequences(256, seed=1)
    x_val, y_val = sequences(64, seed=2)
    trainable = teacher.trainable
    weights = [w.numpy().copy() for w in teacher.weights]
    sizes = dict(num_heads=2, intermediate_dim=32, num_layers=1)
    shrunk = shrink_transformer(teacher, data=x[:128], **sizes)
    student, history = prune_and_distill(
        teacher,
        x,
        calibration_samples=128,
        epochs=3,
        batch_size=32,
        optimizer=keras.optimizers.Adam(1e-2),
        verbose=0,
        **sizes,
    )
    # The same shrunk model (same calibration rows), before and after distillation.
    assert student.count_params() == shrunk.count_params() < teacher.count_params()
    assert history.shrink_plan["sizes"] == dict(sizes, hidden_dim=32)
    before, after = (
        held_out_loss(shrunk, x_val, y_val),
        held_out_loss(student, x_val, y_val),
    )
    assert after < 0.8 * before, (before, after)
    assert history.history["loss"][-1] < history.history["loss"][0]
    # Pure distillation (alpha 0), and the teacher is left as it was.
    assert history.history["student_loss"] == [0.0] * 3
    assert teacher.trainable == trainable
    for a, b in zip(weights, teacher.weights, strict=True):
        np.testing.assert_array_equal(a, b.numpy())


def test_labels_and_argument_errors(teacher):
    x, y = sequences(32, seed=1)
    student, history = prune_and_distill(
        teacher,
        x,
        y,
        num_layers=1,
        alpha=0.5,
        calibration_samples=16,
        block_importance="loss",
        epochs=1,
        batch_size=16,
        verbose=0,
    )
    assert history.history["student_loss"][0] > 0
    assert len([layer for layer in student.layers if "block" in layer.name]) == 1
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `alpha`. Expected 0 when no labels",
    ):
        prune_and_distill(teacher, x, num_layers=1, alpha=0.5)
    with pytest.raises(
        ValueError, match=r"Invalid value for argument `calibration_samples`"
    ):
        prune_and_distill(teacher, x, num_layers=1, calibration_samples=0)
    with pytest.raises(ValueError, match=r"Invalid value for argument `num_heads`"):
        prune_and_distill(teacher, x, num_heads=0)
    with pytest.raises(ValueError, match=r"Invalid value for argument `x`"):
        prune_and_distill(teacher, "text", num_layers=1)


def _no_shrink(*args, **kwargs):
    raise AssertionError("the shrink ran before `x` was checked")


@pytest.mark.parametrize("packed", [2, 3])
def test_x_packed_with_labels_is_refused_before_any_work(monkeypatch, packed):
    # Before: the shrink ran on the tuple (as `shrink_transformer(data=...)`
    # takes it), then `fit` failed inside Keras ("expects 2 named input(s)
    # ... received 4 input tensors" for keras-hub models).
    from keras_stability.pruning import transformer_shrink

    monkeypatch.setattr(transformer_shrink, "_Analysis", _no_shrink)
    keras.utils.set_random_seed(0)
    model = build_char_transformer(VOCAB, SEQ, num_blocks=2, hidden_dim=16, num_heads=2)
    x, y = sequences(16, seed=1)
    data = (x, y, np.ones(y.shape, "float32"))[:packed]
    with pytest.raises(ValueError) as info:
        prune_and_distill(model, data, num_layers=1, verbose=0)
    assert str(info.value) == (
        f"Invalid value for argument `x`. Expected the inputs of '{model.name}' "
        "alone (an array of token ids, or a dict such as keras-hub's "
        '`{"token_ids", "padding_mask"}`), samples first; pass the labels and '
        "weights separately: `prune_and_distill(teacher, x, y=y, "
        "sample_weight=sample_weight, ...)`. Received: x=a tuple of "
        f"{packed} elements (like "
        + ("(x, y)" if packed == 2 else "(x, y, sample_weight)")
        + f"), while '{model.name}' takes a single input"
    )


def test_keras_hub_x_packed_with_labels_is_refused(monkeypatch):
    pytest.importorskip("keras_hub")  # the `hub` extra
    from keras_stability.pruning import transformer_shrink

    monkeypatch.setattr(transformer_shrink, "_Analysis", _no_shrink)
    teacher = tiny_gpt2(VOCAB)
    ids, y = sequences(16, seed=1)
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `x`.*pass the labels and weights "
        r"separately.*Received: x=a list of 3 elements \(like \(x, y, "
        r"sample_weight\)\), while 'gpt2_causal_lm\w*' takes a single input",
    ):
        prune_and_distill(teacher, [x, y, np.ones(y.shape, "float32")], num_layers=1)


def test_gpt2_causal_lm_with_padding_mask():
    pytest.importorskip("keras_hub")  # the `hub` extra
    teacher = tiny_gpt2(VOCAB)
    ids, _ = sequences(64, seed=1)
    mask = np.ones_like(ids)
    mask[::2, -2:] = 0
    x = {"token_ids": ids, "padding_mask": mask}
    student, history = prune_and_distill(
        teacher,
        x,
        intermediate_dim=32,
        num_layers=1,
        calibration_samples=32,
        sample_weight=mask.astype("float32"),
        epochs=3,
        batch_size=16,
        optimizer=keras.optimizers.Adam(1e-2),
        verbose=0,
    )
    assert type(student).__name__ == "GPT2CausalLM"
    assert student.backbone.num_layers == 1 and student.backbone.intermediate_dim == 32
    losses = history.history["distillation_loss"]
    assert losses[-1] < 0.5 * losses[0], losses


def _block_names(model):
    return [layer.name for layer in model.layers if "block" in layer.name]


def test_keep_blocks_are_the_ones_distilled(teacher):
    x, y = sequences(32, seed=1)
    student, history = prune_and_distill(
        teacher,
        x,
        keep_blocks=[1],
        calibration_samples=16,
        batch_size=16,
        optimizer=keras.optimizers.SGD(0.0),  # the weights stay the teacher's
        verbose=0,
    )
    assert _block_names(student) == ["block_1"]
    assert list(history.shrink_plan["blocks"]["keep"]) == [1]
    assert history.shrink_plan["sizes"]["num_layers"] == 1
    old = {w.path: w.numpy() for w in teacher.weights}
    for w in student.weights:
        np.testing.assert_array_equal(w.numpy(), old[w.path], err_msg=w.path)
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `num_layers`. Expected `None` or the "
        r"number of `keep_blocks` \(1: \[1\]\). Received: num_layers=2",
    ):
        prune_and_distill(teacher, x, num_layers=2, keep_blocks=[1])
    with pytest.raises(
        ValueError, match=r"Expected distinct block indices in \[0, 1\]"
    ):
        prune_and_distill(teacher, x, keep_blocks=[2])


def test_block_search_picks_the_lowest_validation_loss(teacher):
    # Labels that the candidate further from the teacher predicts: it has the
    # lower calibration loss, so it is ranked first, but with a learning rate
    # of 0 the validation loss is each candidate's KL to the teacher (alpha
    # 0): the search must pick the other one.
    from keras_stability.pruning import shrink_transformer

    x, _ = sequences(48, seed=1)
    cal = x[:16]
    kl = keras.losses.KLDivergence()
    target = keras.ops.softmax(teacher(cal))
    candidates = [shrink_transformer(teacher, keep_blocks=[k]) for k in (0, 1)]
    kls = [float(kl(target, keras.ops.softmax(c(cal)))) for c in candidates]
    far, near = int(np.argmax(kls)), int(np.argmin(kls))
    y = np.asarray(keras.ops.argmax(candidates[far](x), -1))
    student, history = prune_and_distill(
        teacher,
        x,
        y,
        num_layers=1,
        calibration_samples=16,
        block_candidates=2,
        search_steps=1,
        batch_size=16,
        optimizer=keras.optimizers.SGD(0.0),
        verbose=0,
    )
    search = history.block_search
    assert search["candidates"] == [[far], [near]]  # by calibration loss
    assert search["calibration_loss"][0] < search["calibration_loss"][1]
    assert search["keep"] == [near]
    assert list(history.shrink_plan["blocks"]["keep"]) == [near]
    assert _block_names(student) == [f"block_{near}"]
    np.testing.assert_allclose(
        search["validation_loss"], [kls[far], kls[near]], rtol=1e-4
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"block_candidates": 2},
            "`block_candidates`. Expected a positive integer "
            "given together with `search_steps`",
        ),
        (
            {"search_steps": 2},
            "`search_steps`. Expected a positive integer given "
            "together with `block_candidates`",
        ),
        (
            {"block_candidates": 0, "search_steps": 1},
            "`block_candidates`. Expected a "
            "positive integer or None. Received: block_candidates=0",
        ),
        (
            {"block_candidates": 2, "search_steps": 1, "keep_blocks": [0]},
            "Expected `None` when `keep_blocks` names the blocks",
        ),
        (
            {"block_candidates": 2, "search_steps": 1, "y": None},
            "Expected `None` when no labels `y` are given",
        ),
        (
            {"block_candidates": 2, "search_steps": 1, "num_layers": None},
            "Expected `None` when `num_layers` is not given",
        ),
        (
            {"block_candidates": 2, "search_steps": 1, "calibration_samples": 32},
            "Expected `None` when `x` has no rows after the 32 calibration rows",
        ),
    ],
)
def test_bad_search_arguments_raise(teacher, kwargs, message):
    x, y = sequences(32, seed=1)
    kwargs = {"y": y, "num_layers": 1, "calibration_samples": 16, **kwargs}
    with pytest.raises(ValueError) as info:
        prune_and_distill(teacher, x, verbose=0, **kwargs)
    assert message in str(info.value)
