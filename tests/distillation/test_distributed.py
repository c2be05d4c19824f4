"""MirroredStrategy on 2 logical CPU devices gives the single-device result."""

import numpy as np
import pytest


def one_epoch_weights(cache_teacher_outputs):
    """Runs in a subprocess with 2 logical CPUs: one epoch, single vs mirrored."""
    import tensorflow as tf

    from keras_stability.distillation import FeatureDistillation
    from tests.distillation.test_distiller import make_data
    from tests.distillation.test_distiller import make_distiller

    x, y = make_data(64)
    w = np.linspace(0.5, 1.5, 64).astype("float32")
    devices = ["/cpu:0", "/cpu:1"]
    assert len(tf.config.list_logical_devices("CPU")) == 2
    out = {}
    for name, strategy in (
        ("single", tf.distribute.OneDeviceStrategy(devices[0])),
        ("mirrored", tf.distribute.MirroredStrategy(devices)),
    ):
        with strategy.scope():
            distiller = make_distiller(
                feature_distillation=[
                    FeatureDistillation("teacher_hidden", "student_hidden", weight=0.5)
                ]
            )
        history = distiller.fit(
            x,
            y,
            sample_weight=w,
            epochs=1,
            batch_size=32,
            shuffle=False,
            verbose=0,
            cache_teacher_outputs=cache_teacher_outputs,
        )
        out[name] = {
            "replicas": strategy.num_replicas_in_sync,
            "weights": [np.asarray(v.numpy()) for v in distiller.trainable_variables],
            "history": history.history,
        }
    return out


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("cache", [False, True])
def test_mirrored_strategy_matches_single_device(two_cpu_devices, cache):
    out = two_cpu_devices(one_epoch_weights, cache)
    single, mirrored = out["single"], out["mirrored"]
    assert mirrored["replicas"] == 2 and single["replicas"] == 1
    assert (
        len(single["weights"]) == len(mirrored["weights"]) == 5
    )  # student 4 + projection
    for a, b in zip(single["weights"], mirrored["weights"], strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    for key in ("loss", "student_loss", "distillation_loss", "feature_loss"):
        np.testing.assert_allclose(
            mirrored["history"][key], single["history"][key], rtol=1e-5, err_msg=key
        )
