"""Compression benchmark of issue #17; for now its digits part: distillation with 10% of the labels.

Digits (scikit-learn's bundled 8x8 images), 10% of the training labels
kept (the others set to -1, unknown). Per seed: a teacher MLP trained on the
labeled 10%; the small student trained from scratch on the labeled 10%; the
same student (same initial weights) distilled from that teacher on the
labeled 10% only; and distilled on every training input with labels only
where known (`Distiller.compile(ignore_class=-1)`: the hard-label term on
labeled rows, the soft term on all). The teacher never sees a label the
students do not: the gain of the last row comes from the unlabeled inputs.

This script will also hold the rest of issue #17's benchmark (the character
LM on Python's standard-library text: teacher, shrink + distill with
`prune_and_distill` against the same architecture from scratch and shrink +
hard-label fine-tuning at the same steps, 2:4 and 80% sparsity with and
without int8, perplexity, `.keras` gzip size and generation tokens/s).

Run: `python -m benchmarks.llm_compression --seeds 3` (about a minute on 2 cores).
"""

import argparse
import statistics
import time

import numpy as np

from benchmarks.common import environment

STUDENT_UNITS = (32,)
TEACHER_UNITS = (256, 256)


def mlp(units, name, dropout=0.0):
    import keras

    inputs = keras.Input((64,))
    h = inputs
    for i, u in enumerate(units):
        h = keras.layers.Dense(u, activation="relu", name=f"{name}_dense_{i}")(h)
        if dropout:
            h = keras.layers.Dropout(dropout, name=f"{name}_dropout_{i}")(h)
    return keras.Model(
        inputs, keras.layers.Dense(10, name=f"{name}_logits")(h), name=name
    )


def accuracy(model, x, y):
    return float(
        np.mean(np.argmax(model.predict(x, verbose=0, batch_size=512), -1) == y)
    )


def digits_few_labels(seed, data, fraction, epochs, alpha, temperature):
    """Test accuracies of the teachers and the students for one seed."""
    import keras

    from keras_stability import Distiller

    (x, y), (xt, yt) = data
    rng = np.random.default_rng(seed)
    labeled = np.zeros(len(y), bool)
    labeled[rng.choice(len(y), int(round(fraction * len(y))), replace=False)] = True
    y_partial = np.where(labeled, y, -1).astype("int32")
    # The labeled rows repeated to about the size of the whole training set,
    # so that every fit below takes the same number of optimizer steps.
    repeats = int(round(len(y) / labeled.sum()))
    x_few, y_few = np.tile(x[labeled], (repeats, 1)), np.tile(y[labeled], repeats)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def train_teacher(xs, ys):
        keras.utils.set_random_seed(seed)
        teacher = mlp(TEACHER_UNITS, "teacher", dropout=0.3)
        teacher.compile(optimizer=keras.optimizers.Adam(1e-3), loss=ce)
        teacher.fit(xs, ys, epochs=epochs, batch_size=64, verbose=0)
        return teacher

    def student():
        keras.utils.set_random_seed(seed + 1000)  # same initial weights
        return mlp(STUDENT_UNITS, "student")

    def distill(teacher, xs, ys):
        distiller = Distiller(student(), teacher)
        distiller.compile(
            optimizer=keras.optimizers.Adam(3e-3),
            student_loss_fn=ce,
            alpha=alpha,
            temperature=temperature,
            ignore_class=-1,
        )
        keras.utils.set_random_seed(seed + 2000)
        distiller.fit(
            xs, ys, epochs=epochs, batch_size=64, verbose=0, cache_teacher_outputs=True
        )
        return accuracy(distiller.student, xt, yt)

    teacher = train_teacher(x_few, y_few)
    scratch = student()
    scratch.compile(optimizer=keras.optimizers.Adam(3e-3), loss=ce)
    keras.utils.set_random_seed(seed + 2000)
    scratch.fit(x_few, y_few, epochs=epochs, batch_size=64, verbose=0)
    full_teacher = train_teacher(x, y)
    return {
        "teacher": accuracy(teacher, xt, yt),
        "scratch": accuracy(scratch, xt, yt),
        "distilled_labeled": distill(teacher, x_few, y_few),
        "distilled_all": distill(teacher, x, y_partial),
        "full_teacher": accuracy(full_teacher, xt, yt),
        "distilled_all_full_teacher": distill(full_teacher, x, y_partial),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=4.0)
    args = parser.parse_args(argv)

    from keras_stability.datasets import load_dataset

    data = load_dataset("digits", seed=0)
    (x, _), (xt, _) = data
    start = time.perf_counter()
    results = [
        digits_few_labels(
            seed, data, args.fraction, args.epochs, args.alpha, args.temperature
        )
        for seed in range(args.seeds)
    ]
    total = time.perf_counter() - start

    def mean_sd(key):
        values = [100 * r[key] for r in results]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f}% ± {sd:.2f} (min {min(values):.2f}, max {max(values):.2f})"

    gains = [100 * (r["distilled_all"] - r["scratch"]) for r in results]
    gains_full = [
        100 * (r["distilled_all_full_teacher"] - r["scratch"]) for r in results
    ]
    n_labeled = int(round(args.fraction * len(x)))
    lines = [
        f"## Distillation with {100 * args.fraction:g}% of the labels (digits; `Distiller(ignore_class=-1)`)",
        "",
        f"Machine: {environment()}",
        "",
        f"Command: `python -m benchmarks.llm_compression --seeds {args.seeds} --fraction "
        f"{args.fraction} --epochs {args.epochs} --alpha {args.alpha} --temperature "
        f"{args.temperature}` (total {total:.0f} s)",
        "",
        f"Digits, {len(x)} train / {len(xt)} test; {n_labeled} training labels kept "
        f"({100 * args.fraction:.0f}%, a random subset per seed), the others set to -1. "
        f"Teacher MLP {TEACHER_UNITS} with dropout 0.3, Adam(1e-3), trained on the labeled "
        "rows only (a second one, as a reference, on all labels). "
        f"Student MLP {STUDENT_UNITS}, the same initial weights in every row, Adam(3e-3), "
        f"batch 64, the same number of steps in every row ({args.epochs} epochs over all "
        f"inputs, or over the labeled rows repeated {round(1 / args.fraction)} times). "
        f"Distilled: alpha={args.alpha} on labeled rows (0 on unlabeled ones), "
        f"T={args.temperature}, cached teacher outputs. Test accuracy over {args.seeds} "
        "seeds (mean ± sd):",
        "",
        "| model | labels | inputs | test accuracy |",
        "|---|---|---|---|",
        f"| teacher | {n_labeled} | {n_labeled} | {mean_sd('teacher')} |",
        f"| student from scratch | {n_labeled} | {n_labeled} | {mean_sd('scratch')} |",
        f"| student distilled | {n_labeled} | {n_labeled} | {mean_sd('distilled_labeled')} |",
        f"| student distilled | {n_labeled} | {len(x)} (all) | {mean_sd('distilled_all')} |",
        f"| teacher trained on all labels (reference) | {len(x)} | {len(x)} | "
        f"{mean_sd('full_teacher')} |",
        f"| student distilled from it | {n_labeled} | {len(x)} (all) | "
        f"{mean_sd('distilled_all_full_teacher')} |",
        "",
        "Distilled on all inputs minus scratch, per seed: "
        + ", ".join(f"{g:+.1f}" for g in gains)
        + f" points (mean {statistics.mean(gains):+.1f}); from the teacher trained on all "
        "labels: "
        + ", ".join(f"{g:+.1f}" for g in gains_full)
        + f" (mean {statistics.mean(gains_full):+.1f}). Per seed (teacher / scratch / "
        "distilled on the labeled rows / distilled on all inputs / teacher on all labels / "
        "distilled from it): "
        + "; ".join(
            f"{100 * r['teacher']:.1f}/{100 * r['scratch']:.1f}/"
            f"{100 * r['distilled_labeled']:.1f}/{100 * r['distilled_all']:.1f}/"
            f"{100 * r['full_teacher']:.1f}/{100 * r['distilled_all_full_teacher']:.1f}"
            for r in results
        ),
        "",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
