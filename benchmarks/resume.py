"""Killed and resumed: the detector with `BackupAndRestore`, on the battery's runs.

`python -m benchmarks.resume [--only NAME ...] [--kills 7 23 61 130] [--seeds 0]`

For each run of the gradient-health battery (`benchmarks/battery.py`) picked
with `--only` (the case names contain one of the strings; default: the Keras
example's diverging and healthy runs), on the same data and seed:

- the detector alone (`GradientExplosionDetector()`, its defaults);
- the detector with `keras_stability.distribute.BackupAndRestore(save_freq=5)`,
  uninterrupted;
- for each `--kills` K: the same, killed at the end of its K-th batch (an
  exception raised by a callback, as a killed process leaves the backup
  folder), then run again with a fresh model and detector and the same
  backup folder, to the end.

Printed: the held-out loss of each (NaN for non-finite weights; "ended
before" when the run has fewer batches than K). A resumed
run that ends where the uninterrupted one does lost nothing to the kill; the
uninterrupted run with the backup against the detector alone says whether
the backup changes training.
"""

import argparse
import tempfile
import time

from benchmarks import battery
from benchmarks.common import environment

DEFAULT_ONLY = ("Keras example", "deep 12-layer", "Student-t", "tiny MLP, batch 8")
DEFAULT_KILLS = (7, 23, 61, 130)
SAVE_FREQ = 5


def _kill_at(calls):
    import keras

    class KillAtBatch(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seen = 0

        def on_train_batch_end(self, batch, logs=None):
            self.seen += 1
            if self.seen == calls:
                raise KeyboardInterrupt("killed")

    return KillAtBatch()


def _fit(case, seed, callbacks, epochs=None):
    """One fit of `case` (`battery.fit_case`); `None` if a callback killed it."""
    try:
        return battery.fit_case(case, seed, case.lr, callbacks, epochs=epochs)
    except KeyboardInterrupt:
        return None


def _heldout(case, seed, model):
    _, _, xv, yv = case.data(seed, False)
    if not battery._finite_weights(model):
        return float("nan")
    return float(case.heldout(model, xv, yv))


def run_case(case, seed, kills=DEFAULT_KILLS, epochs=None):
    """`{"alone": loss, "backup": loss, "longest_wait": batches, K: loss of
    the run killed at K, ...}`: `longest_wait`, the most batches a due backup
    waited for the detector in the uninterrupted run."""
    from keras_stability.callbacks import GradientExplosionDetector
    from keras_stability.distribute import BackupAndRestore

    def backed_up(folder, *extra):
        return [
            BackupAndRestore(folder, save_freq=SAVE_FREQ),
            GradientExplosionDetector(),
            *extra,
        ]

    result = {
        "alone": _heldout(
            case, seed, _fit(case, seed, [GradientExplosionDetector()], epochs)
        )
    }
    with tempfile.TemporaryDirectory() as folder:
        callbacks = backed_up(folder)
        model = _fit(case, seed, callbacks, epochs)
        result["backup"] = _heldout(case, seed, model)
        result["longest_wait"] = callbacks[0].longest_wait
    for kill in kills:
        with tempfile.TemporaryDirectory() as folder:
            killed = _fit(case, seed, backed_up(folder, _kill_at(kill)), epochs)
            if killed is not None:  # the fit ended before the K-th batch
                result[kill] = None
                continue
            result[kill] = _heldout(
                case, seed, _fit(case, seed, backed_up(folder), epochs)
            )
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=list(DEFAULT_ONLY))
    parser.add_argument("--kills", nargs="+", type=int, default=list(DEFAULT_KILLS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    args = parser.parse_args(argv)
    start = time.perf_counter()
    print("## Killed and resumed with BackupAndRestore (benchmarks/resume.py)\n")
    print(environment() + "\n")
    kills = args.kills
    print(
        "| run | seed | detector alone | with the backup | longest wait (batches) | "
        + " | ".join(f"killed at batch {k}, resumed" for k in kills)
        + " |"
    )
    print("| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in kills) + " |")
    same = total = 0
    for case in battery.cases():
        if not any(name in case.name for name in args.only):
            continue
        for seed in args.seeds:
            result = run_case(case, seed, kills)
            values = [result[k] for k in kills]
            reached = [v for v in values if v is not None]
            same += sum(v == result["backup"] for v in reached)
            total += len(reached)
            print(
                f"| {case.name} | {seed} | {result['alone']:.4g} | "
                f"{result['backup']:.4g} | {result['longest_wait']} | "
                + " | ".join(
                    "(ended before)" if v is None else f"{v:.4g}" for v in values
                )
                + " |",
                flush=True,
            )
    print(
        f"\n{same} of {total} resumed runs end at the uninterrupted run's held-out "
        f"loss; {time.perf_counter() - start:.0f} s."
    )


if __name__ == "__main__":
    main()
