import numpy as np
import pytest


def _train_under_mirrored_strategy():
    """Runs in a subprocess with 2 logical CPU devices."""
    import keras
    import tensorflow as tf

    from keras_stability.callbacks import GradualUnfreezing
    from keras_stability.callbacks import WeightDecayScheduler

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    x = np.ones((8, 3), "float32")
    y = np.zeros((8, 2), "float32")
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((3,)), keras.layers.Dense(2, use_bias=False)]
        )
        model.compile(
            optimizer=keras.optimizers.SGD(0.1, weight_decay=0.1),
            loss=lambda t, p: 0.0 * keras.ops.sum(p),
        )
    w0 = model.layers[0].kernel.numpy().copy()
    model.fit(
        x,
        y,
        epochs=2,
        batch_size=4,
        verbose=0,
        callbacks=[WeightDecayScheduler(lambda e, wd: [0.1, 0.5][e])],
    )
    decayed = (model.layers[0].kernel.numpy() / w0).tolist()

    with strategy.scope():
        keras.utils.set_random_seed(0)
        layers = [keras.layers.Dense(4, name=f"b{i}") for i in range(2)]
        model = keras.Sequential([keras.Input((3,)), *layers, keras.layers.Dense(2)])
        for layer in layers:
            layer.trainable = False
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    before = [layer.kernel.numpy().copy() for layer in layers]
    history = model.fit(
        np.random.default_rng(0).normal(size=(8, 3)).astype("float32"),
        np.ones((8, 2), "float32"),
        epochs=3,
        batch_size=4,
        verbose=0,
        callbacks=[GradualUnfreezing(2)],
    )
    moved = [
        bool(not np.array_equal(b, layer.kernel.numpy()))
        for b, layer in zip(before, layers, strict=True)
    ]
    return {
        "replicas": strategy.num_replicas_in_sync,
        "decayed": decayed,
        "unfrozen": history.history["unfrozen_layers"],
        "moved": moved,
    }


@pytest.mark.distributed
def test_callbacks_under_mirrored_strategy(two_cpu_devices):
    result = two_cpu_devices(_train_under_mirrored_strategy)
    assert result["replicas"] == 2
    # Two steps per epoch, w *= 1 - lr * wd each step.
    expected = (1 - 0.1 * 0.1) ** 2 * (1 - 0.1 * 0.5) ** 2
    np.testing.assert_allclose(result["decayed"], np.full((3, 2), expected), rtol=1e-6)
    # Epochs 0, 1: head only; epoch 2: the top backbone layer joins.
    assert result["unfrozen"] == [0, 0, 1]
    assert result["moved"] == [False, True]
