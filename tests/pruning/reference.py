"""TF-MOT as a test-only reference: its mask maths run on plain tf.Variables."""

import numpy as np


def tfmot_mask(weights, sparsity, block_size=(1, 1), pooling="AVG", m_by_n=None):
    """The mask TF-MOT's `pruning_impl.Pruning` computes for `weights`."""
    import tensorflow as tf

    from keras_stability.pruning._tfmot import import_tfmot

    tfmot = import_tfmot()
    from tensorflow_model_optimization.python.core.sparsity.keras import pruning_impl

    weight = tf.Variable(np.asarray(weights, "float32"))
    mask = tf.Variable(tf.ones_like(weight))
    threshold = tf.Variable(0.0)
    schedule = tfmot.sparsity.keras.ConstantSparsity(
        sparsity, begin_step=0, frequency=1
    )
    pruning = pruning_impl.Pruning(
        training_step_fn=lambda: tf.constant(1, tf.int64),
        pruning_vars=[(weight, mask, threshold)],
        pruning_schedule=schedule,
        block_size=block_size,
        block_pooling_type=pooling,
        sparsity_m_by_n=m_by_n,
    )
    pruning.conditional_mask_update()
    return mask.numpy()
