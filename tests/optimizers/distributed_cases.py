"""Module-level functions run by `run_in_subprocess` with 2 logical CPUs."""

import numpy as np

SCENARIO_GRADS = (-10.0, -0.5)


def make_optimizer(kind, keras_global_clipnorm=False):
    import keras

    from keras_stability import clipping
    from keras_stability.optimizers import GuardedOptimizer

    if keras_global_clipnorm:
        return keras.optimizers.SGD(1.0, global_clipnorm=1.0)
    policies = {
        "global_norm": clipping.GlobalNorm(1.0),
        "autoclip": clipping.AutoClip(percentile=10.0, history_size=32),
        "zclip": clipping.ZClip(warmup_steps=25, max_norm=1.0),
        "agc": clipping.AGC(
            clip_factor=1000.0,
            epsilon=1e-3,
            exclude_vectors=False,
            exclude_final_layer=False,
        ),
        "none": None,
    }
    return GuardedOptimizer(keras.optimizers.SGD(1.0), clipping=policies[kind])


def issue_scenario(kind, n_replicas, nan_replica=None, keras_global_clipnorm=False):
    """One weight at 0, SGD(1.0); replica gradients -10 and -0.5.

    With one replica the single device gets their sum, -10.5. Returns the
    weight after one step and the optimizer statistics.
    """
    import keras
    import tensorflow as tf

    if n_replicas == 1:
        strategy = tf.distribute.get_strategy()
    else:
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        weight = keras.Variable(np.zeros((1,), "float32"), name="w")
        optimizer = make_optimizer(kind, keras_global_clipnorm)
        optimizer.build([weight])
    if kind == "autoclip":
        # An equivalent threshold: a history of norms equal to 1.
        optimizer.clipping.history.assign(np.ones(32, "float32"))
        optimizer.clipping.count.assign(20)

    @tf.function
    def step():
        def replica_fn():
            if n_replicas == 1:
                grad = tf.constant([sum(SCENARIO_GRADS)])
                if nan_replica is not None:
                    grad = tf.constant([float("nan")])
            else:
                rid = tf.distribute.get_replica_context().replica_id_in_sync_group
                grad = tf.where(tf.equal(rid, 0), SCENARIO_GRADS[0], SCENARIO_GRADS[1])
                if nan_replica is not None:
                    grad = tf.where(tf.equal(rid, nan_replica), float("nan"), grad)
                grad = tf.reshape(grad, (1,))
            optimizer.apply_gradients([(grad, weight)])

        strategy.run(replica_fn)

    step()
    stats = optimizer.statistics() if hasattr(optimizer, "statistics") else {}
    return float(weight.numpy()[0]), stats, int(optimizer.iterations.numpy())


def fit_weights(n_replicas, policy="global_norm", steps=6, jit_compile=False):
    """Fits a tiny MLP with GuardedOptimizer(Adam); returns weights and stats."""
    import keras
    import tensorflow as tf

    from keras_stability import clipping
    from keras_stability.optimizers import GuardedOptimizer

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps * 8, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1)) * 20).astype("float32")
    if n_replicas == 1:
        strategy = tf.distribute.get_strategy()
    else:
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(4, activation="tanh"),
                keras.layers.Dense(1),
            ]
        )
        pol = {
            "global_norm": clipping.GlobalNorm(0.5),
            "zclip": clipping.ZClip(warmup_steps=2, z_threshold=0.5),
        }[policy]
        optimizer = GuardedOptimizer(keras.optimizers.Adam(0.05), clipping=pol)
        model.compile(optimizer, "mse", jit_compile=jit_compile)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return [w.numpy() for w in model.weights], optimizer.statistics()


def all_issue_scenarios():
    """Every policy on 1 and 2 replicas, Keras' baseline and the NaN cases."""
    results = {}
    for kind in ("global_norm", "autoclip", "zclip", "agc"):
        for n in (1, 2):
            results[(kind, n)] = issue_scenario(kind, n)
    results["keras_global_clipnorm"] = issue_scenario(
        "none", 2, keras_global_clipnorm=True
    )
    for nan_replica in (0, 1):
        results[("nan", nan_replica)] = issue_scenario(
            "global_norm", 2, nan_replica=nan_replica
        )
    return results


def fit_one_and_two_replicas():
    return fit_weights(1), fit_weights(2)


def observer_and_callback_on_two_replicas():
    """A pruning-like observer and the AdaptiveClipping callback under Mirrored."""
    import keras
    import tensorflow as tf

    from keras_stability import clipping
    from keras_stability.callbacks import AdaptiveClipping
    from keras_stability.optimizers import GradientObserver
    from keras_stability.optimizers import GuardedOptimizer

    class MaskObserver(GradientObserver):
        def build(self, optimizer, variables):
            self.kernel = variables[0]
            mask = np.ones(self.kernel.shape, "float32")
            mask[0, :] = 0.0
            self.mask = optimizer.add_variable(
                self.kernel.shape,
                initializer=keras.initializers.Constant(mask),
                name="mask",
            )
            self.seen_norm = optimizer.add_variable((), name="seen_norm")

        def observe(self, grads, variables, stats):
            self.seen_norm.assign(stats["global_norm"])

        def after_apply(self, variables, skipped):
            self.kernel.assign(self.kernel * self.mask)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = (10 * rng.normal(size=(32, 1))).astype("float32")
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(4), keras.layers.Dense(1)]
        )
        observer = MaskObserver()
        optimizer = GuardedOptimizer(
            keras.optimizers.Adam(0.1),
            clipping=clipping.GlobalNorm(1.0),
            observers=[observer],
        )
        model.compile(optimizer, "mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    kernel = model.layers[0].kernel
    copies = [np.asarray(c) for c in strategy.experimental_local_results(kernel.value)]
    result = {
        "kernel_copies": copies,
        "seen_norm": float(observer.seen_norm.numpy()),
        "grad_norm": float(optimizer.grad_norm.numpy()),
    }

    with strategy.scope():
        keras.utils.set_random_seed(0)
        plain = keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(4), keras.layers.Dense(1)]
        )
        plain.compile(keras.optimizers.Adam(0.1), "mse")
    history = plain.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        verbose=0,
        callbacks=[AdaptiveClipping(clipping.GlobalNorm(0.5), verbose=0)],
    )
    result["history"] = history.history
    result["callback_stats"] = plain.optimizer.statistics()
    return result


def fit_cases(tmp_dir):
    return {
        "one_two": fit_one_and_two_replicas(),
        "observer_callback": observer_and_callback_on_two_replicas(),
        "mixed": mixed_precision_two_replicas(tmp_dir),
    }


def mixed_precision_two_replicas(tmp_dir):
    """mixed_float16 + MirroredStrategy: LossScaleOptimizer(GuardedOptimizer).

    A NaN in replica 1's shard only: LossScaleOptimizer looks at replica 0
    and lets the step through; the guard sees the all-reduced NaN and skips.
    Then saves and reloads the model (in this process).
    """
    import os

    import keras
    import tensorflow as tf

    from keras_stability import clipping
    from keras_stability.optimizers import GuardedOptimizer

    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(16, 6)).astype("float32")
        y = rng.normal(size=(16, 1)).astype("float32")
        x[12] = np.nan  # batch 2 (rows 8..15), second replica's half
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = keras.Sequential(
                [keras.Input((6,)), keras.layers.Dense(4), keras.layers.Dense(1)]
            )
            guarded = GuardedOptimizer(
                keras.optimizers.SGD(0.01), clipping=clipping.GlobalNorm(1.0)
            )
            model.compile(guarded, "mse")
        model.fit(x[:8], y[:8], batch_size=8, epochs=1, shuffle=False, verbose=0)
        before = [w.numpy() for w in model.weights]
        model.fit(x[8:], y[8:], batch_size=8, epochs=1, shuffle=False, verbose=0)
        after = [w.numpy() for w in model.weights]
        path = os.path.join(tmp_dir, "mixed.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
        return {
            "outer": type(model.optimizer).__name__,
            "stats": guarded.statistics(),
            "unchanged": all(
                np.array_equal(a, b) for a, b in zip(before, after, strict=True)
            ),
            "loaded_inner": type(loaded.optimizer.inner_optimizer).__name__,
            "loaded_stats": loaded.optimizer.inner_optimizer.statistics(),
        }
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def _StepLossRecord(guard):
    import keras

    class Record(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seen = []

        def on_train_batch_end(self, batch, logs=None):
            self.seen.append(
                (float(guard.step_loss.numpy()), int(guard.loss_seen.numpy()))
            )

    return Record()


def step_loss_one_and_two_replicas():
    """The guard's `step_loss` per step with 1 and 2 replicas (SGD(0): the
    weights never move, so each step's loss is the batch's loss at the
    initial weights) and the full-batch losses it must equal."""
    import keras
    import tensorflow as tf

    from keras_stability.optimizers import GuardedOptimizer

    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 3)).astype("float32")
    y = rng.normal(size=(24, 1)).astype("float32")
    results = {}
    for n in (1, 2):
        if n == 1:
            strategy = tf.distribute.get_strategy()
        else:
            strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
            model.layers[0].kernel.assign(np.ones((3, 1), "float32"))
            guard = GuardedOptimizer(keras.optimizers.SGD(0.0))
            model.compile(guard, "mse")
        record = _StepLossRecord(guard)
        model.fit(
            x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[record]
        )
        results[n] = record.seen
    pred = x @ np.ones((3, 1), "float32")
    results["expected"] = [
        float(np.mean((pred[i : i + 8] - y[i : i + 8]) ** 2)) for i in (0, 8, 16)
    ]
    return results
