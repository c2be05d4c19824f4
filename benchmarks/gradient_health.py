"""Gradient health: overhead of the monitor + detector, and rescue rate.

`python -m benchmarks.gradient_health [--repeats N] [--seeds N]`

1. Overhead: epoch time of the Keras example (batch 32) with plain `fit`,
   with `GradientMonitor(every_n_steps=1)` + `GradientExplosionDetector`, and
   with the monitor every 10 steps + detector. Variants alternate in one
   process; the first epoch of each fit (tracing) is dropped.
2. Rescue rate: a small transformer language model at a learning rate where
   plain `fit` diverges, several seeds: diverged runs and final loss with
   plain fit, with Keras `global_clipnorm=1.0`, and with the detector.
"""

import argparse
import math
import time
import warnings

import numpy as np

from benchmarks.common import environment
from benchmarks.common import fmt
from benchmarks.common import summarize


class _EpochTimes:
    def __init__(self):
        import keras

        class Timer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.times = []

            def on_epoch_begin(self, epoch, logs=None):
                self._start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                self.times.append(time.perf_counter() - self._start)

        self.cls = Timer


def overhead(repeats, workload, epochs=4):
    import keras

    from keras_stability.callbacks import GradientExplosionDetector
    from keras_stability.callbacks import GradientMonitor
    from keras_stability.cli.demo import build_example_model
    from keras_stability.cli.demo import compile_example_model
    from keras_stability.datasets import load_dataset

    if workload == "example":
        (x, y), _ = load_dataset("synthetic", seed=0)

        def build():
            return compile_example_model(build_example_model())

    else:
        x, y = _lm_data(0)

        def build():
            model = _transformer()
            model.compile(
                keras.optimizers.Adam(1e-3),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
            return model

    timer_cls = _EpochTimes().cls
    variants = {
        "plain fit": lambda: [],
        "monitor(every step) + detector": lambda: [
            GradientMonitor(every_n_steps=1, verbose=0),
            GradientExplosionDetector(verbose=0),
        ],
        "monitor(every 10) + detector": lambda: [
            GradientMonitor(every_n_steps=10, verbose=0),
            GradientExplosionDetector(verbose=0),
        ],
    }
    models = {}
    for name in variants:
        keras.utils.set_random_seed(0)
        models[name] = build()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, make in variants.items():
            timer = timer_cls()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                models[name].fit(
                    x, y, batch_size=32, epochs=epochs, verbose=0, callbacks=[*make(), timer]
                )
            times[name].extend(timer.times[1:])
    steps = math.ceil(len(x) / 32)
    base = summarize(times["plain fit"])["median"]
    rows = []
    for name in variants:
        stat = summarize([t / steps * 1e3 for t in times[name]])
        rows.append(
            f"| {workload} | {name} | {fmt(stat, 2, ' ms')} | "
            f"{(summarize(times[name])['median'] / base - 1) * 100:+.1f}% |"
        )
    return steps, rows


def _lm_data(seed, n=512, seq=32, vocab=64):
    # A noisy deterministic language: next token = (3 * token + 1) % vocab, with
    # 10% random tokens; learnable, so the loss falls well below log(vocab).
    rng = np.random.default_rng(seed)
    x = np.empty((n, seq + 1), "int32")
    x[:, 0] = rng.integers(0, vocab, n)
    for t in range(1, seq + 1):
        x[:, t] = (3 * x[:, t - 1] + 1) % vocab
        noise = rng.random(n) < 0.1
        x[noise, t] = rng.integers(0, vocab, noise.sum())
    return x[:, :-1], x[:, 1:]


def _transformer(vocab=64, seq=32, dim=64, heads=4):
    import keras

    inputs = keras.Input((seq,), dtype="int32")
    tok = keras.layers.Embedding(vocab, dim)(inputs)
    pos = keras.layers.Embedding(seq, dim)(keras.ops.arange(seq)[None, :])
    h = tok + pos
    for _ in range(2):
        a = keras.layers.LayerNormalization()(h)
        a = keras.layers.MultiHeadAttention(heads, dim // heads)(a, a, use_causal_mask=True)
        h = h + a
        f = keras.layers.LayerNormalization()(h)
        f = keras.layers.Dense(4 * dim, activation="gelu")(f)
        h = h + keras.layers.Dense(dim)(f)
    h = keras.layers.LayerNormalization()(h)
    return keras.Model(inputs, keras.layers.Dense(vocab)(h))


def rescue(seeds, lr, epochs=3):
    import keras

    from keras_stability.callbacks import GradientExplosionDetector

    results = {"plain fit": [], "global_clipnorm=1.0": [], "detector (rollback)": []}
    (xv, yv) = _lm_data(10_000, n=256)
    for seed in range(seeds):
        x, y = _lm_data(seed)
        for name in results:
            keras.utils.set_random_seed(seed)
            model = _transformer()
            kwargs = {"global_clipnorm": 1.0} if name.startswith("global") else {}
            model.compile(
                keras.optimizers.Adam(lr, **kwargs),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
            callbacks = (
                [GradientExplosionDetector(snapshot_every=10, lr_factor=0.1, verbose=0)]
                if name.startswith("detector")
                else []
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.fit(x, y, batch_size=32, epochs=epochs, verbose=0, callbacks=callbacks)
                loss = float(model.evaluate(xv, yv, verbose=0))
            finite = all(np.all(np.isfinite(w)) for w in model.get_weights())
            diverged = not (finite and math.isfinite(loss)) or loss > math.log(64)
            results[name].append((diverged, loss))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--skip-rescue", action="store_true")
    args = parser.parse_args(argv)
    print("## Gradient health: overhead and rescue rate\n")
    print(f"Machine: {environment()}\n")
    rows = []
    for workload in ("example", "transformer"):
        _, workload_rows = overhead(args.repeats, workload)
        rows += workload_rows
    print(
        "Overhead: `example` is the Keras example on `synthetic` (batch 32, 50 "
        "steps per epoch); `transformer` the 2-block LM below (batch 32, 16 steps "
        f"per epoch). Epochs 2-4 of each fit, {args.repeats} alternating repeats. "
        "Time per step, median (min..max), and change of the median epoch time.\n"
    )
    print("| model | variant | time per step | vs plain |\n| --- | --- | --- | --- |")
    print("\n".join(rows))
    if not args.skip_rescue:
        results = rescue(args.seeds, args.lr)
        print(
            f"\nRescue: 2-block transformer LM (dim 64, 4 heads, vocab 64, seq 32), "
            f"Adam(lr={args.lr}), 3 epochs of 16 steps, {args.seeds} seeds. Diverged: "
            "non-finite weights or held-out loss above log(vocab) (chance).\n"
        )
        print("| variant | diverged | held-out loss per seed |\n| --- | --- | --- |")
        for name, runs in results.items():
            losses = ", ".join(f"{loss:.3f}" for _, loss in runs)
            print(f"| {name} | {sum(d for d, _ in runs)}/{len(runs)} | {losses} |")
    print(
        f"\nCommand: `python -m benchmarks.gradient_health --repeats {args.repeats} "
        f"--seeds {args.seeds} --lr {args.lr}`"
    )


if __name__ == "__main__":
    main()
