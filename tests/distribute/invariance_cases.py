"""Training cases for the replica-invariance and XLA suites.

`train_cases(names, jit_compile)` runs in a child process (1 or 2 logical CPU
devices) and trains the Keras example, configured by each case, on the same
global batches. With 2 devices it trains under `MirroredStrategy`, so each
replica sees half of every global batch.
"""

import numpy as np

GLOBAL_BATCH = 16
EPOCHS = 3


def _data(case):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 10)).astype("float32")
    y = (np.arange(64) % 10).astype("int32")
    if case in ("nonfinite_replica0", "accumulation"):
        x[20, 3] = np.nan  # batch 1, first half: replica 0's shard
    elif case == "nonfinite_replica1":
        x[28, 3] = np.inf  # batch 1, second half: replica 1's shard
    elif case == "spike":
        x[44:48] *= 300.0  # batch 2 of every epoch, replica 1's shard only
    return x, y


def _example(n_classes=10, width=(32, 16)):
    import keras

    return keras.Sequential(
        [keras.Input((10,))]
        + [keras.layers.Dense(w, activation="relu") for w in width]
        + [keras.layers.Dense(n_classes)]
    )


def _guarded(gradient_accumulation_steps=None, **kwargs):
    import keras

    from keras_stability.optimizers import GuardedOptimizer

    inner = keras.optimizers.SGD(
        0.05, momentum=0.9, gradient_accumulation_steps=gradient_accumulation_steps
    )
    return GuardedOptimizer(inner, **kwargs)


def _build(case):
    """Returns (model, fit_kwargs, stats_fn) for one case, inside the scope."""
    import keras

    from keras_stability import clipping
    from keras_stability import pruning
    from keras_stability.distillation import Distiller

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    policies = {
        "global_norm": lambda: clipping.GlobalNorm(0.5),
        "autoclip": lambda: clipping.AutoClip(percentile=50.0, history_size=16),
        "zclip": lambda: clipping.ZClip(alpha=0.5, z_threshold=0.3, warmup_steps=2),
        "agc": lambda: clipping.AGC(clip_factor=0.01),
    }
    model = _example()
    if case in policies:
        optimizer = _guarded(clipping=policies[case]())
    elif case in ("nonfinite_replica0", "nonfinite_replica1"):
        optimizer = _guarded()
    elif case == "accumulation":
        # Clipped on the mean of 2 micro-batches (global batches); the NaN
        # micro-batch of each epoch is dropped, not accumulated.
        optimizer = _guarded(
            gradient_accumulation_steps=2, clipping=clipping.GlobalNorm(0.25)
        )
    elif case == "spike":
        optimizer = _guarded(
            skip_spikes=clipping.SpikeSkipping(window=8, z_threshold=3.0, min_samples=3)
        )
    elif case == "pruning":
        optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
        pruning.prune_low_magnitude(
            model, pruning.ConstantSparsity(0.5, begin_step=0, frequency=2)
        )
    elif case == "pruning_guarded":
        optimizer = _guarded(clipping=clipping.ZClip(warmup_steps=3))
        pruning.prune_low_magnitude(
            model,
            pruning.PolynomialDecay(0.0, 0.75, begin_step=0, end_step=8, frequency=2),
        )
    elif case == "detector":
        # A learning rate that blows up: the detector rolls back and lowers it
        # (SGD(5) no longer does: a few early spikes are events, not a rollback).
        optimizer = keras.optimizers.SGD(20.0)
        from keras_stability.callbacks import GradientExplosionDetector

        detector = GradientExplosionDetector(
            action="rollback",
            snapshot_freq=2,
            lr_factor=0.1,
            skip_batches=1,
            min_samples=3,
            window=8,
            verbose=0,
        )
        model.compile(optimizer=optimizer, loss=loss)
        return (
            model,
            {"callbacks": [detector]},
            lambda: {
                "rollbacks": detector.rollbacks,
                "learning_rate": float(model.optimizer.learning_rate.numpy()),
            },
        )
    elif case == "monitor":
        from keras_stability.callbacks import GradientMonitor

        monitor = GradientMonitor(check_freq=2, verbose=0)
        model.compile(optimizer=_guarded(), loss=loss)
        return (
            model,
            {"callbacks": [monitor]},
            lambda: {
                "layer_grad_norms": [
                    v[-1] for v in monitor.history["grad_norm"].values()
                ],
                "update_ratios": [
                    v[-1] for v in monitor.history["update_ratio"].values()
                ],
                "raw_loss": monitor.raw_losses[-1],
            },
        )
    elif case == "distiller":
        keras.utils.set_random_seed(1)
        teacher = _example(width=(64, 64))
        student = _example(width=(8,))
        model = Distiller(student=student, teacher=teacher)
        model.compile(
            optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
            metrics=["accuracy"],
            student_loss_fn=loss,
            distillation_loss_fn=keras.losses.KLDivergence(),
            alpha=0.3,
            temperature=2.0,
        )
        return model, {}, lambda: {}
    else:
        raise ValueError(f"unknown case {case!r}")
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])

    def stats():
        opt = model.optimizer
        return opt.statistics() if hasattr(opt, "statistics") else {}

    return model, {}, stats


CASES = (
    "global_norm",
    "autoclip",
    "zclip",
    "agc",
    "nonfinite_replica0",
    "nonfinite_replica1",
    "accumulation",
    "spike",
    "pruning",
    "pruning_guarded",
    "detector",
    "monitor",
    "distiller",
)


def train_cases(names=CASES, jit_compile=False):
    import keras
    import tensorflow as tf

    devices = tf.config.list_logical_devices("CPU")
    strategy = (
        tf.distribute.MirroredStrategy()
        if len(devices) > 1
        else tf.distribute.get_strategy()
    )
    results = {}
    for case in names:
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model, fit_kwargs, stats = _build(case)
        if jit_compile:
            model.jit_compile = True
            model.make_train_function(force=True)
        x, y = _data(case)
        history = model.fit(
            x,
            y,
            batch_size=GLOBAL_BATCH,
            epochs=EPOCHS,
            shuffle=False,
            verbose=0,
            **fit_kwargs,
        )
        target = model.student if case == "distiller" else model
        results[case] = {
            "replicas": strategy.num_replicas_in_sync,
            "weights": [np.asarray(w) for w in target.get_weights()],
            "loss": history.history["loss"],
            "stats": stats(),
        }
    return results
