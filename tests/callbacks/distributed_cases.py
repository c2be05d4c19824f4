"""Module-level functions run by `run_in_subprocess` with 2 logical CPUs."""

import warnings

import numpy as np

_STRATEGY = None


def _replica_values(strategy, variable):
    import tensorflow as tf

    value = variable.value if hasattr(variable, "value") else variable
    if strategy is None or not isinstance(value, tf.distribute.DistributedValues):
        return [np.asarray(variable)]
    return [np.asarray(v) for v in strategy.experimental_local_results(value)]


def gradient_health_run(mirrored, case):
    """Runs one scenario on 1 device (`mirrored=False`) or 2 replicas.

    Returns a dict of decisions and weights; with 2 replicas also whether
    every variable is identical on both.
    """
    import contextlib

    import keras
    import tensorflow as tf

    from keras_stability.callbacks import GradientExplosionDetector
    from keras_stability.callbacks import GradientMonitor
    from keras_stability.datasets import make_classification

    global _STRATEGY
    if mirrored and _STRATEGY is None:
        # One strategy per process: several MirroredStrategy objects in one
        # process can mix up their collective instances.
        _STRATEGY = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    strategy = _STRATEGY if mirrored else None
    scope = strategy.scope() if strategy else contextlib.nullcontext()
    x, y = make_classification(n_samples=256, seed=0)
    keras.utils.set_random_seed(0)
    with scope:
        if case == "vanishing":
            model = keras.Sequential(
                [keras.Input((10,))]
                + [keras.layers.Dense(32, activation="sigmoid") for _ in range(19)]
                + [keras.layers.Dense(10)]
            )
            lr = 0.01
        else:
            model = keras.Sequential(
                [keras.Input((10,))]
                + [keras.layers.Dense(32, activation="relu") for _ in range(6)]
                + [keras.layers.Dense(10)]
            )
            lr = 10.0 if case == "rollback" else 0.05
        model.compile(
            keras.optimizers.SGD(lr),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    if case in ("nan_shard", "excluded"):
        x = x.copy()
        x[75] = np.nan  # batch 4 (size 16), second half: replica 1's shard
    result = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if case == "vanishing":
            monitor = GradientMonitor(verbose=0)
            model.fit(x, y, batch_size=64, epochs=2, verbose=0, callbacks=[monitor])
            result["vanishing"] = [
                monitor.layer_names.index(n)
                for n in monitor.unhealthy_layers("vanishing")
            ]
            result["norms"] = [
                monitor.history["grad_norm"][n][-1] for n in monitor.layer_names
            ]
        else:
            exclude_path = None
            if case == "excluded":  # the NaN batch listed, as a resumed run's
                import json
                import os
                import tempfile

                from keras_stability.callbacks.exclude_batches import FORMAT

                exclude_path = os.path.join(tempfile.mkdtemp(), "exclude.json")
                with open(exclude_path, "w") as f:
                    json.dump({"format": FORMAT, "batches": [[0, 4]]}, f)
            detector = GradientExplosionDetector(
                snapshot_freq=5,
                lr_factor=0.05,
                skip_batches=2,
                verbose=0,
                exclude_batches_path=exclude_path,
            )
            model.fit(
                x,
                y,
                batch_size=16,
                epochs=1,
                shuffle=False,
                verbose=0,
                callbacks=[detector],
            )
            result["rollbacks"] = detector.rollbacks
            result["skipped"] = detector.skipped_batches
            result["excluded"] = detector.excluded_batches
            result["steps_applied"] = int(model.optimizer.iterations.numpy())
            result["events"] = [(e["step"], e["kind"]) for e in detector.events]
    result["weights"] = [np.asarray(w) for w in model.get_weights()]
    per_replica = [_replica_values(strategy, v) for v in model.weights]
    result["replicas_identical"] = all(
        all(np.array_equal(vals[0], other) for other in vals[1:])
        for vals in per_replica
    )
    result["n_replicas"] = max(len(v) for v in per_replica)
    result["finite"] = all(np.all(np.isfinite(w)) for w in result["weights"])
    return result


def compare_one_and_two_replicas(case):
    one = gradient_health_run(False, case)
    two = gradient_health_run(True, case)
    return one, two


def compare_all_cases(cases=("nan_shard", "excluded", "rollback", "vanishing")):
    """All cases in one child process (one TensorFlow start-up)."""
    return {case: compare_one_and_two_replicas(case) for case in cases}
