import numpy as np
import pytest


def _fit_stable_lm_under_mirrored_strategy():
    """Runs in a subprocess with 2 logical CPU devices."""
    import keras
    import tensorflow as tf

    from keras_stability.layers import EmbeddingGradientShrink
    from keras_stability.layers import Residual
    from keras_stability.layers import StableTransformerBlock
    from keras_stability.layers import ZLoss
    from keras_stability.regularizers import L2SP

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(0)
    ids = (rng.integers(0, 11, size=(32, 1)) + np.arange(9)[None, :]) % 11
    with strategy.scope():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8,), dtype="int32")
        h = EmbeddingGradientShrink(0.1)(keras.layers.Embedding(11, 16)(inputs))
        h = StableTransformerBlock(num_heads=2, qk_norm=True, layerscale_init=0.1)(h)
        h = Residual(keras.layers.Dense(16), scale="rezero")(h)
        logits = ZLoss(1e-4)(keras.layers.Dense(11)(h))
        model = keras.Model(inputs, logits)
        reg = L2SP(alpha=1e-3, beta=1e-4)
        reg.attach(model)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    anchored = [v for v in model.trainable_weights if reg.is_anchored(v)]
    penalty_at_anchor = (
        float(sum(float(reg(v)) for v in anchored)) if anchored else None
    )
    history = model.fit(ids[:, :-1], ids[:, 1:], epochs=4, batch_size=16, verbose=0)
    return {
        "replicas": strategy.num_replicas_in_sync,
        "penalty_at_anchor": penalty_at_anchor,
        "losses": history.history["loss"],
    }


@pytest.mark.distributed
def test_layers_and_l2sp_train_under_mirrored_strategy(two_cpu_devices):
    result = two_cpu_devices(_fit_stable_lm_under_mirrored_strategy)
    assert result["replicas"] == 2
    assert result["penalty_at_anchor"] == 0.0
    assert np.isfinite(result["losses"]).all()
    assert result["losses"][-1] < result["losses"][0]
