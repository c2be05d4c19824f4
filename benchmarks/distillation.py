"""Distillation on scikit-learn digits: accuracy and cached-teacher epoch time.

Part 1: a teacher MLP, the same small student trained from scratch, and the
student distilled from the teacher (`keras_stability.Distiller`, alpha=0.1,
T=4, cached teacher outputs), over several seeds; test accuracy as mean and
spread. Part 2: steady-state epoch time of distillation with a teacher about
10x the student's size, teacher outputs cached against recomputed each step.

Run: `python -m benchmarks.distillation` (about two minutes on 2 cores).
"""

import argparse
import statistics
import time

import numpy as np

from benchmarks.common import environment
from benchmarks.common import fmt
from benchmarks.common import summarize

STUDENT_UNITS = (32,)
TEACHER_UNITS = (128, 128)
TIMING_STUDENT_UNITS = (512, 512)
TIMING_TEACHER_UNITS = (2048, 1536)


def mlp(units, n_features, n_classes, name):
    import keras

    inputs = keras.Input((n_features,))
    h = inputs
    for i, u in enumerate(units):
        h = keras.layers.Dense(u, activation="relu", name=f"{name}_dense_{i}")(h)
    return keras.Model(
        inputs, keras.layers.Dense(n_classes, name=f"{name}_logits")(h), name=name
    )


def accuracy(model, x, y):
    return float(
        np.mean(np.argmax(model.predict(x, verbose=0, batch_size=512), -1) == y)
    )


def run_seed(seed, data, epochs, alpha, temperature):
    import keras

    from keras_stability import Distiller

    (x, y), (xt, yt) = data
    n_features, n_classes = x.shape[1], int(y.max()) + 1
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    keras.utils.set_random_seed(seed)
    teacher = mlp(TEACHER_UNITS, n_features, n_classes, "teacher")
    teacher.compile(optimizer=keras.optimizers.Adam(3e-3), loss=ce)
    teacher.fit(x, y, epochs=epochs, batch_size=64, verbose=0)

    keras.utils.set_random_seed(seed + 1000)
    scratch = mlp(STUDENT_UNITS, n_features, n_classes, "student")
    keras.utils.set_random_seed(seed + 1000)
    student = mlp(STUDENT_UNITS, n_features, n_classes, "student")  # same init
    scratch.compile(optimizer=keras.optimizers.Adam(3e-3), loss=ce)
    keras.utils.set_random_seed(seed + 2000)
    scratch.fit(x, y, epochs=epochs, batch_size=64, verbose=0)

    distiller = Distiller(student, teacher)
    distiller.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        student_loss_fn=ce,
        distillation_loss_fn=keras.losses.KLDivergence(),
        alpha=alpha,
        temperature=temperature,
    )
    keras.utils.set_random_seed(seed + 2000)
    distiller.fit(
        x, y, epochs=epochs, batch_size=64, verbose=0, cache_teacher_outputs=True
    )
    return {
        "teacher": accuracy(teacher, xt, yt),
        "scratch": accuracy(scratch, xt, yt),
        "distilled": accuracy(distiller.student, xt, yt),
    }


class EpochTimer:
    """Keras callback recording wall time per epoch."""

    def __new__(cls):
        import keras

        class _Timer(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.times = []

            def on_epoch_begin(self, epoch, logs=None):
                self._start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                self.times.append(time.perf_counter() - self._start)

        return _Timer()


def n_params(model):
    return int(sum(np.prod(v.shape) for v in model.weights))


def timing(data, epochs, rounds):
    import keras

    from keras_stability import Distiller

    (x, y), _ = data
    n_features, n_classes = x.shape[1], int(y.max()) + 1
    keras.utils.set_random_seed(0)
    teacher = mlp(TIMING_TEACHER_UNITS, n_features, n_classes, "teacher")
    student = mlp(TIMING_STUDENT_UNITS, n_features, n_classes, "student")
    distiller = Distiller(student, teacher)
    distiller.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        student_loss_fn=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    start = time.perf_counter()
    packed = distiller.cache_teacher_outputs(x)
    cache_seconds = time.perf_counter() - start
    inputs = {"uncached": x, "cached": packed}
    times = {name: [] for name in inputs}
    for _ in range(rounds):
        for name, data_x in inputs.items():
            timer = EpochTimer()
            distiller.fit(
                data_x, y, epochs=epochs, batch_size=64, verbose=0, callbacks=[timer]
            )
            times[name].extend(timer.times[1:])  # first epoch holds tracing
    return {
        "teacher_params": n_params(teacher),
        "student_params": n_params(student),
        "cache_seconds": cache_seconds,
        "times": times,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--timing-epochs", type=int, default=4)
    parser.add_argument("--timing-rounds", type=int, default=3)
    args = parser.parse_args(argv)

    from keras_stability.datasets import load_dataset

    data = load_dataset("digits", seed=0)
    (x, _), (xt, _) = data
    start = time.perf_counter()
    results = [
        run_seed(seed, data, args.epochs, args.alpha, args.temperature)
        for seed in range(args.seeds)
    ]
    t = timing(data, args.timing_epochs, args.timing_rounds)
    total = time.perf_counter() - start

    def mean_sd(key):
        values = [r[key] for r in results]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.mean(values):.2f}% ± {100 * sd:.2f} (min {100 * min(values):.2f}, max {100 * max(values):.2f})"

    wins = sum(r["distilled"] > r["scratch"] for r in results)
    ties = sum(r["distilled"] == r["scratch"] for r in results)
    cached = summarize(t["times"]["cached"])
    uncached = summarize(t["times"]["uncached"])
    lines = [
        "## Distillation on digits (`keras_stability.Distiller`)",
        "",
        f"Machine: {environment()}",
        "",
        f"Command: `python -m benchmarks.distillation --seeds {args.seeds} --epochs {args.epochs}`"
        f" (total {total:.0f} s)",
        "",
        f"Digits, {len(x)} train / {len(xt)} test. Teacher MLP {TEACHER_UNITS}, student MLP "
        f"{STUDENT_UNITS}; {args.epochs} epochs each, Adam(3e-3), batch 64; distilled with "
        f"alpha={args.alpha}, T={args.temperature}, T^2 scaling, cached teacher outputs. "
        f"Scratch and distilled students share their initial weights per seed. "
        f"Test accuracy over {args.seeds} seeds (mean ± sd):",
        "",
        "| model | test accuracy |",
        "|---|---|",
        f"| teacher | {mean_sd('teacher')} |",
        f"| student from scratch | {mean_sd('scratch')} |",
        f"| student distilled | {mean_sd('distilled')} |",
        "",
        f"Distilled beat scratch on {wins} of {args.seeds} seeds ({ties} ties). Per seed "
        "(teacher / scratch / distilled): "
        + "; ".join(
            f"{100 * r['teacher']:.1f}/{100 * r['scratch']:.1f}/{100 * r['distilled']:.1f}"
            for r in results
        ),
        "",
        f"Epoch time, teacher MLP {TIMING_TEACHER_UNITS} ({t['teacher_params']:,} weights) and "
        f"student MLP {TIMING_STUDENT_UNITS} ({t['student_params']:,} weights, "
        f"{t['teacher_params'] / t['student_params']:.1f}x smaller), batch 64, "
        f"{len(x)} samples; median (min..max) over {args.timing_rounds} alternated fits x "
        f"{args.timing_epochs - 1} epochs after the first:",
        "",
        "| teacher outputs | epoch time |",
        "|---|---|",
        f"| recomputed every step | {fmt(uncached, 3, ' s')} |",
        f"| cached (`cache_teacher_outputs=True`) | {fmt(cached, 3, ' s')} |",
        "",
        f"Cached epochs take {cached['median'] / uncached['median']:.2f}x the uncached "
        f"time; building the cache (one teacher pass) took {t['cache_seconds']:.2f} s.",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
