"""`python -m keras_stability diagnose MODEL.keras --data DATA.npz [--steps N]`.

Loads the saved model (a fresh copy: the file is not changed), trains it for
a few steps on the data with `GradientMonitor` (every step) and
`ActivationMonitor`, and prints the per-layer gradient-health table, the
dead / saturated units and the remedies. Exit code 0: healthy; 1: some layer
vanishes, explodes or has mostly dead / saturated units, or the loss is not
finite; 2: bad arguments or files.
"""

import math
import os
import sys

from keras_stability.cli.arguments import positive_int

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1
EXIT_USAGE = 2


def add_arguments(parser):
    parser.add_argument("model", metavar="MODEL.keras", help="A saved, compiled Keras model.")
    parser.add_argument(
        "--data",
        required=True,
        metavar="DATA.npz",
        help="numpy .npz with arrays `x` and `y` (or `x_train` and `y_train`).",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=20, help="Training steps (default 20)."
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=32, help="Batch size (default 32)."
    )
    parser.add_argument(
        "--patience",
        type=positive_int,
        default=3,
        help="Consecutive checks before a layer is flagged (default 3).",
    )


def _load_data(path):
    import numpy as np

    with np.load(path) as data:
        for x_key, y_key in (("x", "y"), ("x_train", "y_train")):
            if x_key in data.files and y_key in data.files:
                return data[x_key], data[y_key]
        raise ValueError(
            f"{path}: expected arrays `x` and `y` (or `x_train` and `y_train`); "
            f"found {', '.join(data.files) or 'none'}."
        )


def diagnose(model, x, y, steps=20, batch_size=32, patience=3):
    """Trains `model` for `steps` steps with the monitors; returns the report.

    Args:
        model: A compiled Keras model (it is trained: pass a copy).
        x: Inputs.
        y: Targets.
        steps: Training steps. Defaults to `20`.
        batch_size: Batch size. Defaults to `32`.
        patience: Checks before a layer is flagged. Defaults to `3`.

    Returns:
        Tuple `(healthy, text)`.
    """
    import numpy as np

    from keras_stability.callbacks import ActivationMonitor
    from keras_stability.callbacks import GradientMonitor

    n = len(x)
    repeats = max(1, math.ceil(steps * batch_size / max(n, 1)))
    idx = np.tile(np.arange(n), repeats)[: steps * batch_size]
    monitor = GradientMonitor(every_n_steps=1, patience=min(patience, steps), verbose=0)
    activations = ActivationMonitor(x[: min(n, 256)], verbose=0)
    history = model.fit(
        x[idx],
        y[idx],
        batch_size=batch_size,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[monitor, activations],
    )
    losses = monitor.raw_losses
    lines = [
        f"Trained {len(losses)} steps (batch {batch_size}): raw loss "
        f"{losses[0]:.4g} -> {losses[-1]:.4g}.",
        "",
        monitor.summary(print_to_stdout=False),
        "",
        "Units (probe batch of up to 256 samples):",
        activations.summary(print_to_stdout=False),
    ]
    bad_units = [
        name
        for name, entry in activations.report.items()
        if entry["fraction"] >= activations.warn_fraction
    ]
    finite = all(math.isfinite(v) for v in history.history.get("loss", [math.nan]))
    healthy = finite and not monitor.unhealthy_layers() and not bad_units
    lines += ["", "Verdict: " + ("healthy." if healthy else "NOT healthy (see above).")]
    return healthy, "\n".join(lines)


def run(args):
    import keras

    import keras_stability  # noqa: F401  (registers serializable classes)

    for path in (args.model, args.data):
        if not os.path.exists(path):
            print(f"error: no such file: {path}", file=sys.stderr)
            return EXIT_USAGE
    try:
        x, y = _load_data(args.data)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    model = keras.saving.load_model(args.model)
    if getattr(model, "optimizer", None) is None or getattr(model, "loss", None) is None:
        print(
            f"error: {args.model} holds a model that is not compiled (no optimizer "
            "or loss); compile it before saving.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    healthy, text = diagnose(
        model, x, y, steps=args.steps, batch_size=args.batch_size, patience=args.patience
    )
    print(text, flush=True)
    return EXIT_HEALTHY if healthy else EXIT_UNHEALTHY

