"""Training throughput of `GuardedOptimizer(ZClip())` against the plain optimizer.

Run: `python -m benchmarks.overhead [--repeats N]`

Two workloads, each trained by two models that differ only in the optimizer
(Adam vs GuardedOptimizer(Adam, clipping=ZClip())): the Keras example
(Dense 128-64-10 on the synthetic data tiled 8 times, batch 32) and a small causal
transformer language model (1 block, d=64, 4 heads, sequence 32, vocabulary
256, batch 32). Each model is warmed up (traced) once; then one-epoch fits
alternate A, B, A, B, ... in one process and the median time per step is
reported with its spread. Time is the process's CPU time (all threads), which
on a shared machine is much steadier than wall time; the paired ratio compares
each guarded fit with the plain fit just before it.
"""

import argparse
import time

import numpy as np

from benchmarks.common import environment
from benchmarks.common import fmt
from benchmarks.common import summarize


def _example_workload():
    from keras_stability.cli.demo import build_example_model
    from keras_stability.cli.demo import compile_example_model
    from keras_stability.datasets import load_dataset

    (x, y), _ = load_dataset("synthetic", seed=0)
    x, y = np.tile(x, (8, 1)), np.tile(y, 8)  # 400 steps per timed fit

    def make(optimizer):
        model = compile_example_model(build_example_model(), optimizer)
        return lambda: model.fit(x, y, batch_size=32, epochs=1, verbose=0)

    return make, len(x) // 32


def _transformer_workload(n_sequences=2048, seq_len=32, vocab=256, dim=64):
    import keras

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=(n_sequences, seq_len + 1)).astype("int32")
    x, y = tokens[:, :-1], tokens[:, 1:]

    def build():
        inputs = keras.Input((seq_len,), dtype="int32")
        h = keras.layers.Embedding(vocab, dim)(inputs)
        positions = keras.layers.Embedding(seq_len, dim)(
            keras.ops.arange(seq_len, dtype="int32")
        )
        h = h + positions
        a = keras.layers.LayerNormalization()(h)
        a = keras.layers.MultiHeadAttention(4, dim // 4)(a, a, use_causal_mask=True)
        h = h + a
        f = keras.layers.LayerNormalization()(h)
        f = keras.layers.Dense(4 * dim, activation="gelu")(f)
        h = h + keras.layers.Dense(dim)(f)
        outputs = keras.layers.Dense(vocab)(keras.layers.LayerNormalization()(h))
        return keras.Model(inputs, outputs)

    def make(optimizer):
        model = build()
        model.compile(
            optimizer,
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return lambda: model.fit(x, y, batch_size=32, epochs=1, verbose=0)

    return make, n_sequences // 32


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)

    import keras

    from keras_stability.clipping import ZClip
    from keras_stability.optimizers import GuardedOptimizer

    rows = []
    for name, workload in (
        ("Keras example (MLP), batch 32", _example_workload),
        ("Transformer LM (1 block, d=64), batch 32", _transformer_workload),
    ):
        make, steps = workload()
        keras.utils.set_random_seed(0)
        runners = {
            "plain": make(keras.optimizers.Adam(1e-3)),
            "guarded": make(
                GuardedOptimizer(keras.optimizers.Adam(1e-3), clipping=ZClip())
            ),
        }
        for fn in runners.values():
            fn()  # trace and warm up
        times = {k: [] for k in runners}
        for _ in range(args.repeats):
            for key, fn in runners.items():
                start = time.process_time()
                fn()
                times[key].append(time.process_time() - start)
        per_step = {k: summarize([t / steps * 1e3 for t in v]) for k, v in times.items()}
        ratios = summarize(
            [g / p for g, p in zip(times["guarded"], times["plain"], strict=True)]
        )
        rows.append((name, steps, per_step, ratios))

    print("## Overhead of GuardedOptimizer(ZClip())\n")
    print(environment() + "\n")
    print(
        "| workload | steps/fit | Adam CPU ms/step | Guarded(ZClip) CPU ms/step | "
        "slowdown (paired ratio) |"
    )
    print("| --- | --- | --- | --- | --- |")
    for name, steps, per_step, ratios in rows:
        slowdown = {k: (v - 1) * 100 if k != "n" else v for k, v in ratios.items()}
        print(
            f"| {name} | {steps} | {fmt(per_step['plain'])} | "
            f"{fmt(per_step['guarded'])} | {fmt(slowdown, 1, '%')} |"
        )
    print(
        f"\nCommand: `python -m benchmarks.overhead --repeats {args.repeats}` "
        "(one-epoch fits alternating plain/guarded in one process after a "
        "warm-up fit; process CPU time; slowdown = median of per-pair time "
        "ratios - 1)."
    )


if __name__ == "__main__":
    main()
