"""Small data sets that need no download: generated data and scikit-learn's digits.

The demo, tests, notebooks and benchmarks use these. Nothing here touches the
network: the generated set is computed from a seed, and the digits set ships
inside scikit-learn.
"""

import numpy as np

DATASETS = ("synthetic", "digits")


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
        seed: Seed of the generator; the same seed gives the same data.
            Defaults to `0`.

    Returns:
        Tuple `(x, y)`: `x` float32 of shape `(n_samples, n_features)`,
        `y` int32 labels of shape `(n_samples,)`, classes balanced.

    Raises:
        ValueError: If a count is not a positive integer or `class_sep` is
            not positive.

    Example:

    >>> x, y = make_classification(n_samples=100, seed=1)
    >>> x.shape, y.shape
    ((100, 10), (100,))
    """
    for name, value in (
        ("n_samples", n_samples),
        ("n_features", n_features),
        ("n_classes", n_classes),
        ("clusters_per_class", clusters_per_class),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(
                f"Invalid value for argument `{name}`. Expected a positive "
                f"integer. Received: {name}={value!r}"
            )
    if n_classes < 2:
        raise ValueError(
            "Invalid value for argument `n_classes`. Expected an integer >= 2. "
            f"Received: n_classes={n_classes!r}"
        )
    if not class_sep > 0:
        raise ValueError(
            "Invalid value for argument `class_sep`. Expected a positive number. "
            f"Received: class_sep={class_sep!r}"
        )
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
        x: Features, first axis is the sample axis.
        y: Labels with the same first dimension.
        test_fraction: Fraction of samples held out, in (0, 1).
            Defaults to `0.2`.
        seed: Seed of the shuffle. Defaults to `0`.

    Returns:
        `((x_train, y_train), (x_test, y_test))`.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(
            "Invalid value for argument `test_fraction`. Expected a number in "
            f"(0, 1). Received: test_fraction={test_fraction!r}"
        )
    x, y = np.asarray(x), np.asarray(y)
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
        test_fraction: Held-out fraction. Defaults to `0.2`.

    Returns:
        `((x_train, y_train), (x_test, y_test))`.

    Raises:
        ValueError: If `name` is not one of `DATASETS`.
    """
    if name == "synthetic":
        x, y = make_classification(seed=seed)
    elif name == "digits":
        x, y = load_digits()
    else:
        raise ValueError(
            "Invalid value for argument `name`. Expected one of "
            f"{', '.join(repr(d) for d in DATASETS)}. Received: name={name!r}"
        )
    return train_test_split(x, y, test_fraction=test_fraction, seed=seed)


# Standard-library modules whose docstrings make the text corpus. The text is
# read at run time from the running Python, so nothing is downloaded.
STDLIB_TEXT_MODULES = (
    "argparse", "bisect", "calendar", "collections", "contextlib", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions",
    "functools", "heapq", "itertools", "json", "logging", "os", "pathlib",
    "random", "re", "shutil", "statistics", "string", "tempfile", "textwrap",
    "typing", "unittest",
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
    """
    import importlib
    import inspect

    docs = []
    for module_name in modules:
        module = importlib.import_module(module_name)
        docs.append(inspect.getdoc(module) or "")
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
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
    """
    if not 0 < held_out_fraction < 1:
        raise ValueError(
            "Invalid value for argument `held_out_fraction`. Expected a number in "
            f"(0, 1). Received: held_out_fraction={held_out_fraction!r}"
        )
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(
            "Invalid value for argument `seq_len`. Expected a positive integer. "
            f"Received: seq_len={seq_len!r}"
        )
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = np.array([index[c] for c in text], dtype="int32")
    split = int(len(ids) * (1 - held_out_fraction))

    def windows(part):
        n = (len(part) - 1) // seq_len
        if n < 1:
            raise ValueError(
                f"Text too short for `seq_len={seq_len}`: a part has {len(part)} "
                "characters. Use more text or a shorter `seq_len`."
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
