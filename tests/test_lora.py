"""LoRA through Keras' own `enable_lora(rank)` with the library's pieces.

The char LM's attention (EinsumDense) and FFN (Dense) layers get
`enable_lora(4)`; everything else is frozen. The guard, the monitor, the
detector, `L2SP` and pruning must work on what trains (the LoRA factors) and
leave the frozen pretrained weights bitwise alone.
"""

import os
import warnings

import keras
import numpy as np
import pytest

from keras_stability.callbacks import AdaptiveClipping
from keras_stability.callbacks import GradientExplosionDetector
from keras_stability.callbacks import GradientMonitor
from keras_stability.clipping import ZClip
from keras_stability.models import build_char_transformer
from keras_stability.optimizers import GuardedOptimizer
from keras_stability.regularizers import L2SP
from tests.hub_models import tiny_gpt2

VOCAB, SEQ = 40, 16
LORA_TARGETS = ("query", "value", "mlp_in", "mlp_out")


def lora_char_lm(seed=0, hidden_dim=128, rank=4):
    """A char LM with LoRA on the query, value and FFN projections, rest frozen.

    Query and value as in the LoRA paper (and keras-hub's `enable_lora`).
    On MultiHeadAttention's EinsumDense Keras' `lora_a` is `(in, heads,
    rank)`: `heads` times the factor of a fused Dense, so LoRA on all four
    attention projections plus the FFN trains 5.8% of this model.
    """
    keras.utils.set_random_seed(seed)
    model = build_char_transformer(
        VOCAB, SEQ, num_blocks=2, hidden_dim=hidden_dim, num_heads=4
    )
    for layer in model._flatten_layers():
        if layer.name in LORA_TARGETS and layer.path.startswith("block_"):
            layer.enable_lora(rank)
    for variable in model.weights:
        variable.trainable = "lora_" in variable.name
    return model


def data(n=64, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, VOCAB, (n, SEQ)).astype("int32")
    return x, np.roll(x, -1, axis=1)


def compile_guarded(model, lr=1e-2, l2sp=None):
    model.compile(
        optimizer=GuardedOptimizer(keras.optimizers.Adam(lr), clipping=ZClip()),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def values(model):
    return {v.path: np.array(keras.ops.convert_to_numpy(v)) for v in model.weights}


def test_lora_trains_at_most_five_percent_of_the_char_lm():
    model = lora_char_lm()
    total = sum(int(np.prod(v.shape)) for v in model.weights)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    # 2 blocks x (query, value: 2 x (128*4*4 + 4*32); FFN in/out: 2 x 2560)
    # = 18,944 of 428,072 (4.4%).
    assert (trainable, total) == (18944, 428072), (trainable, total)
    assert trainable / total <= 0.05, trainable / total
    assert {v.name for v in model.trainable_weights} == {
        "lora_kernel_a",
        "lora_kernel_b",
    }


def test_fit_with_guard_monitor_and_detector_changes_only_lora_weights():
    model = compile_guarded(lora_char_lm())
    x, y = data()
    before = values(model)
    monitor = GradientMonitor(check_freq=1, verbose=0)
    detector = GradientExplosionDetector(action="rollback", snapshot_freq=2, verbose=0)
    history = model.fit(
        x, y, batch_size=16, epochs=2, verbose=0, callbacks=[monitor, detector]
    )
    after = values(model)
    assert np.all(np.isfinite(history.history["loss"]))
    assert history.history["loss"][-1] < history.history["loss"][0]
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    lora = {p for p in before if "lora_" in p}
    # Every LoRA factor moved (lora_b starts at zero, lora_a gets a gradient
    # once lora_b is nonzero); every other weight is bitwise unchanged.
    assert changed == lora, sorted(changed ^ lora)
    # The monitor sees the blocks' (LoRA factors') gradients every step,
    # finite and nonzero, and no gradient for the frozen layers.
    assert len(monitor.history["step"]) == 8
    assert monitor.layer_names == ["block_0", "block_1"], monitor.layer_names
    for name in monitor.layer_names:
        norms = np.array(monitor.history["grad_norm"][name])
        assert np.all(np.isfinite(norms)) and norms.min() > 0, (name, norms)
    assert detector.events == []


def test_adaptive_clipping_in_fit_with_lora():
    model = lora_char_lm()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = data()
    before = values(model)
    history = model.fit(
        x, y, batch_size=16, epochs=1, verbose=0, callbacks=[AdaptiveClipping(ZClip())]
    )
    after = values(model)
    assert np.all(np.isfinite(history.history["grad_norm"]))
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert changed == {p for p in before if "lora_" in p}


def test_l2sp_pulls_the_merged_lora_delta_toward_zero():
    model = lora_char_lm(hidden_dim=32)
    reg = L2SP(alpha=0.1, beta=0.0)
    reg.attach(model)
    layer = model.get_layer("block_0").mlp_in
    # The frozen kernel is the pretrained weight: no anchor copy, no term;
    # lora_a has no term of its own; lora_b carries the delta's term.
    assert not reg.is_anchored(layer._kernel)
    assert layer.lora_kernel_a.regularizer is None
    assert layer.lora_kernel_b.regularizer is reg and reg.is_anchored(
        layer.lora_kernel_b
    )
    assert sum(float(v) for v in model.losses) == 0.0  # lora_b starts at zero
    rng = np.random.default_rng(0)
    b = rng.normal(size=layer.lora_kernel_b.shape).astype("float32")
    layer.lora_kernel_b.assign(b)
    a = np.asarray(layer.lora_kernel_a)
    scale = layer.lora_alpha / layer.lora_rank
    expected = 0.1 * np.sum((scale * a @ b) ** 2)
    # The term is ||W_eff - W0||^2 with W_eff the kernel Keras computes.
    merged = np.asarray(layer.kernel) - np.asarray(layer._kernel)
    np.testing.assert_allclose(0.1 * np.sum(merged**2), expected, rtol=1e-4)
    np.testing.assert_allclose(sum(float(v) for v in model.losses), expected, rtol=1e-5)

    # In fit, the term shrinks the delta: lora_b of a model trained with a
    # strong L2SP ends closer to zero than without.
    def delta_norm(alpha):
        m = lora_char_lm(hidden_dim=32)
        if alpha:
            L2SP(alpha=alpha, beta=0.0).attach(m)
        compile_guarded(m)
        x, y = data()
        m.fit(x, y, batch_size=16, epochs=2, verbose=0)
        inner = m.get_layer("block_0").mlp_in
        return float(
            np.linalg.norm(np.asarray(inner.kernel) - np.asarray(inner._kernel))
        )

    assert delta_norm(10.0) < 0.5 * delta_norm(0.0)


def load_and_predict(path, x):
    import keras

    import keras_stability  # noqa: F401  (registers the library's classes)

    model = keras.saving.load_model(path)
    return {
        "pred": np.asarray(model.predict(x, verbose=0)),
        "optimizer": type(model.optimizer).__name__,
        "lora_rank": sorted(
            {
                getattr(layer, "lora_rank", None) or 0
                for layer in model._flatten_layers()
            }
        ),
    }


def test_lora_char_lm_keras_round_trip_in_fresh_process(tmp_path, fresh_process):
    model = compile_guarded(lora_char_lm(hidden_dim=32))
    x, y = data()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    path = os.path.join(tmp_path, "lora_char_lm.keras")
    model.save(path)
    loaded = fresh_process(load_and_predict, path, x[:8])
    # Keras saves the delta merged into the kernel: the same function.
    np.testing.assert_allclose(
        loaded["pred"], model.predict(x[:8], verbose=0), rtol=1e-6, atol=1e-6
    )
    assert loaded["optimizer"] == "GuardedOptimizer"
    # The blocks rebuild their sublayers from their own config, which does
    # not carry `lora_rank`: the reloaded char LM is the plain merged model
    # (call `enable_lora` again to continue LoRA fine-tuning).
    assert loaded["lora_rank"] == [0]


def test_prune_low_magnitude_skips_lora_layers_with_a_warning_and_strips():
    from keras_stability.pruning import ConstantSparsity
    from keras_stability.pruning import prunable_weights
    from keras_stability.pruning import prune_low_magnitude
    from keras_stability.pruning import strip_pruning

    model = lora_char_lm(hidden_dim=32)
    for variable in model.get_layer("logits").weights:
        variable.trainable = True
    lora_before = {p: v for p, v in values(model).items() if "block_" in p}
    with pytest.warns(UserWarning, match=r"does not prune the 8 LoRA layers \(block_"):
        prune_low_magnitude(model, ConstantSparsity(0.5, 0, frequency=1))
    assert [v.path for v in prunable_weights(model)] == ["logits/kernel"]
    compile_guarded(model)
    x, y = data()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # target reached: no warning
        strip_pruning(model)
    kernel = np.asarray(model.get_layer("logits").kernel)
    assert np.mean(kernel == 0) == pytest.approx(0.5, abs=0.01)
    after = values(model)
    frozen = [p for p in lora_before if "lora_" not in p]
    assert all(np.array_equal(lora_before[p], after[p]) for p in frozen)


def lora_gpt2(rank=4):
    pytest.importorskip("keras_hub")  # the `hub` extra; `make test` installs it
    model = tiny_gpt2()
    # keras-hub: query and value, everything else frozen
    model.backbone.enable_lora(rank)
    return model


def gpt2_data(n=32, seq=16):
    ids = np.random.default_rng(0).integers(0, 64, (n, seq)).astype("int32")
    return {"token_ids": ids, "padding_mask": np.ones_like(ids, dtype=bool)}, np.roll(
        ids, -1, 1
    )


def test_gpt2_causal_lm_lora_with_guard_detector_l2sp_and_fresh_reload(
    tmp_path, fresh_process
):
    model = lora_gpt2()
    total = sum(int(np.prod(v.shape)) for v in model.weights)
    lora = sum(
        int(np.prod(v.shape)) for v in model.trainable_weights if "lora_" in v.name
    )
    others = {v.name for v in model.trainable_weights if "lora_" not in v.name}
    # 2 layers x (query, value: 32*2*4 + 4*16) = 1,280 LoRA weights of 21,504
    # (6.0%: at hidden_dim=32 rank 4 is not small; the share falls as 1/hidden);
    # keras-hub leaves the query/value biases (128) trainable too.
    assert (lora, total, others) == (1280, 21504, {"bias"})
    reg = L2SP(alpha=0.1)
    reg.attach(model)
    query = model.backbone.get_layer(
        "transformer_layer_0"
    )._self_attention_layer._query_dense
    assert (
        reg.is_anchored(query.lora_kernel_b) and query.lora_kernel_a.regularizer is None
    )
    x, y = gpt2_data()
    before = values(model)
    compile_guarded(model)
    monitor = GradientMonitor(check_freq=1, verbose=0)
    detector = GradientExplosionDetector(action="rollback", snapshot_freq=2, verbose=0)
    history = model.fit(
        x, y, batch_size=8, epochs=2, verbose=0, callbacks=[monitor, detector]
    )
    assert np.all(np.isfinite(history.history["loss"]))
    assert len(monitor.history["step"]) == 8 and detector.events == []
    after = values(model)
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    trainable = {v.path for v in model.trainable_weights}
    assert changed == trainable, sorted(changed ^ trainable)
    assert sum(float(v) for v in model.losses) > 0  # the deltas moved, L2SP sees them

    path = os.path.join(tmp_path, "gpt2_lora.keras")
    model.save(path)
    loaded = fresh_process(load_and_predict, path, x)
    np.testing.assert_allclose(
        loaded["pred"], model.predict(x, verbose=0), rtol=1e-6, atol=1e-6
    )
    assert loaded["lora_rank"] == [0]  # saved merged, as the char LM


def test_lora_at_most_five_percent_with_guard_detector_l2sp_pruning_and_reload(
    tmp_path, fresh_process
):
    """The issue's LoRA item in one configuration, end to end."""
    from keras_stability.pruning import ConstantSparsity
    from keras_stability.pruning import prune_low_magnitude
    from keras_stability.pruning import strip_pruning

    # Width 128, rank 2 on query/value/FFN, and the head's kernel trained
    # (and pruned to 50%: pruning takes trainable kernels, skips LoRA layers).
    model = lora_char_lm(rank=2)
    model.get_layer("logits").kernel.trainable = True
    total = sum(int(np.prod(v.shape)) for v in model.weights)  # before pruning
    reg = L2SP(alpha=0.1, beta=0.0)
    reg.attach(model)
    with pytest.warns(UserWarning, match="does not prune the 8 LoRA layers"):
        prune_low_magnitude(model, ConstantSparsity(0.5, 0, frequency=1))
    compile_guarded(model)

    x, y = data()
    before = values(model)
    monitor = GradientMonitor(check_freq=1, verbose=0)
    detector = GradientExplosionDetector(action="rollback", snapshot_freq=2, verbose=0)
    history = model.fit(
        x, y, batch_size=16, epochs=2, verbose=0, callbacks=[monitor, detector]
    )
    assert np.all(np.isfinite(history.history["loss"]))
    assert detector.events == [] and len(monitor.history["step"]) == 8
    assert model.optimizer.step.numpy() == 8  # the guard took every step
    assert sum(float(v) for v in model.losses) > 0  # L2SP sees the LoRA deltas
    after = values(model)
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert changed == {p for p in before if "lora_" in p} | {"logits/kernel"}
    # What trained: the LoRA factors (2 blocks x (query, value: 2 x (128*4*2
    # + 2*32); FFN in/out: 2 x 1280) = 9,472) and the head's kernel (128 x 40),
    # 3.5% of the model (pruning adds non-trainable masks only).
    trained = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    assert (trained, total) == (9472 + 5120, 418600)
    assert trained / total <= 0.05

    strip_pruning(model)
    assert np.mean(np.asarray(model.get_layer("logits").kernel) == 0) == (
        pytest.approx(0.5, abs=0.01)
    )
    path = os.path.join(tmp_path, "lora_pruned.keras")
    model.save(path)
    loaded = fresh_process(load_and_predict, path, x[:8])
    np.testing.assert_allclose(
        loaded["pred"], model.predict(x[:8], verbose=0), rtol=1e-6, atol=1e-6
    )
    assert loaded["optimizer"] == "GuardedOptimizer"
