"""Gradient health: overhead of the guard and callbacks, rescue rate, false alarms.

The one overhead benchmark of the repository: every per-step cost claim
(`GuardedOptimizer` with or without ZClip, the monitor, the detector) comes
from `overhead()` below.

`python -m benchmarks.gradient_health [--rounds N] [--seeds N] [--lr LR ...]
[--workloads NAME ...] [--variants NAME ...] [--skip-overhead] [--skip-rescue] [--skip-false-alarms]`

`python -m benchmarks.gradient_health --battery [--seeds N] [--only NAME ...]
[--quick]` runs the battery of issue #16 instead (`benchmarks/battery.py`):
healthy, diverging and plateau runs with the detector at its defaults.

1. Overhead: time per step of the Keras example (also under XLA) and of a
   small transformer (also under XLA, and 8x larger) with plain `fit`, with the
   `GuardedOptimizer` alone (without a clipping policy, and with `ZClip()`)
   and, for reference, the guard without its skip `cond`, Keras'
   `LossScaleOptimizer`, which skips non-finite steps the same way, and
   Keras' `global_clipnorm`, which waits for the global norm too; with
   `GradientMonitor()` + `GradientExplosionDetector()` at their defaults
   (the cost goal of issue #16), with `GradientMonitor(check_freq=1)` +
   detector, with the monitor every 10 steps + detector, with the
   detector alone and with the monitor alone (every step and every 10);
   and the references of the exact gates of 2026-12-04 beside what they
   became (the guard with the spike rule, the stack at its defaults)
   (fit's inner loop in interleaved bursts, paired per-round ratios). `--variants` measures a subset (plain fit always).
2. Rescue rate: a small transformer language model at learning rates where
   plain `fit` diverges, several seeds: diverged runs and final held-out loss
   with plain fit, with Keras `global_clipnorm=1.0`, and with the detector,
   against the best stable run (plain fit at the best of `STABLE_LRS`).
3. False alarms: healthy long runs of the Keras example with the default
   detector (digits to a tiny, heavy-tailed loss): any event is a false alarm.
"""

import argparse
import contextlib
import math
import sys
import time
import warnings
from unittest import mock

import numpy as np

from benchmarks.common import environment
from benchmarks.common import summarize

GUARD_ZCLIP = "GuardedOptimizer(ZClip()) alone (no callback)"
# The guard with the detector's in-graph spike rule at its defaults: what
# the rule costs beside the guard's exact skip.
GUARD_SPIKES = "GuardedOptimizer(skip_spikes=RobustSpikeSkipping()) alone (no callback)"
# References for the exact gates of 2026-12-04, each measured beside what it
# became: the spike rule taking the window's quartiles at every step (not
# only when the norm is `peak_ratio` times the peak), and the detector's
# host rules taking the median of every window (not only of one with a
# value above the rule's bound). Same decisions; only the cost differs.
UNGATED_SPIKES = (
    "GuardedOptimizer(skip_spikes=RobustSpikeSkipping()), quartiles at every step "
    "(before 2026-12-04; reference)"
)
EVERY_MEDIAN = (
    "monitor + detector at their defaults, every median taken on the host "
    "(before 2026-12-04; reference)"
)
# A reference, not a mode of the library: the guard's measurements and
# statistics with the update always applied (no skip `cond`), so the table
# shows what the exact skip itself costs.
NO_COND = "GuardedOptimizer without its skip cond (not exact; reference)"
DEFAULTS = "GradientMonitor() + GradientExplosionDetector() (defaults)"
# name -> (model, Keras `jit_compile`, steps per burst, variants measured)
WORKLOADS = {
    "example": ("example", False, 25, None),
    "example (XLA)": ("example", True, 25, None),
    "transformer": ("transformer", False, 25, None),
    "transformer (XLA)": ("transformer", True, 25, None),
    "transformer-4x": (
        "transformer-4x",
        False,
        8,
        (
            "plain fit",
            "GuardedOptimizer alone (no callback)",
            GUARD_ZCLIP,
            NO_COND,
            "Keras LossScaleOptimizer (for reference)",
            DEFAULTS,
            "monitor(every step) + detector",
            "detector only",
        ),
    ),
}
# The larger LM: 4 blocks of dim 128, vocab 256, seq 64 (0.86M parameters,
# 69 variables, against 0.11M and 37 for the 2-block one).
LARGE_LM = {"vocab": 256, "seq": 64, "dim": 128, "blocks": 4}


def overhead(rounds, workload, burst=None, only=None):
    """Per-step time of plain fit and of fit with the monitor + detector.

    Each variant gets its own model, fitted once for one epoch (this traces
    the step and attaches the callbacks). Then fit's inner loop, the same
    calls `fit` makes per batch (`on_train_batch_begin`, the compiled train
    function, `on_train_batch_end` on a Keras `CallbackList` of the
    variant's callbacks), runs in interleaved bursts of `burst` steps: every
    round runs one burst of each variant (in alternating order). Short,
    interleaved bursts keep the machine's drift out of the comparison; the
    slowdown is the median over rounds of the per-round ratio to plain fit,
    for wall time and for the process's CPU time (all threads).
    """
    import tensorflow as tf
    from keras.src.callbacks.callback_list import CallbackList

    burst = burst or WORKLOADS[workload][2]
    x, y = workload_data(workload)
    loops = {}
    for name, model, callbacks in fitted_variants(workload, only):
        callback_list = CallbackList(
            callbacks, add_history=True, model=model, verbose=0, epochs=1, steps=10**9
        )
        data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=0)
        iterator = iter(data.batch(32, drop_remainder=True).repeat())
        callback_list.on_train_begin()
        callback_list.on_epoch_begin(0)
        loops[name] = (model, callback_list, iterator, [0])

    def run(name, steps):
        model, callback_list, iterator, step = loops[name]
        with _burst_context(name):
            for _ in range(steps):
                callback_list.on_train_batch_begin(step[0])
                logs = model.train_function(iterator)
                callback_list.on_train_batch_end(step[0], logs)
                step[0] += 1

    names = list(loops)
    for name in names:
        run(name, 2 * burst)  # warm up
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            w0, c0 = time.perf_counter(), time.process_time()
            run(name, burst)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    for _, callback_list, _, _ in loops.values():
        callback_list.on_train_end()
    rows = []
    for name in names:
        stat = summarize([t / burst * 1e3 for t in wall[name]])
        ratios = {}
        for kind, times in (("wall", wall), ("cpu", cpu)):
            per_round = [
                (a / b - 1) * 100
                for a, b in zip(times[name], times["plain fit"], strict=True)
            ]
            q1, q2, q3 = np.percentile(per_round, [25, 50, 75])
            ratios[kind] = f"{q2:+.1f}% ({q1:+.1f}..{q3:+.1f})"
            if kind == "wall":
                low, high = _median_interval(per_round)
                ratios["interval"] = f"{low:+.1f}..{high:+.1f}%"
        fastest = (min(wall[name]) / min(wall["plain fit"]) - 1) * 100
        rows.append(
            f"| {workload} | {name} | {stat['median']:.3f} ms | {ratios['wall']} | "
            f"{ratios['interval']} | {fastest:+.1f}% | {ratios['cpu']} |"
        )
    return rows


def workload_data(workload):
    """The training data `(x, y)` of `workload` (a key of `WORKLOADS`)."""
    from keras_stability.datasets import load_dataset

    model_name = WORKLOADS[workload][0]
    if model_name == "example":
        (x, y), _ = load_dataset("synthetic", seed=0)
        return x, y
    size = LARGE_LM if model_name == "transformer-4x" else {}
    return _lm_data(0, n=2048 if not size else 512, **_data_size(size))


def fitted_variants(workload, only=None):
    """Yields `(variant name, model, callbacks)`, each fitted for one epoch.

    Each variant gets its own model (seed 0), compiled with its optimizer and
    fitted once with its callbacks, which traces the train function and
    attaches the callbacks. `only`: the variants whose name contains one of
    these strings (plain fit always).
    """
    import keras

    from keras_stability.callbacks import GradientExplosionDetector
    from keras_stability.callbacks import GradientMonitor
    from keras_stability.clipping import RobustSpikeSkipping
    from keras_stability.clipping import ZClip
    from keras_stability.models import build_example_model
    from keras_stability.models import compile_example_model
    from keras_stability.optimizers import GuardedOptimizer

    model_name, jit_compile, _, measured = WORKLOADS[workload]
    x, y = workload_data(workload)
    if model_name == "example":

        def build(optimizer):
            model = compile_example_model(build_example_model(), optimizer)
            if jit_compile:  # the same compile, with XLA (as Keras on a GPU)
                model.compile(
                    optimizer=model.optimizer,
                    loss=model.loss,
                    metrics=["accuracy"],
                    jit_compile=True,
                )
            return model

    else:
        size = LARGE_LM if model_name == "transformer-4x" else {}

        def build(optimizer):
            model = _transformer(**size)
            model.compile(
                optimizer,
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                jit_compile=jit_compile,
            )
            return model

    variants = {
        "plain fit": lambda: [],
        "GuardedOptimizer alone (no callback)": lambda: [],
        GUARD_ZCLIP: lambda: [],
        GUARD_SPIKES: lambda: [],
        UNGATED_SPIKES: lambda: [],
        NO_COND: lambda: [],
        "Keras LossScaleOptimizer (for reference)": lambda: [],
        "Keras global_clipnorm=1.0 (for reference)": lambda: [],
        # Both callbacks with every argument at its default: the stack the
        # issue's cost goal (#16) is about.
        DEFAULTS: lambda: [GradientMonitor(), GradientExplosionDetector()],
        "monitor(every step) + detector": lambda: [
            GradientMonitor(check_freq=1, verbose=0),
            GradientExplosionDetector(verbose=0),
        ],
        "monitor(every 10) + detector": lambda: [
            GradientMonitor(check_freq=10, verbose=0),
            GradientExplosionDetector(verbose=0),
        ],
        EVERY_MEDIAN: lambda: [GradientMonitor(), GradientExplosionDetector()],
        "detector only": lambda: [GradientExplosionDetector(verbose=0)],
        "monitor only (defaults)": lambda: [GradientMonitor()],
        "monitor(every 10) only": lambda: [GradientMonitor(check_freq=10, verbose=0)],
    }
    if measured is not None:
        variants = {name: variants[name] for name in measured}
    if only:
        variants = {
            name: make
            for name, make in variants.items()
            if name == "plain fit" or any(part in name for part in only)
        }
    for name, make in variants.items():
        keras.utils.set_random_seed(0)
        optimizer = keras.optimizers.Adam(1e-3)
        if name.startswith("Keras global_clipnorm"):
            # Keras' own global-norm clipping: the update waits for the norm
            # of the whole gradient, as the guard's decision does.
            optimizer = keras.optimizers.Adam(1e-3, global_clipnorm=1.0)
        elif name == NO_COND:
            optimizer = _guard_without_cond(optimizer)
        elif name == GUARD_ZCLIP:
            optimizer = GuardedOptimizer(optimizer, clipping=ZClip())
        elif name == GUARD_SPIKES:
            optimizer = GuardedOptimizer(optimizer, skip_spikes=RobustSpikeSkipping())
        elif name == UNGATED_SPIKES:
            optimizer = GuardedOptimizer(optimizer, skip_spikes=_ungated_spikes())
        elif name.startswith("GuardedOptimizer"):
            optimizer = GuardedOptimizer(optimizer)
        elif name.startswith("Keras LossScale"):
            # Keras' own optimizer that skips non-finite steps in-graph (a
            # `cond` around the update, as the guard's).
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        model = build(optimizer)
        callbacks = make()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=callbacks)
        yield name, model, callbacks


def _burst_context(name):
    """What a variant's bursts run under: `EVERY_MEDIAN`'s with the host
    rules' `all_below` gate off (every median taken), others as they are."""
    if name != EVERY_MEDIAN:
        return contextlib.nullcontext()
    from keras_stability.diagnostics import rules

    return mock.patch.object(rules, "all_below", return_value=False)


def _ungated_spikes():
    """`RobustSpikeSkipping()` whose step takes the window's quartiles at
    every step (reference only; `UNGATED_SPIKES`): its `cond` on the
    peak condition traced as `peak condition and the rule`, both computed."""
    from keras import ops

    from keras_stability.clipping import RobustSpikeSkipping
    from keras_stability.clipping import spike

    class Ops:
        def __getattr__(self, name):
            return getattr(ops, name)

        @staticmethod
        def cond(pred, true_fn, false_fn):
            return ops.logical_and(pred, true_fn())

    class UngatedRobustSpikeSkipping(RobustSpikeSkipping):
        def detect(self, norm):
            with mock.patch.object(spike, "ops", Ops()):
                return super().detect(norm)

    return UngatedRobustSpikeSkipping()


def _guard_without_cond(inner):
    """A `GuardedOptimizer` whose update is always applied (reference only).

    It measures and records exactly what the guard does, but applies the
    update with no `cond` around it, so a non-finite step is not skipped.
    Its cost against the real guard's is the cost of the exact skip.
    """
    from keras_stability.optimizers import GuardedOptimizer
    from keras_stability.optimizers.guarded_optimizer import _gradients_already_reduced

    class AlwaysApplied(GuardedOptimizer):
        def _guarded_apply(self, grads, variables, pending=None):
            skip, norm, threshold, _ = self._decide(grads, variables, pending)
            with _gradients_already_reduced(self.inner_optimizer):
                self._clip_and_apply(grads, variables, norm, threshold)
            self._after_apply(variables, skip)

    return AlwaysApplied(inner)


def _median_interval(values, level=0.95, resamples=2000, seed=0):
    """Bootstrap percentile interval of the median of `values`.

    The rounds are resampled with replacement; the interval says how far the
    median of this many noisy rounds can be trusted.
    """
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(values, size=(resamples, len(values))), axis=1)
    tail = (1 - level) / 2 * 100
    return tuple(np.percentile(medians, [tail, 100 - tail]))


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


def _data_size(size):
    return {key: size[key] for key in ("seq", "vocab") if key in size}


def _transformer(vocab=64, seq=32, dim=64, heads=4, blocks=2):
    import keras

    inputs = keras.Input((seq,), dtype="int32")
    tok = keras.layers.Embedding(vocab, dim)(inputs)
    pos = keras.layers.Embedding(seq, dim)(keras.ops.arange(seq)[None, :])
    h = tok + pos
    for _ in range(blocks):
        a = keras.layers.LayerNormalization()(h)
        a = keras.layers.MultiHeadAttention(heads, dim // heads)(
            a, a, use_causal_mask=True
        )
        h = h + a
        f = keras.layers.LayerNormalization()(h)
        f = keras.layers.Dense(4 * dim, activation="gelu")(f)
        h = h + keras.layers.Dense(dim)(f)
    h = keras.layers.LayerNormalization()(h)
    return keras.Model(inputs, keras.layers.Dense(vocab)(h))


STABLE_LRS = (1e-3, 3e-3, 1e-2, 3e-2)


def _fit_lm(seed, lr, callbacks=(), epochs=6, **adam_kwargs):
    """Trains the LM on seed `seed`'s data; returns (diverged, held-out loss)."""
    import keras

    x, y = _lm_data(seed)
    xv, yv = _lm_data(10_000, n=256)
    keras.utils.set_random_seed(seed)
    model = _transformer()
    model.compile(
        keras.optimizers.Adam(lr, **adam_kwargs),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(
            x, y, batch_size=32, epochs=epochs, verbose=0, callbacks=list(callbacks)
        )
        loss = float(model.evaluate(xv, yv, verbose=0))
    finite = all(np.all(np.isfinite(w)) for w in model.get_weights())
    diverged = not (finite and math.isfinite(loss)) or loss > math.log(64)
    return diverged, loss


def rescue(seeds, lrs, epochs=6):
    """Diverged runs and held-out loss per variant, and the best stable run.

    The reference is plain `fit` at the best of `STABLE_LRS` (lowest mean
    held-out loss over the seeds), with the same data, seeds and steps.
    """
    from keras_stability.callbacks import GradientExplosionDetector

    stable = {
        lr: [_fit_lm(seed, lr, epochs=epochs)[1] for seed in range(seeds)]
        for lr in STABLE_LRS
    }
    best_lr = min(stable, key=lambda lr: float(np.mean(stable[lr])))
    results = {}
    for lr in lrs:
        for name in ("plain fit", "global_clipnorm=1.0", "detector (rollback)"):
            runs = []
            for seed in range(seeds):
                if name.startswith("global"):
                    runs.append(_fit_lm(seed, lr, epochs=epochs, global_clipnorm=1.0))
                elif name.startswith("detector"):
                    detector = GradientExplosionDetector(
                        snapshot_freq=10, lr_factor=0.1, verbose=0
                    )
                    runs.append(_fit_lm(seed, lr, [detector], epochs=epochs))
                    runs[-1] += (
                        f"{detector.rollbacks} + {detector.lr_probes}",
                        detector.optimizer.learning_rate,
                    )
                else:
                    runs.append(_fit_lm(seed, lr, epochs=epochs))
            results[(lr, name)] = runs
    return stable, best_lr, results


def false_alarms(seeds, runs=(("digits", 100), ("synthetic", 40))):
    """Healthy runs of the Keras example with the default detector: any action is a false alarm."""
    import keras

    from keras_stability.callbacks import GradientExplosionDetector
    from keras_stability.datasets import load_dataset
    from keras_stability.models import build_example_model
    from keras_stability.models import compile_example_model

    rows = []
    for dataset, epochs in runs:
        (x, y), _ = load_dataset(dataset, seed=0)
        for seed in range(seeds):
            keras.utils.set_random_seed(seed)
            model = compile_example_model(build_example_model(x.shape[1], 10))
            detector = GradientExplosionDetector(verbose=0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                history = model.fit(
                    x, y, batch_size=32, epochs=epochs, verbose=0, callbacks=[detector]
                )
            raw = np.asarray(detector.raw_losses[-500:])
            rows.append(
                f"| {dataset} | {seed} | {epochs} ({detector.step} steps) | "
                f"{history.history['loss'][-1]:.4f} | {np.median(raw):.3g} / {raw.max():.3g} | "
                f"{len(detector.events)} | {detector.rollbacks} |"
            )
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--battery" in argv:
        from benchmarks import battery

        return battery.main([arg for arg in argv if arg != "--battery"])
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--battery",
        action="store_true",
        help="run the battery of issue #16 (benchmarks/battery.py) instead",
    )
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, nargs="+", default=[0.3, 1.0])
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-rescue", action="store_true")
    parser.add_argument("--skip-false-alarms", action="store_true")
    parser.add_argument(
        "--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS)
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="overhead: only the variants whose name contains one of these "
        "(plain fit is always measured)",
    )
    args = parser.parse_args(argv)
    print("## Gradient health: overhead, rescue rate, false alarms\n")
    print(f"Machine: {environment()}\n")
    if not args.skip_overhead:
        rows = []
        for workload in args.workloads:
            # The larger model's steps are ~7x longer: half the rounds.
            rounds = args.rounds // 2 if workload == "transformer-4x" else args.rounds
            rows += overhead(rounds, workload, only=args.variants)
        print(
            "Overhead: `example` is the Keras example on `synthetic` (batch 32); "
            "`transformer` the 2-block LM below (batch 32), also compiled with "
            "`jit_compile=True` (XLA, Keras' default on GPU and TPU); "
            "`transformer-4x` the same LM with 4 blocks of dim 128, vocab 256, seq "
            "64 (0.86M parameters, 8x the 2-block one; batch 32). Fit's inner loop (the "
            "per-batch callback hooks and the compiled train function, as `fit` calls "
            "them) in interleaved bursts of 25 steps (8 for `transformer-4x`), "
            f"{args.rounds} rounds ({args.rounds // 2} for `transformer-4x`), after a "
            "one-epoch fit that traces and attaches. `GuardedOptimizer alone` has no "
            "clipping policy (the finite check and the statistics); "
            "`GuardedOptimizer(ZClip())` adds the README's adaptive clipping. "
            "The guard without its skip "
            "`cond` is a reference only (same measurements, the update always "
            "applied): its difference to the guard is the cost of the exact skip. "
            "Time per step: median burst. "
            "Slowdown: median (quartiles) of the per-round ratio to plain fit, in "
            "wall time and in process CPU time; 95% interval of that median "
            "(bootstrap over rounds); fastest: the fastest burst's time over plain "
            "fit's fastest (the least disturbed rounds).\n"
        )
        print(
            "| model | variant | time per step | slowdown (wall) | 95% interval | "
            "fastest | slowdown (CPU) |\n| --- | --- | --- | --- | --- | --- | --- |"
        )
        print("\n".join(rows))
    if not args.skip_rescue:
        stable, best_lr, results = rescue(args.seeds, args.lr)
        best = stable[best_lr]
        print(
            "\nRescue: 2-block transformer LM (dim 64, 4 heads, vocab 64, seq 32), "
            f"Adam, 6 epochs of 16 steps, {args.seeds} seeds; held-out loss on 256 "
            "other sequences. Diverged: non-finite weights or held-out loss above "
            "log(vocab) = 4.16 (chance). The detector is "
            "`GradientExplosionDetector(snapshot_freq=10, lr_factor=0.1)` (other "
            "arguments default: max_rollbacks=3, skip_batches=5, check_recovery, "
            "probe_lower_lr). "
            "Gap: held-out loss over the best stable run's, same seed.\n"
        )
        print("Stable reference (plain fit), held-out loss per seed:\n")
        print("| learning rate | held-out loss per seed | mean |\n| --- | --- | --- |")
        for lr, losses in stable.items():
            mark = " (best)" if lr == best_lr else ""
            print(
                f"| {lr:g}{mark} | {', '.join(f'{v:.3f}' for v in losses)} | "
                f"{np.mean(losses):.3f} |"
            )
        print(
            "\n| learning rate | variant | diverged | held-out loss per seed | "
            "gap to best stable (per seed) | rollbacks + lower rates kept by probes -> final lr |"
        )
        print("| --- | --- | --- | --- | --- | --- |")
        for (lr, name), runs in results.items():
            losses = ", ".join(f"{run[1]:.3f}" for run in runs)
            gaps = ", ".join(
                f"{(run[1] / ref - 1) * 100:+.1f}%" if math.isfinite(run[1]) else "nan"
                for run, ref in zip(runs, best, strict=True)
            )
            extra = (
                ", ".join(f"{run[2]} -> {float(run[3]):.3g}" for run in runs)
                if len(runs[0]) > 2
                else ""
            )
            print(
                f"| {lr:g} | {name} | {sum(run[0] for run in runs)}/{len(runs)} | "
                f"{losses} | {gaps} | {extra} |"
            )
    if not args.skip_false_alarms:
        print(
            "\nFalse alarms: the Keras example (Adam 1e-3, batch 32) trained long, to a "
            "small loss whose batches are heavy-tailed, with "
            "`GradientExplosionDetector()` at its defaults. Every event is a false alarm.\n"
        )
        print(
            "| dataset | seed | epochs | final epoch loss | raw loss median / max, last "
            "500 steps | events | rollbacks |\n| --- | --- | --- | --- | --- | --- | --- |"
        )
        print("\n".join(false_alarms(args.seeds)))
    print(
        f"\nCommand: `python -m benchmarks.gradient_health --rounds {args.rounds} "
        f"--seeds {args.seeds} --lr {' '.join(f'{lr:g}' for lr in args.lr)}"
        + (
            " --workloads " + " ".join(f"'{w}'" for w in args.workloads)
            if args.workloads != list(WORKLOADS)
            else ""
        )
        + (
            " --variants " + " ".join(f"'{v}'" for v in args.variants)
            if args.variants
            else ""
        )
        + "".join(
            f" --{flag}"
            for flag in ("skip-overhead", "skip-rescue", "skip-false-alarms")
            if getattr(args, flag.replace("-", "_"))
        )
        + "`"
    )


if __name__ == "__main__":
    main()
