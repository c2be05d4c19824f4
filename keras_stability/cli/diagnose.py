"""`python -m keras_stability diagnose MODEL.keras --data DATA.npz [--steps N]`.

Loads the saved model (a fresh copy: the file is not changed), trains it for
a few steps on the data with `GradientMonitor` (every step) and
`ActivationMonitor`, and prints the per-layer gradient-health table, the
dead / saturated units and the remedies.

Exit codes:

- 0: healthy;
- 1: some layer vanishes, explodes or has mostly dead / saturated units, or
  the loss is not finite;
- 2: bad arguments or files: a missing, empty, truncated or unreadable model
  or data file, a model that is not compiled or that Keras refuses to load
  (a `Lambda` layer in safe mode), data without `x` and `y`, of the wrong
  shape or dtype, empty or not finite, or data the model cannot train on.
  One line on stderr says which file and what is wrong; no traceback.
"""

import math
import os
import sys
import zipfile

from keras_stability.cli.arguments import positive_int

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1
EXIT_USAGE = 2


class BadInput(Exception):
    """A bad file or argument: reported in one line, exit code 2."""


def add_arguments(parser):
    parser.add_argument(
        "model", metavar="MODEL.keras", help="A saved, compiled Keras model."
    )
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


def _first_line(error, root_cause=False):
    """`TypeName: first line of the message`, cut to about 200 characters.

    With `root_cause`, reports the innermost exception of the chain (Keras
    wraps "Could not locate class 'X'" in a generic deserialization error).
    """
    if root_cause:
        while (error.__cause__ or error.__context__) is not None:
            error = error.__cause__ or error.__context__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = lines[0] if lines else ""
    if line == "Graph execution error:":
        # A TensorFlow op failed inside `fit`: after the Python stack of where
        # the op was defined comes the op's own message, then its node name.
        skip = ("File ", "[[", "Detected at node", "Graph execution error")
        said = [s for s in lines if not s.startswith(skip)]
        line = said[-1] if said else line
    if len(line) > 200:
        end = line.rfind(". ", 0, 200)
        line = line[: end + 1] if end > 40 else line[:197] + "..."
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def _check_file(path, kind):
    if not os.path.exists(path):
        raise BadInput(f"{path}: no such file")
    if os.path.isdir(path):
        raise BadInput(f"{path}: is a directory, expected a {kind} file")
    if os.path.getsize(path) == 0:
        raise BadInput(f"{path}: is empty (0 bytes)")


def _load_data(path):
    import numpy as np

    _check_file(path, ".npz")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        raise BadInput(
            f"{path}: holds a single array, not an .npz file with arrays `x` and "
            "`y` (np.savez(path, x=x, y=y))"
        )
    if magic[:4] == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        raise BadInput(f"{path}: a truncated or damaged .npz file (no zip directory)")
    if not zipfile.is_zipfile(path):
        raise BadInput(f"{path}: not an .npz file (expected np.savez(path, x=x, y=y))")
    try:
        with np.load(path, allow_pickle=False) as data:
            for x_key, y_key in (("x", "y"), ("x_train", "y_train")):
                if x_key in data.files and y_key in data.files:
                    x, y = data[x_key], data[y_key]
                    break
            else:
                raise BadInput(
                    f"{path}: expected arrays `x` and `y` (or `x_train` and "
                    f"`y_train`); found {', '.join(data.files) or 'none'}"
                )
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise BadInput(
            f"{path}: not a readable .npz file ({_first_line(error)})"
        ) from None
    _check_arrays(path, x, y)
    return x, y


def _check_arrays(path, x, y):
    import numpy as np

    for name, array in (("x", x), ("y", y)):
        if array.dtype.kind not in "biuf":
            raise BadInput(
                f"{path}: `{name}` has dtype {array.dtype}; expected numbers"
            )
        if array.ndim == 0:
            raise BadInput(
                f"{path}: `{name}` is a single number; expected one row per sample"
            )
    if len(x) == 0:
        raise BadInput(f"{path}: `x` is empty (0 samples)")
    if len(x) != len(y):
        raise BadInput(f"{path}: `x` has {len(x)} samples but `y` has {len(y)}")
    for name, array in (("x", x), ("y", y)):
        if array.dtype.kind == "f":
            bad = int(np.count_nonzero(~np.isfinite(array)))
            if bad:
                raise BadInput(f"{path}: `{name}` has {bad} NaN or infinite values")


def _load_model(path):
    import keras

    import keras_stability  # noqa: F401  (registers serializable classes)

    _check_file(path, ".keras")
    if path.endswith(".keras") and not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            damaged = f.read(4) == b"PK\x03\x04"
        raise BadInput(
            f"{path}: a truncated or damaged .keras file (no zip directory)"
            if damaged
            else f"{path}: not a .keras file (a zip archive written by model.save)"
        )
    try:
        model = keras.saving.load_model(path)
    except Exception as error:  # any failure to read the file: a bad model file
        raise BadInput(
            f"{path}: cannot load the model ({_first_line(error, root_cause=True)})"
        ) from None
    if (
        getattr(model, "optimizer", None) is None
        or getattr(model, "loss", None) is None
    ):
        raise BadInput(
            f"{path}: the model is not compiled (no optimizer or loss); compile it "
            "before saving"
        )
    return model


def _check_model_takes(model, model_path, x, data_path):
    inputs = getattr(model, "inputs", None)
    if not inputs:
        return  # a subclassed model: Keras checks when it trains
    if len(inputs) != 1:
        raise BadInput(
            f"{model_path}: the model takes {len(inputs)} inputs; diagnose feeds it "
            "one array, `x`"
        )
    expected = tuple(inputs[0].shape[1:])
    if len(expected) != x.ndim - 1 or any(
        e is not None and e != a for e, a in zip(expected, x.shape[1:], strict=False)
    ):
        raise BadInput(
            f"{data_path}: `x` has samples of shape {tuple(x.shape[1:])} but the model "
            f"takes {expected}"
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
    monitor = GradientMonitor(check_freq=1, patience=min(patience, steps), verbose=0)
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
    import tensorflow as tf

    try:
        x, y = _load_data(args.data)
        model = _load_model(args.model)
        _check_model_takes(model, args.model, x, args.data)
        try:
            healthy, text = diagnose(
                model,
                x,
                y,
                steps=args.steps,
                batch_size=args.batch_size,
                patience=args.patience,
            )
        except (ValueError, TypeError, tf.errors.OpError) as error:
            # What Keras and TensorFlow raise for data a model cannot train on
            # (labels out of range, targets of the wrong shape for the loss).
            raise BadInput(
                f"the model cannot be trained on {args.data}: {_first_line(error)}"
            ) from None
    except BadInput as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    print(text, flush=True)
    return EXIT_HEALTHY if healthy else EXIT_UNHEALTHY
