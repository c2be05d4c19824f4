"""End-to-end reference: TF-MOT's `prune_low_magnitude` on a `tf_keras` copy.

With a zero learning rate the weights never move, so both libraries must
compute their first masks from the same weights: the masks (and which weights
get masks at all) must be equal.
"""

import keras
import numpy as np
import pytest

from keras_stability import pruning
from keras_stability.pruning._tfmot import import_tfmot


def _keras3_model():
    return keras.Sequential(
        [
            keras.Input((6, 6, 4)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(3),
        ]
    )


def _tf_keras_model(tf_keras):
    return tf_keras.Sequential(
        [
            tf_keras.Input((6, 6, 4)),
            tf_keras.layers.Conv2D(4, 3, activation="relu"),
            tf_keras.layers.Flatten(),
            tf_keras.layers.Dense(8, activation="relu"),
            tf_keras.layers.BatchNormalization(),
            tf_keras.layers.Dense(3),
        ]
    )


@pytest.mark.parametrize(
    "sparsity, sparsity_m_by_n", [(0.5, None), (0.85, None), (0.5, (2, 4))]
)
def test_masks_equal_tfmot_prune_low_magnitude_on_tf_keras(sparsity, sparsity_m_by_n):
    tfmot = import_tfmot()
    import tf_keras

    keras.utils.set_random_seed(0)
    ours = _keras3_model()
    reference = _tf_keras_model(tf_keras)
    reference.set_weights(ours.get_weights())
    x = np.random.default_rng(0).normal(size=(8, 6, 6, 4)).astype("float32")
    y = np.zeros((8, 3), "float32")

    kwargs = {"sparsity_m_by_n": sparsity_m_by_n} if sparsity_m_by_n else {}
    reference = tfmot.sparsity.keras.prune_low_magnitude(
        reference,
        pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(
            sparsity, 0, frequency=1
        ),
        **kwargs,
    )
    reference.compile(optimizer=tf_keras.optimizers.SGD(0.0), loss="mse")
    reference.fit(
        x,
        y,
        batch_size=8,
        verbose=0,
        callbacks=[tfmot.sparsity.keras.UpdatePruningStep()],
    )
    reference_masks = [
        w.numpy() for w in reference.weights if w.name.split("/")[-1].startswith("mask")
    ]

    pruning.prune_low_magnitude(
        ours, pruning.ConstantSparsity(sparsity, 0, frequency=1), **kwargs
    )
    ours.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    ours.fit(x, y, batch_size=8, verbose=0)
    our_masks = [m.numpy() for m in pruning.find_pruner(ours).masks]

    assert len(reference_masks) == len(our_masks) == 3  # conv, dense, dense kernels
    for ref, got in zip(reference_masks, our_masks, strict=True):
        np.testing.assert_array_equal(got, ref)
    # And the pruned kernels agree too. (BatchNormalization statistics do
    # not: TF-MOT masks before the forward pass, we after the update.)
    stripped = tfmot.sparsity.keras.strip_pruning(reference)
    pruning.strip_pruning(ours)
    ref_kernels = [
        layer.kernel.numpy() for layer in stripped.layers if hasattr(layer, "kernel")
    ]
    our_kernels = [
        layer.kernel.numpy() for layer in ours.layers if hasattr(layer, "kernel")
    ]
    for ref, got in zip(ref_kernels, our_kernels, strict=True):
        np.testing.assert_array_equal(got, ref)


def test_a_tf_keras_model_gets_an_error_that_explains_the_import_order():
    # TF-MOT's guide imports it before anything touches `tf.keras`, which
    # then stays tf_keras: the model the guide builds is a legacy one.
    import tf_keras

    model = _tf_keras_model(tf_keras)
    schedule = pruning.ConstantSparsity(0.5, begin_step=0)
    with pytest.raises(ValueError) as caught:
        pruning.prune_low_magnitude(model, schedule)
    message = str(caught.value)
    assert message.startswith("Invalid value for argument `to_prune`")
    assert "tf_keras (legacy Keras 2)" in message
    assert "TF_USE_LEGACY_KERAS=1" in message
    assert "import keras_stability before tensorflow_model_optimization" in message
