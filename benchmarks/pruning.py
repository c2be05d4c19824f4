"""Pruning on scikit-learn digits: accuracy, compressed size, step overhead, shrink.

Run: python -m benchmarks.pruning

- MLP (64-256-128-10) and a small CNN (8x8x1 -> Conv 16 -> Conv 32 -> Dense)
  trained 15 epochs (batch 32) dense or with `prune_low_magnitude` and
  `PolynomialDecay(0 -> s)` over the first 70% of steps; test accuracy and the
  gzip size of the stripped `.keras` file against the dense one.
- Training-step overhead: seconds per epoch with and without pruning
  (MLP, 80%), alternated in one process, and TF-MOT on a `tf_keras` copy as
  reference.
- `shrink` of the dense MLP at 50% of units: parameters, `predict` latency
  ratio on CPU, accuracy before and after a 5-epoch fine-tune.
"""

import argparse
import gzip
import os
import sys
import tempfile
import time

import keras
import numpy as np

from benchmarks.common import alternate
from benchmarks.common import environment
from benchmarks.common import fmt
from benchmarks.common import summarize
from keras_stability import pruning
from keras_stability.datasets import load_dataset

EPOCHS = 15
BATCH = 32


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def mlp():
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def cnn():
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Reshape((8, 8, 1)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def compile_model(model):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def gzip_size(model):
    """gzip size of the `.keras` file of an uncompiled copy (no optimizer state)."""
    export = keras.models.clone_model(model)
    export.set_weights(model.get_weights())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.keras")
        export.save(path)
        with open(path, "rb") as f:
            return len(gzip.compress(f.read(), compresslevel=9))


def train(build, sparsity, data):
    (x, y), (xt, yt) = data
    keras.utils.set_random_seed(0)
    model = build()
    steps = EPOCHS * int(np.ceil(len(x) / BATCH))
    if sparsity > 0:
        schedule = pruning.PolynomialDecay(
            0.0, sparsity, begin_step=0, end_step=int(0.7 * steps), frequency=10
        )
        pruning.prune_low_magnitude(model, schedule)
    compile_model(model)
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, verbose=0)
    pruning.strip_pruning(model)
    acc = model.evaluate(xt, yt, verbose=0)[1]
    return model, acc


def predict_time(model, x, repeats=30):
    model.predict(x, batch_size=len(x), verbose=0)
    start = time.perf_counter()
    for _ in range(repeats):
        model.predict_on_batch(x)
    return (time.perf_counter() - start) / repeats


def main(argv=None):
    # No options: a parser so that `--help` (or a typo) does not start the run.
    argparse.ArgumentParser(
        prog="python -m benchmarks.pruning", description=__doc__.splitlines()[0]
    ).parse_args(argv)
    data = load_dataset("digits", seed=0)
    (x, y), (xt, yt) = data
    lines = [
        "## Pruning on digits (`keras_stability.pruning`)",
        "",
        f"Machine: {environment()}.",
        "",
        f"{EPOCHS} epochs, batch {BATCH}, Adam 1e-3, PolynomialDecay(0 -> s) over "
        "the first 70% of steps (frequency 10), stripped before evaluation; "
        "single run, seed 0; digits split 80/20. Size: gzip -9 of the `.keras` "
        "file of an uncompiled copy (weights only, no optimizer state).",
        "",
        "| model | sparsity | test accuracy | measured sparsity | gzip .keras (KiB) | vs dense |",
        "|---|---|---|---|---|---|",
    ]
    models = {}
    for name, build in (("MLP", mlp), ("CNN", cnn)):
        dense_size = None
        for s in (0.0, 0.5, 0.8, 0.9):
            log(f"{name} sparsity {s}")
            model, acc = train(build, s, data)
            size = gzip_size(model)
            dense_size = dense_size or size
            measured = pruning.sparsity_report(model)["total"]
            lines.append(
                f"| {name} | {s:.0%} | {acc:.3f} | {measured:.3f} | {size / 1024:.1f} | "
                f"{dense_size / size:.2f}x smaller |"
            )
            models[(name, s)] = model

    # Training-step overhead (MLP, 80%): one epoch per call, alternated.
    log("overhead")
    keras.utils.set_random_seed(0)
    plain = compile_model(mlp())
    pruned = mlp()
    pruning.prune_low_magnitude(
        pruned,
        pruning.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=1000, frequency=10),
    )
    compile_model(pruned)
    for m in (plain, pruned):
        m.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    runners = {
        "unpruned": lambda: plain.fit(x, y, batch_size=BATCH, epochs=1, verbose=0),
        "pruned": lambda: pruned.fit(x, y, batch_size=BATCH, epochs=1, verbose=0),
    }
    times = alternate(runners, repeats=5)
    try:
        times.update(tfmot_times(x, y))
    except Exception as e:  # reference only; report why it is missing
        log(f"TF-MOT reference failed: {e!r}")
    base = summarize(times["unpruned"])["median"]
    lines += [
        "",
        f"Training time per epoch ({int(np.ceil(len(x) / BATCH))} steps, MLP, pruning to 80%, "
        "every 10 steps), 5 alternated repeats:",
        "",
        "| variant | seconds per epoch | vs unpruned |",
        "|---|---|---|",
    ]
    for name, values in times.items():
        stat = summarize(values)
        lines.append(f"| {name} | {fmt(stat)} | {stat['median'] / base:.2f}x |")

    # Shrink the dense MLP at 50% of units.
    log("shrink")
    dense = models[("MLP", 0.0)]
    small = pruning.shrink(dense, 0.5)
    compile_model(small)
    acc_before = small.evaluate(xt, yt, verbose=0)[1]
    small.fit(x, y, batch_size=BATCH, epochs=5, verbose=0)
    acc_after = small.evaluate(xt, yt, verbose=0)[1]
    xb = np.tile(xt, (8, 1))
    t_dense = summarize([predict_time(dense, xb) for _ in range(5)])
    t_small = summarize([predict_time(small, xb) for _ in range(5)])
    dense_acc = dense.evaluate(xt, yt, verbose=0)[1]
    lines += [
        "",
        f"`shrink(mlp, fraction=0.5)` of the dense MLP (predict on {len(xb)} rows, "
        "`predict_on_batch`, 5 x 30 calls):",
        "",
        "| model | parameters | predict seconds | test accuracy |",
        "|---|---|---|---|",
        f"| dense | {dense.count_params()} | {fmt(t_dense, 5)} | {dense_acc:.3f} |",
        f"| shrunk, no fine-tune | {small.count_params()} | {fmt(t_small, 5)} | {acc_before:.3f} |",
        f"| shrunk + 5 epochs | {small.count_params()} | | {acc_after:.3f} |",
        "",
        f"Predict latency ratio shrunk/dense: {t_small['median'] / t_dense['median']:.2f}.",
        "",
        "Command: `python -m benchmarks.pruning`",
    ]
    print("\n".join(lines))


def tfmot_times(x, y):
    """TF-MOT's prune_low_magnitude on a tf_keras copy of the MLP, for reference."""
    from keras_stability.pruning._tfmot import import_tfmot

    tfmot = import_tfmot()
    import tf_keras

    model = tf_keras.Sequential(
        [
            tf_keras.Input((64,)),
            tf_keras.layers.Dense(256, activation="relu"),
            tf_keras.layers.Dense(128, activation="relu"),
            tf_keras.layers.Dense(10),
        ]
    )
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.8, 0, 1000, frequency=10)
    model = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    model.compile(
        optimizer=tf_keras.optimizers.Adam(1e-3),
        loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    cb = [tfmot.sparsity.keras.UpdatePruningStep()]
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=cb)
    return alternate(
        {
            "TF-MOT on tf_keras (reference)": lambda: model.fit(
                x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=cb
            )
        },
        repeats=5,
    )


if __name__ == "__main__":
    main()
