import keras
import keras_tuner
import numpy as np
import pytest

from keras_stability.regularizers import L2SP
from keras_stability.regularizers import l2sp_penalty
from tests.helpers import run_layer_test


def _fine_tune_model(seed=0):
    keras.utils.set_random_seed(seed)
    backbone = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(8),
        ],
        name="backbone",
    )
    head = keras.layers.Dense(3, name="head")
    model = keras.Sequential([backbone, head])
    return model, backbone, head


def test_layer_with_l2sp_kernel_regularizer(tmp_path):
    out = run_layer_test(
        keras.layers.Dense,
        {"units": 4, "kernel_regularizer": L2SP(alpha=0.1, beta=0.01)},
        input_shape=(5, 3),
        expected_output_shape=(5, 4),
        expected_num_trainable_weights=2,
        expected_num_losses=1,
        fresh_process=True,
        tmp_dir=tmp_path,
    )
    # Without an anchor the kernel gets plain L2 with strength beta.
    kernel = out["layer"].kernel.numpy()
    np.testing.assert_allclose(
        float(out["layer"].losses[0]), 0.01 * np.sum(kernel**2), rtol=1e-5
    )


def test_zero_at_reference_weights():
    model, backbone, head = _fine_tune_model()
    reg = L2SP(alpha=0.5, beta=0.0)
    reg.attach(model, backbone=backbone)
    # Backbone kernels (2) and head kernel (1) regularized; biases not.
    assert len(model.losses) == 3
    assert [float(v) for v in model.losses] == [0.0, 0.0, 0.0]
    assert reg.is_anchored(backbone.layers[0].kernel)
    assert not reg.is_anchored(head.kernel)
    assert backbone.layers[0].bias.regularizer is None


def test_matches_formula_away_from_reference():
    model, backbone, head = _fine_tune_model()
    alpha, beta = 0.3, 0.02
    reg = L2SP(alpha=alpha, beta=beta)
    reg.attach(model, backbone=backbone)
    rng = np.random.default_rng(0)
    k0 = backbone.layers[0].kernel
    k1 = backbone.layers[1].kernel
    w0 = k0.numpy().copy()
    w1 = k1.numpy().copy()
    d0 = rng.normal(size=w0.shape).astype("float32")
    d1 = rng.normal(size=w1.shape).astype("float32")
    k0.assign(w0 + d0)
    k1.assign(w1 + d1)
    expected = (
        alpha * np.sum(d0.astype("float64") ** 2)
        + alpha * np.sum(d1.astype("float64") ** 2)
        + beta * np.sum(head.kernel.numpy().astype("float64") ** 2)
    )
    np.testing.assert_allclose(float(sum(model.losses)), expected, rtol=1e-5)
    np.testing.assert_allclose(
        float(l2sp_penalty(w0 + d0, w0, alpha)),
        alpha * np.sum(d0.astype("float64") ** 2),
        rtol=1e-5,
    )


def test_fit_pulls_backbone_toward_reference_not_zero():
    model, backbone, _ = _fine_tune_model()
    reg = L2SP(alpha=1.0, beta=0.0)
    reg.attach(model, backbone=backbone)
    kernel = backbone.layers[0].kernel
    w0 = kernel.numpy().copy()
    kernel.assign(w0 + 0.5)
    x = np.zeros((8, 6), "float32")
    # Data loss is zero on these inputs/targets, so only the penalty trains.
    model.compile(
        optimizer=keras.optimizers.SGD(0.1), loss=lambda y, p: 0.0 * keras.ops.sum(p)
    )
    model.fit(x, np.zeros((8, 3), "float32"), epochs=3, batch_size=8, verbose=0)
    # Each SGD step: d <- d - 0.1 * 2 * d = 0.8 d; three steps: 0.512 * 0.5.
    np.testing.assert_allclose(kernel.numpy() - w0, np.full(w0.shape, 0.256), rtol=1e-4)


def test_anchor_callback_uses_values_at_fit_start():
    model, backbone, _ = _fine_tune_model()
    reg = L2SP(alpha=1.0, beta=0.0)
    reg.attach(model, backbone=backbone)
    kernel = backbone.layers[0].kernel
    kernel.assign(kernel.numpy() + 1.0)  # e.g. loaded pretrained weights later
    assert float(sum(model.losses)) > 0
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    model.fit(
        np.ones((4, 6), "float32"),
        np.zeros((4, 3), "float32"),
        epochs=1,
        verbose=0,
        callbacks=[reg.anchor_callback(backbone=backbone)],
    )
    assert float(sum(model.losses)) == 0.0


def test_strength_from_keras_tuner_hp():
    hp = keras_tuner.HyperParameters()
    reg = L2SP(
        alpha=hp.Float("alpha", 1e-4, 1e-1, sampling="log", default=1e-2),
        beta=hp.Choice("beta", [0.0, 1e-3]),
    )
    assert reg.get_config() == {"alpha": 1e-2, "beta": 0.0}


def test_config_round_trip():
    reg = L2SP(alpha=0.2, beta=0.003)
    config = reg.get_config()
    assert config == {"alpha": 0.2, "beta": 0.003}
    revived = keras.regularizers.deserialize(keras.regularizers.serialize(reg))
    assert isinstance(revived, L2SP) and revived.get_config() == config


@pytest.mark.parametrize(
    "name, value",
    [("alpha", -0.1), ("beta", -1e-3), ("alpha", float("nan")), ("beta", "big")],
)
def test_negative_strength_is_rejected(name, value):
    with pytest.raises(ValueError) as info:
        L2SP(**{name: value})
    assert str(info.value) == (
        f"Invalid value for argument `{name}`. Expected a number >= 0. Received: {name}={value!r}"
    )


def test_attach_to_an_unbuilt_model_raises_instead_of_doing_nothing():
    # Before: attach() found no weights, anchored nothing and returned silently.
    model = keras.Sequential([keras.layers.Dense(8), keras.layers.Dense(3)])
    with pytest.raises(ValueError) as info:
        L2SP().attach(model)
    assert str(info.value).startswith(
        "Invalid value for argument `model`. Expected a built Keras layer or model"
    )
    assert str(info.value).endswith("not built")


def test_attach_with_a_backbone_outside_the_model_raises():
    model, _, _ = _fine_tune_model()
    other = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8)], name="other")
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `backbone`.*shares no weight.*Received: backbone='other'",
    ):
        L2SP().attach(model, backbone=other)
    with pytest.raises(
        ValueError, match=r"Invalid value for argument `include_biases`"
    ):
        L2SP().attach(model, include_biases="yes")


@pytest.mark.parametrize("kind", ["dense", "embedding"])
@pytest.mark.parametrize("in_backbone", [True, False])
def test_l2sp_on_keras_lora_layers_is_the_merged_delta(kind, in_backbone):
    # Keras' enable_lora: W_eff = W0 + (lora_alpha / rank) * a @ b with W0
    # frozen; L2-SP's ||W_eff - W0||^2 is the delta's squared norm (alpha in
    # the backbone, beta outside it). Fails before the fix: lora_a was
    # anchored at its random init and lora_b at zero, each on its own.
    if kind == "dense":
        layer = keras.layers.Dense(6)
        layer.build((None, 5))
        layer.enable_lora(2, lora_alpha=6)  # scale 3
        a, b, base = layer.lora_kernel_a, layer.lora_kernel_b, layer._kernel
        inputs = keras.Input((5,))
    else:
        layer = keras.layers.Embedding(7, 4)
        layer.build((None,))
        layer.enable_lora(2, lora_alpha=6)
        a, b, base = layer.lora_embeddings_a, layer.lora_embeddings_b, layer._embeddings
        inputs = keras.Input((3,), dtype="int32")
    head = keras.layers.Dense(3, name="head")
    model = keras.Sequential([inputs, layer, head])
    reg = L2SP(alpha=0.5, beta=0.25)
    reg.attach(model, backbone=None if in_backbone else head)
    assert b.regularizer is reg and a.regularizer is None and base.regularizer is None
    b.assign(np.random.default_rng(0).normal(size=b.shape).astype("float32"))
    merged = layer.kernel if kind == "dense" else layer.embeddings
    delta = np.asarray(merged) - np.asarray(base)
    np.testing.assert_allclose(
        3.0 * np.asarray(a) @ np.asarray(b), delta, rtol=1e-5, atol=1e-6
    )
    strength = 0.5 if in_backbone else 0.25
    losses = [float(v) for v in model.losses]
    assert len(losses) == 2  # the LoRA delta and the head kernel
    expected = strength * np.sum(delta**2)
    assert any(abs(v - expected) <= 1e-5 * expected for v in losses), (losses, expected)


def test_attach_after_a_fit_reaches_the_next_fit_and_evaluate():
    # Train the head first, then attach and go on training without
    # recompiling: the train (and test) functions traced before `attach`
    # had no regularization loss, so the next fit ignored L2-SP.
    model, backbone, _ = _fine_tune_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.normal(size=(32, 3)).astype("float32")
    model.compile(keras.optimizers.SGD(0.0), "mse")
    model.fit(x, y, batch_size=32, verbose=0)
    model.evaluate(x, y, batch_size=32, verbose=0)
    L2SP(alpha=0.0, beta=10.0).attach(model, backbone=backbone)
    penalty = float(sum(model.losses))  # the head's plain L2 term
    assert penalty > 1.0
    mse = float(np.mean((model.predict(x, verbose=0) - y) ** 2))
    logs = model.fit(x, y, batch_size=32, verbose=0).history
    np.testing.assert_allclose(logs["loss"][0], mse + penalty, rtol=1e-5)
    evaluated = model.evaluate(x, y, batch_size=32, verbose=0)
    np.testing.assert_allclose(evaluated, mse + penalty, rtol=1e-5)


def test_a_reloaded_model_has_no_term_until_attach_runs_again(tmp_path):
    # As the docstring says (it used to promise the plain-L2 `beta` term).
    keras.utils.set_random_seed(0)
    backbone = keras.Sequential(
        [keras.Input((10,)), keras.layers.Dense(16, activation="relu")],
        name="backbone",
    )
    model = keras.Sequential([backbone, keras.layers.Dense(3, name="head")])
    L2SP(alpha=0.1, beta=0.01).attach(model, backbone=backbone)
    assert len(model.losses) == 2
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.losses == []
    L2SP(alpha=0.1, beta=0.01).attach(loaded, backbone=loaded.get_layer("backbone"))
    head = np.asarray(loaded.get_layer("head").kernel)
    terms = sorted(float(t) for t in loaded.losses)
    # Anchored at the loaded weights: the backbone's term is 0, the head's
    # the plain-L2 `beta` term.
    assert terms == pytest.approx([0.0, 0.01 * float(np.sum(head**2))], rel=1e-5)
