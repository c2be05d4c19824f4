"""`sparse_storage` of a keras-hub backbone: its blocks' linears as bitmaps."""

import os

import numpy as np
import pytest

pytest.importorskip("keras_hub")

import keras  # noqa: E402

from keras_stability import pruning  # noqa: E402
from tests.hub_models import tiny_gpt2  # noqa: E402
from tests.pruning.test_sparse_storage import _nested_keys  # noqa: E402
from tests.pruning.test_sparse_storage import _sparse_storage_quietly  # noqa: E402
from tests.pruning.test_sparse_storage import _zero_kernels  # noqa: E402

VOCAB = 64


def test_gpt2_backbone_blocks_are_stored_as_bitmaps_and_reload_exactly(tmp_path):
    backbone = tiny_gpt2(VOCAB).backbone
    # Per block: query, key, value, attention output, FFN in and out.
    assert _zero_kernels(backbone, prefix="transformer_layer_") == 12
    pruning.quantize(backbone)
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(1, VOCAB, (2, 16)).astype("int32"),
        "padding_mask": np.ones((2, 16), bool),
    }
    pred = backbone.predict(x, verbose=0)

    copy, messages = _sparse_storage_quietly(backbone)
    # keras-hub's `ReversibleEmbedding` (an `Embedding` subclass with its
    # own save) is left as Keras stores it, and said so.
    assert any(
        "leaves 1 layers stored as Keras stores them (token_embedding)" in m
        for m in messages
    )
    path = os.path.join(tmp_path, "gpt2.keras")
    copy.save(path)
    stored = _nested_keys(path)
    bitmaps = sorted(f for f, keys in stored.items() if "0_bitmap" in keys)
    assert len(bitmaps) == 12
    assert all("transformer_decoder" in folder for folder in bitmaps)

    loaded = keras.saving.load_model(path)
    for old, new in zip(backbone.weights, loaded.weights, strict=True):
        assert old.name == new.name and old.dtype == new.dtype
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), pred)
    # No size check at this width (hidden 32): three h5 datasets a kernel
    # and the copy's functional config (every layer listed, where the
    # backbone's config holds its arguments) outweigh the saving (measured
    # 20513 -> 20783 bytes); `test_sparse_storage.py` measures it at 64.
