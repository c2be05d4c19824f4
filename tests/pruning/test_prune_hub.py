"""Magnitude and 2:4 pruning of keras-hub causal LMs (tiny configs, no download)."""

import numpy as np
import pytest

pytest.importorskip("keras_hub")

import keras  # noqa: E402

from keras_stability import pruning  # noqa: E402
from tests.hub_models import tiny_gemma  # noqa: E402
from tests.hub_models import tiny_gpt2  # noqa: E402

VOCAB = 64


def _tokens(n=16, length=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(n, length + 1)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((n, length), bool)}
    return x, ids[:, 1:]


def _fit(model, steps=2):
    x, y = _tokens()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=8, epochs=steps // 2, verbose=0)
    return x


@pytest.mark.parametrize(
    "family, blocks", [(tiny_gpt2, "^transformer_layer_"), (tiny_gemma, "^decoder_")]
)
def test_two_four_on_the_block_linears_of_keras_hub_lms(family, blocks):
    model = family(VOCAB)
    embeddings = model.backbone.token_embedding.embeddings.numpy().copy()
    pruning.prune_low_magnitude(
        model,
        pruning.ConstantSparsity(0.5, 0, frequency=1),
        sparsity_m_by_n=(2, 4),
        filters=blocks,
    )
    pruner = pruning.find_pruner(model)
    assert len(pruner.variables) == 12 if family is tiny_gpt2 else 14
    x = _fit(model)
    pruning.strip_pruning(model)
    for variable, axis in zip(pruner.variables, pruner.input_axes, strict=True):
        groups = np.moveaxis(variable.numpy(), axis, -1).reshape(-1, 4)
        assert np.all((groups == 0).sum(axis=1) >= 2), variable.path
    # Q/K/V are grouped along the hidden (input) axis, not across heads.
    query = [
        (v, a)
        for v, a in zip(pruner.variables, pruner.input_axes, strict=True)
        if v.path.endswith("query/kernel")
    ][0]
    assert query[0].shape[query[1]] == 32
    # The embeddings (tied output layer) are not pruned, only trained.
    assert np.mean(model.backbone.token_embedding.embeddings.numpy() == 0) == 0
    assert not np.array_equal(
        model.backbone.token_embedding.embeddings.numpy(), embeddings
    )
    assert np.all(np.isfinite(model.predict(x, verbose=0)))


def test_global_magnitude_pruning_of_gpt2_blocks_saves_and_reloads(tmp_path):
    model = tiny_gpt2(VOCAB)
    pruning.prune_low_magnitude(
        model,
        pruning.ConstantSparsity(0.7, 0, frequency=1),
        filters="^transformer_layer_",
        global_ranking=True,
    )
    x = _fit(model)
    pruning.strip_pruning(model)
    pruned = pruning.prunable_weights(model, filters="^transformer_layer_")
    zeros = sum(int((v.numpy() == 0).sum()) for v in pruned)
    assert zeros / sum(int(np.prod(v.shape)) for v in pruned) == pytest.approx(
        0.7, abs=0.01
    )
    path = str(tmp_path / "gpt2_pruned.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        reloaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5
    )
