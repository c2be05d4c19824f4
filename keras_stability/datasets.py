"""Small data sets that need no download: generated data and scikit-learn's digits.

The demo, tests, notebooks and benchmarks use these. Nothing here touches the
network: the generated set is computed from a seed, and the digits set ships
inside scikit-learn.
"""

import numpy as np

from keras_stability._checks import check_choice
from keras_stability._checks import check_int
from keras_stability._checks import check_nonnegative_int
from keras_stability._checks import check_number
from keras_stability._checks import check_positive_int
from keras_stability._checks import check_str
from keras_stability._checks import invalid

__all__ = [
    "DATASETS",
    "STDLIB_TEXT_MODULES",
    "load_dataset",
    "load_digits",
    "load_stdlib_text",
    "make_char_lm_data",
    "make_classification",
    "train_test_split",
]

DATASETS = ("synthetic", "digits")


def _check_seed(seed):
    return check_nonnegative_int("seed", seed, allow_none=True)


def make_classification(
    n_samples=2000,
    n_features=10,
    n_classes=10,
    clusters_per_class=2,
    class_sep=1.2,
    seed=0,
):
    """Generates a deterministic classification problem.

    Each class is a mixture of `clusters_per_class` Gaussian blobs with unit
    variance whose centres are drawn from `N(0, class_sep**2)` in every
    feature. With two blobs per class the classes are not linearly separable,
    so hidden layers help; with the defaults the Keras example reaches about
    80% test accuracy after 10 epochs against 10% chance.

    Args:
        n_samples: Number of samples. Defaults to `2000`.
        n_features: Number of features. Defaults to `10`.
        n_classes: Number of classes. Defaults to `10`.
        clusters_per_class: Gaussian blobs per class. Defaults to `2`.
        class_sep: Standard deviation of the blob centres; larger is easier.
            Defaults to `1.2`.
        seed: Seed of the generator (a non-negative integer); the same seed
            gives the same data; `None` for fresh randomness. Defaults to `0`.

    Returns:
        Tuple `(x, y)`: `x` float32 of shape `(n_samples, n_features)`,
        `y` int32 labels of shape `(n_samples,)`, classes balanced.

    Raises:
        ValueError: If a count is not a positive integer, `n_classes` is
            below 2, `class_sep` is not positive or `seed` is not a
            non-negative integer or `None`.

    Example:

    >>> x, y = make_classification(n_samples=100, seed=1)
    >>> x.shape, y.shape
    ((100, 10), (100,))
    """
    n_samples = check_positive_int("n_samples", n_samples)
    n_features = check_positive_int("n_features", n_features)
    n_classes = check_int("n_classes", n_classes, low=2)
    clusters_per_class = check_positive_int("clusters_per_class", clusters_per_class)
    class_sep = check_number("class_sep", class_sep, low=0.0, low_open=True)
    seed = _check_seed(seed)
    rng = np.random.default_rng(seed)
    n_clusters = n_classes * clusters_per_class
    centers = rng.normal(0.0, class_sep, size=(n_clusters, n_features))
    y = np.arange(n_samples) % n_classes
    cluster = y * clusters_per_class + rng.integers(0, clusters_per_class, n_samples)
    x = centers[cluster] + rng.normal(0.0, 1.0, size=(n_samples, n_features))
    order = rng.permutation(n_samples)
    return x[order].astype("float32"), y[order].astype("int32")


def load_digits():
    """Loads scikit-learn's bundled 8x8 digits (1797 samples, 64 features).

    Pixel values are scaled to [0, 1].

    Returns:
        Tuple `(x, y)`: `x` float32 `(1797, 64)`, `y` int32 `(1797,)`.

    Raises:
        ImportError: If scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The digits data set needs scikit-learn: `pip install scikit-learn`."
        ) from e
    digits = sk_load_digits()
    return (digits.data / 16.0).astype("float32"), digits.target.astype("int32")


def train_test_split(x, y, test_fraction=0.2, seed=0):
    """Splits arrays into a shuffled train and test part, deterministically.

    Args:
        x: Features, first axis is the sample axis (at least 2 samples).
        y: Labels with the same first dimension.
        test_fraction: Fraction of samples held out, in (0, 1).
            Defaults to `0.2`.
        seed: Seed of the shuffle, a non-negative integer or `None`.
            Defaults to `0`.

    Returns:
        `((x_train, y_train), (x_test, y_test))`.

    Raises:
        ValueError: If `x` or `y` is not an array of at least 2 samples,
            their lengths differ, or `test_fraction` or `seed` is invalid.
    """
    test_fraction = check_number(
        "test_fraction", test_fraction, low=0.0, high=1.0, low_open=True, high_open=True
    )
    seed = _check_seed(seed)
    x, y = np.asarray(x), np.asarray(y)
    for name, value in (("x", x), ("y", y)):
        if value.ndim < 1 or len(value) < 2 or value.dtype == object:
            raise invalid(
                name,
                value if value.ndim < 1 else f"array of shape {value.shape}",
                "an array of at least 2 samples (samples first)",
            )
    if len(x) != len(y):
        raise invalid(
            "y", f"array of shape {y.shape}", f"as many samples as `x` ({len(x)})"
        )
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = max(1, int(round(len(x) * test_fraction)))
    test, train = order[:n_test], order[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def load_dataset(name="synthetic", seed=0, test_fraction=0.2):
    """Loads one of `DATASETS` already split into train and test.

    Args:
        name: `"synthetic"` (10 features, 10 classes, generated) or
            `"digits"` (scikit-learn's digits, 64 features, 10 classes).
            Defaults to `"synthetic"`.
        seed: Seed of the generator and of the split. Defaults to `0`.
        test_fraction: Held-out fraction, in (0, 1). Defaults to `0.2`.

    Returns:
        `((x_train, y_train), (x_test, y_test))`.

    Raises:
        ValueError: If `name` is not one of `DATASETS`, or `seed` or
            `test_fraction` is invalid.
    """
    name = check_choice("name", name, DATASETS)
    seed = _check_seed(seed)
    test_fraction = check_number(
        "test_fraction", test_fraction, low=0.0, high=1.0, low_open=True, high_open=True
    )
    if name == "synthetic":
        x, y = make_classification(seed=seed)
    else:
        x, y = load_digits()
    return train_test_split(x, y, test_fraction=test_fraction, seed=seed)


# Standard-library modules whose docstrings make the text corpus. The text is
# read at run time from the running Python, so nothing is downloaded.
STDLIB_TEXT_MODULES = (
    "argparse",
    "bisect",
    "calendar",
    "collections",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "itertools",
    "json",
    "logging",
    "os",
    "pathlib",
    "random",
    "re",
    "shutil",
    "statistics",
    "string",
    "tempfile",
    "textwrap",
    "typing",
    "unittest",
)


def load_stdlib_text(modules=STDLIB_TEXT_MODULES, max_chars=None):
    """Reads English text from the docstrings of Python's standard library.

    For each module: its own docstring, then the docstrings of its public
    classes and functions defined there, in name order, joined by blank
    lines. About 190,000 characters with the default modules (it varies a
    little with the Python version).

    Args:
        modules: Names of standard-library modules to read.
            Defaults to `STDLIB_TEXT_MODULES`.
        max_chars: Keep only the first `max_chars` characters.
            Defaults to `None` (all).

    Returns:
        The text, a `str`.

    Raises:
        ValueError: If `modules` is not a non-empty list of importable module
            names, or `max_chars` is not a positive integer or `None`.
    """
    import importlib
    import inspect

    if (
        isinstance(modules, str)
        or not isinstance(modules, (list, tuple))
        or not modules
        or not all(isinstance(m, str) and m for m in modules)
    ):
        raise invalid("modules", modules, "a non-empty list or tuple of module names")
    max_chars = check_positive_int("max_chars", max_chars, allow_none=True)
    loaded = []
    for module_name in modules:
        try:
            loaded.append(importlib.import_module(module_name))
        except ImportError:
            raise invalid(
                "modules", modules, f"importable module names ({module_name!r} is not)"
            ) from None
    docs = []
    for module in loaded:
        docs.append(inspect.getdoc(module) or "")
        for name, obj in sorted(vars(module).items()):
            if (
                name.startswith("_")
                or getattr(obj, "__module__", None) != module.__name__
            ):
                continue
            doc = inspect.getdoc(obj)
            if doc:
                docs.append(doc)
    text = "\n\n".join(d for d in docs if d)
    return text[:max_chars] if max_chars else text


def make_char_lm_data(text, seq_len=64, held_out_fraction=0.1):
    """Turns text into next-character prediction windows.

    The last `held_out_fraction` of the text is held out (no window crosses
    the split). Windows do not overlap.

    Args:
        text: The corpus.
        seq_len: Characters per window. Defaults to `64`.
        held_out_fraction: Fraction of the text held out, in (0, 1).
            Defaults to `0.1`.

    Returns:
        Dict with `"vocab"` (sorted list of characters), `"x_train"`,
        `"y_train"`, `"x_test"`, `"y_test"` (int32 arrays of shape
        `(n, seq_len)`; `y` is `x` shifted by one character).

    Raises:
        ValueError: If `text` is not a string long enough for one window in
            each part, or `seq_len` or `held_out_fraction` is invalid.
    """
    text = check_str("text", text)
    seq_len = check_positive_int("seq_len", seq_len)
    held_out_fraction = check_number(
        "held_out_fraction",
        held_out_fraction,
        low=0.0,
        high=1.0,
        low_open=True,
        high_open=True,
    )
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = np.array([index[c] for c in text], dtype="int32")
    split = int(len(ids) * (1 - held_out_fraction))

    def windows(part):
        n = (len(part) - 1) // seq_len
        if n < 1:
            raise invalid(
                "text",
                f"a text of {len(text)} characters",
                f"a text long enough for one window of seq_len={seq_len} in "
                f"both parts (a part has {len(part)} characters; use more text "
                "or a shorter `seq_len`)",
            )
        x = part[: n * seq_len].reshape(n, seq_len)
        y = part[1 : n * seq_len + 1].reshape(n, seq_len)
        return x, y

    x_train, y_train = windows(ids[:split])
    x_test, y_test = windows(ids[split:])
    return {
        "vocab": vocab,
        "x_train": x_train,
        "y_train": y_train,
        "x_test": x_test,
        "y_test": y_test,
    }
