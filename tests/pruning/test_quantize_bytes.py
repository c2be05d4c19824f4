"""The byte accounting and speed helpers of `benchmarks/llm_compression.py`."""

import keras
import numpy as np

from benchmarks import llm_compression as bench
from benchmarks.common import median_ci
from keras_stability import pruning
from keras_stability.models import build_char_transformer


def _sparse_int8_mlp():
    keras.utils.set_random_seed(0)
    model = bench.mlp((64,), "mlp")
    rng = np.random.default_rng(0)
    for layer in model.layers[1:]:
        kernel, bias = layer.get_weights()
        kernel[rng.random(kernel.shape) < 0.8] = 0.0  # 80% zeros
        layer.set_weights([kernel, bias])
    return pruning.quantize(model)


def test_byte_parts_add_up_to_the_file_and_count_every_kind():
    model = _sparse_int8_mlp()
    parts = bench._byte_parts(model)
    total = parts["kernels"] + parts["biases"] + parts["scales"] + parts["container"]
    assert total == pruning.compressed_size(model)
    assert parts["kernels"] > 0 and parts["biases"] > 0 and parts["scales"] > 0
    # A bitmap plus the non-zero values gzips smaller than the int8 matrix.
    assert parts["kernels_bitmap_values"] < parts["kernels"]


def test_median_ci_brackets_the_median():
    median, lo, hi = median_ci([1.0, 2.0, 3.0, 4.0, 100.0])
    assert median == 3.0
    assert 1.0 <= lo <= median <= hi <= 100.0
    assert median_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)


def test_generation_speed_times_every_model_every_round():
    vocab = list("abcdef")
    models = {
        "teacher (dense float32)": build_char_transformer(
            len(vocab), bench.SEQ_LEN, num_blocks=2, hidden_dim=8, num_heads=2
        ),
        "small": build_char_transformer(
            len(vocab), bench.SEQ_LEN, num_blocks=1, hidden_dim=8, num_heads=2
        ),
    }
    rows = {name: {} for name in models}
    speeds = bench.generation_speed(models, vocab, repeats=3, tokens=4)
    assert all(
        len(s["tok_s"]) == 3 and len(s["forward_ms"]) == 3 for s in speeds.values()
    )
    assert all(t > 0 for s in speeds.values() for t in s["tok_s"])
    bench._add_speed(rows, models, vocab)
    assert (
        rows["teacher (dense float32)"]["speedup_runs"] == [1.0] * bench.SPEED_REPEATS
    )
    assert len(rows["small"]["speedup_runs"]) == bench.SPEED_REPEATS


def test_storage_parts_name_every_part_of_the_char_lm():
    keras.utils.set_random_seed(0)
    lm = build_char_transformer(12, 8, num_blocks=1, hidden_dim=16, num_heads=2)
    rng = np.random.default_rng(0)
    for w in lm.weights:
        if w.path.startswith("block_") and w.path.endswith("kernel"):
            kernel = w.numpy()
            kernel[rng.random(kernel.shape) < 0.8] = 0.0
            w.assign(kernel)
    pruning.quantize(lm)
    plain = bench._storage_parts(lm, bitmap=False)
    bitmap = bench._storage_parts(lm, bitmap=True)
    assert set(plain) == {
        "block linear kernels",
        "block linear biases",
        "block int8 scales",
        "block norms",
        "token embeddings",
        "position embeddings",
        "output layer kernel",
        "output layer bias/scale",
        "final norm",
    }
    # Only the mostly-zero block kernels are split into bitmap + values.
    assert set(bitmap) == (set(plain) - {"block linear kernels"}) | {
        "block linear kernels: bitmap",
        "block linear kernels: non-zero values",
    }
    assert all(bitmap[k] == plain[k] for k in plain if k in bitmap)
    members = bench._keras_members(lm)
    assert set(members) >= {"config.json", "metadata.json", "model.weights.h5"}
