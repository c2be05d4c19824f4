"""Costs paid once, not per step: quantizing a model, fitting again, starting the CLI.

Three measures, each side by side in one process, interleaved, in process CPU
time (children's for the command line):

- `pruning.quantize(model)` against Keras' own `model.quantize("int8")` on
  the same freshly built character LM each round. Keras' `Layer.__delattr__`
  runs a full `gc.collect()` for every kernel `quantize` replaces;
  `pruning.quantize` runs one.
- `fit` called again (10 steps of the same character LM, traced by an
  earlier `fit`) with new `GradientMonitor()` and
  `GradientExplosionDetector()` instances, against plain `fit` called again:
  a new instance takes over the earlier one's in-graph state, so neither
  traces the step again.
- `python -m keras_stability --help` and a usage error against
  `python -c "import keras_stability"` (what the command line cost before
  it parsed its arguments ahead of importing TensorFlow).

Per round the ratio of the two; the table gives the median ratio with a 95%
percentile-bootstrap interval over rounds, and the median times.

Usage: python -m benchmarks.one_off_costs [--rounds N] [--blocks B]
"""

import argparse
import resource
import subprocess
import sys
import time
import warnings

import numpy as np

from benchmarks.common import environment
from benchmarks.common import median_ci


def _cpu(fn):
    start = time.process_time()
    fn()
    return time.process_time() - start


def _child_cpu(argv):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, capture_output=True, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def quantize_rounds(rounds, blocks):
    import keras

    from keras_stability import pruning
    from keras_stability.models import build_char_transformer

    def build():
        return build_char_transformer(
            96, 64, num_blocks=blocks, hidden_dim=64, num_heads=4, name="lm"
        )

    times = {"keras": [], "ours": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers without a `quantize`
        for i in range(rounds):
            order = ("keras", "ours") if i % 2 == 0 else ("ours", "keras")
            for name in order:
                model = build()
                fn = (
                    (lambda m=model: m.quantize("int8"))
                    if name == "keras"
                    else (lambda m=model: pruning.quantize(m))
                )
                times[name].append(_cpu(fn))
                del model
                keras.backend.clear_session()
    return times


def refit_rounds(rounds, blocks, steps=10):
    """One more `fit` per round: plain, and with new callback instances.

    Two twin models of the char LM, fitted once first (traced). Each round
    fits each again for `steps` steps: the plain one with no callback, the
    other with `[GradientMonitor(), GradientExplosionDetector()]` made anew,
    as a notebook cell run again makes them.
    """
    import gc

    import keras

    from keras_stability.callbacks import GradientExplosionDetector
    from keras_stability.callbacks import GradientMonitor
    from keras_stability.models import build_char_transformer

    rng = np.random.default_rng(0)
    x = rng.integers(0, 96, size=(32 * steps, 64))
    y = np.roll(x, -1, axis=1)
    models = {}
    for name in ("plain", "ours"):
        keras.utils.set_random_seed(0)
        model = build_char_transformer(
            96, 64, num_blocks=blocks, hidden_dim=64, num_heads=4, name="lm"
        )
        model.compile(
            keras.optimizers.Adam(1e-3),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        models[name] = model

    def fit(name):
        callbacks = (
            [GradientMonitor(), GradientExplosionDetector()] if name == "ours" else []
        )
        models[name].fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=callbacks)
        del callbacks
        gc.collect()  # the instances are gone before the next fit

    for name in models:
        fit(name)
    times = {"plain": [], "ours": []}
    for i in range(rounds):
        for name in ("plain", "ours") if i % 2 == 0 else ("ours", "plain"):
            times[name].append(_cpu(lambda n=name: fit(n)))
    return times


def cli_rounds(rounds):
    python = sys.executable
    runs = {
        "import": [python, "-c", "import keras_stability"],
        "help": [python, "-m", "keras_stability", "--help"],
        "usage error": [python, "-m", "keras_stability", "demo", "--dataset", "x"],
    }
    times = {name: [] for name in runs}
    for i in range(rounds):
        names = list(runs) if i % 2 == 0 else list(reversed(runs))
        for name in names:
            times[name].append(_child_cpu(runs[name]))
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--blocks", type=int, default=2)
    args = parser.parse_args(argv)
    start = time.time()
    quantize = quantize_rounds(args.rounds, args.blocks)
    refit = refit_rounds(args.rounds, args.blocks)
    cli = cli_rounds(args.rounds)
    ratio_q = np.asarray(quantize["ours"]) / np.asarray(quantize["keras"])
    lines = [
        "## One-off costs: quantizing a model, fitting again, starting the command line",
        "",
        f"Machine: {environment()}",
        "",
        f"Command: `python -m benchmarks.one_off_costs --rounds {args.rounds} "
        f"--blocks {args.blocks}` ({time.time() - start:.0f} s). {args.rounds} "
        "rounds, the two sides interleaved (order alternating), process CPU "
        "time (the children's for the command line); ratio per round, median "
        "and 95% bootstrap interval over rounds.",
        "",
        "| measure | this library | against | median CPU s (ours / theirs) "
        "| ratio (95% interval) |",
        "|---|---|---|---|---|",
    ]
    m, lo, hi = median_ci(ratio_q)
    lines.append(
        f"| quantize the char LM ({args.blocks} blocks, hidden 64, int8) "
        '| `pruning.quantize(model)` | Keras\' `model.quantize("int8")` '
        f"| {np.median(quantize['ours']):.2f} / {np.median(quantize['keras']):.2f} "
        f"| {m:.3f} ({lo:.3f}..{hi:.3f}) |"
    )
    ratio = np.asarray(refit["ours"]) / np.asarray(refit["plain"])
    m, lo, hi = median_ci(ratio)
    lines.append(
        f"| `fit` again, 10 steps of the char LM ({args.blocks} blocks) "
        "| with new `[GradientMonitor(), GradientExplosionDetector()]` "
        "| plain `fit` again "
        f"| {np.median(refit['ours']):.2f} / {np.median(refit['plain']):.2f} "
        f"| {m:.3f} ({lo:.3f}..{hi:.3f}) |"
    )
    for name in ("help", "usage error"):
        ratio = np.asarray(cli[name]) / np.asarray(cli["import"])
        m, lo, hi = median_ci(ratio)
        argv = "--help" if name == "help" else "demo --dataset x"
        lines.append(
            f"| command line, {name} | `python -m keras_stability {argv}` "
            '| `python -c "import keras_stability"` '
            f"| {np.median(cli[name]):.2f} / {np.median(cli['import']):.2f} "
            f"| {m:.3f} ({lo:.3f}..{hi:.3f}) |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
