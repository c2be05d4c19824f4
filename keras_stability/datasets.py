"""Small data sets that need no download: generated data, scikit-learn's digits
and text read from Python's standard library.

The demo, tests, notebooks and benchmarks use these. Nothing here touches the
network: the generated set is computed from a seed, the digits set ships
inside scikit-learn, and the texts (docstrings, source code) are read from the
running Python.
"""

import ast

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
    "STDLIB_CODE_MODULES",
    "STDLIB_TEXT_MODULES",
    "load_dataset",
    "load_digits",
    "load_fine_tuning_corpora",
    "load_stdlib_code",
    "load_stdlib_text",
    "make_char_lm_data",
    "make_classification",
    "make_seasonal_series",
    "mix_replay",
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


def make_seasonal_series(n_steps=12000, train_fraction=0.75, seed=0):
    """Generates a weather-like series for forecasting, standardized.

    keras.io's weather forecaster in small: a temperature with a slow season
    (period 6000 steps) and a daily cycle (period 144 steps, one step every
    10 minutes) plus noise, and the season itself as a second feature. Each
    feature is standardized with the mean and standard deviation of the
    first `train_fraction` of the steps, as the keras.io example standardizes
    with its training split. Read in order (as
    `keras.utils.timeseries_dataset_from_array` makes windows, unshuffled),
    the first windows sit where the season is mild and the later ones far
    from it: the loss of a healthy run rises several-fold with the data.

    Args:
        n_steps: Length of the series, an integer >= 2. Defaults to `12000`.
        train_fraction: Fraction of the steps, in `(0, 1]`, whose statistics
            standardize the series. Defaults to `0.75`.
        seed: Seed of the generator (a non-negative integer); the same seed
            gives the same series; `None` for fresh randomness. Defaults to
            `0`.

    Returns:
        Float32 array of shape `(n_steps, 2)`: temperature, season.

    Raises:
        ValueError: If `n_steps` is not an integer >= 2, `train_fraction` is
            not in `(0, 1]` or `seed` is not a non-negative integer or
            `None`.

    Example:

    >>> series = make_seasonal_series(n_steps=1000, seed=1)
    >>> series.shape, series.dtype
    ((1000, 2), dtype('float32'))
    """
    n_steps = check_int("n_steps", n_steps, low=2)
    train_fraction = check_number(
        "train_fraction", train_fraction, low=0.0, high=1.0, low_open=True
    )
    seed = _check_seed(seed)
    rng = np.random.default_rng(seed)
    t = np.arange(n_steps)
    season = np.sin(2 * np.pi * t / 6000.0)
    temp = (
        10 * season + 3 * np.sin(2 * np.pi * t / 144.0) + rng.standard_normal(n_steps)
    )
    features = np.stack([temp, season + 0.1 * rng.standard_normal(n_steps)], 1)
    train = features[: max(2, round(train_fraction * n_steps))]
    return ((features - train.mean(0)) / train.std(0)).astype("float32")


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


def _check_pair(name, pair):
    """`pair` as two arrays `(x, y)` of the same length, at least one sample."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise invalid(name, pair, "a pair `(x, y)` of arrays, samples first")
    x, y = np.asarray(pair[0]), np.asarray(pair[1])
    if x.ndim < 1 or y.ndim < 1 or len(x) < 1 or len(x) != len(y):
        raise invalid(
            name,
            f"(x of shape {x.shape}, y of shape {y.shape})",
            "a pair `(x, y)` of arrays with the same number of samples (at least 1)",
        )
    return x, y


def mix_replay(new, old, steps, replay_fraction=0.25, batch_size=32, seed=0):
    """Batches of a new task with a fixed share replayed from the old one.

    Fine-tuning on a new corpus makes a model forget the one it was
    pretrained on. Replay (rehearsal, as in the continual pretraining of
    language models) mixes a share of the old data into every batch. In
    `benchmarks/fine_tuning.py` (char LM pretrained on docstrings, fine-tuned
    on code, 3 seeds) 25% of every batch from the docstrings ends at +1.4%
    code perplexity over plain fine-tuning and raises the docstrings'
    perplexity by 2.2% over the pretrained model's, against +71.6% without
    replay.

    Each of the `steps` batches holds `batch_size - k` samples of `new`
    followed by `k = round(replay_fraction * batch_size)` samples of `old`.
    Each set is drawn without replacement, in a new random order on every
    pass over it. The dataset repeats those `steps` batches, so pass
    `steps_per_epoch` to `fit`.

    Args:
        new: `(x, y)` arrays of the new task, samples first.
        old: `(x, y)` arrays of the old task, with the shapes of `new` after
            the sample axis.
        steps: Number of different batches (e.g. the fine-tuning's steps), a
            positive integer.
        replay_fraction: Share of every batch taken from `old`, in [0, 1);
            at least one sample of `new` must remain. Defaults to `0.25`.
        batch_size: Samples per batch, a positive integer. Defaults to `32`.
        seed: Seed of the draws, a non-negative integer or `None`.
            Defaults to `0`.

    Returns:
        A `tf.data.Dataset` of `(x, y)` batches, repeated indefinitely.

    Example:

    ```python
    corpora = load_fine_tuning_corpora()
    code, prose = corpora["finetune"], corpora["pretrain"]
    data = mix_replay((code["x_train"], code["y_train"]),
                      (prose["x_train"], prose["y_train"]), steps=300)
    model.fit(data, epochs=4, steps_per_epoch=75)
    ```
    """
    import tensorflow as tf

    new = _check_pair("new", new)
    old = _check_pair("old", old)
    steps = check_positive_int("steps", steps)
    replay_fraction = check_number(
        "replay_fraction", replay_fraction, low=0.0, high=1.0, high_open=True
    )
    batch_size = check_positive_int("batch_size", batch_size)
    seed = _check_seed(seed)
    for i, part in enumerate(("x", "y")):
        if new[i].shape[1:] != old[i].shape[1:]:
            raise invalid(
                "old",
                f"{part} of shape {old[i].shape}",
                f"{part} of the shape of `new`'s after the sample axis "
                f"({new[i].shape[1:]})",
            )
    n_old = int(round(replay_fraction * batch_size))
    n_new = batch_size - n_old
    if n_new < 1:
        raise invalid(
            "replay_fraction",
            replay_fraction,
            f"a share that leaves at least one sample of `new` in a batch of "
            f"{batch_size}",
        )
    rng = np.random.default_rng(seed)
    parts = []
    for (x, y), k in ((new, n_new), (old, n_old)):
        if k == 0:
            continue
        n = len(x)
        passes = -(-steps * k // n)
        idx = np.concatenate([rng.permutation(n) for _ in range(passes)])[: steps * k]
        parts.append(
            (
                x[idx].reshape(steps, k, *x.shape[1:]),
                y[idx].reshape(steps, k, *y.shape[1:]),
            )
        )
    x = np.concatenate([p[0] for p in parts], axis=1)
    y = np.concatenate([p[1] for p in parts], axis=1)
    x = x.reshape(steps * batch_size, *x.shape[2:])
    y = y.reshape(steps * batch_size, *y.shape[2:])
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).repeat()


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


def _import_modules(modules):
    import importlib

    if (
        isinstance(modules, str)
        or not isinstance(modules, (list, tuple))
        or not modules
        or not all(isinstance(m, str) and m for m in modules)
    ):
        raise invalid("modules", modules, "a non-empty list or tuple of module names")
    loaded = []
    for module_name in modules:
        try:
            loaded.append(importlib.import_module(module_name))
        except ImportError:
            raise invalid(
                "modules", modules, f"importable module names ({module_name!r} is not)"
            ) from None
    return loaded


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
    import inspect

    loaded = _import_modules(modules)
    max_chars = check_positive_int("max_chars", max_chars, allow_none=True)
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


def make_char_lm_data(text, seq_len=64, held_out_fraction=0.1, vocab=None):
    """Turns text into next-character prediction windows.

    The last `held_out_fraction` of the text is held out (no window crosses
    the split). Windows do not overlap.

    Args:
        text: The corpus.
        seq_len: Characters per window. Defaults to `64`.
        held_out_fraction: Fraction of the text held out, in (0, 1).
            Defaults to `0.1`.
        vocab: Characters to encode with (index -> character), e.g. one
            vocabulary shared by two corpora; it must hold every character
            of `text`. Defaults to `None` (the sorted characters of `text`).

    Returns:
        Dict with `"vocab"` (list of characters), `"x_train"`,
        `"y_train"`, `"x_test"`, `"y_test"` (int32 arrays of shape
        `(n, seq_len)`; `y` is `x` shifted by one character).

    Raises:
        ValueError: If `text` is not a string long enough for one window in
            each part, `vocab` is not a list of distinct characters covering
            `text`, or `seq_len` or `held_out_fraction` is invalid.
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
    if vocab is None:
        vocab = sorted(set(text))
    else:
        if (
            not isinstance(vocab, (list, tuple))
            or not vocab
            or not all(isinstance(c, str) and len(c) == 1 for c in vocab)
            or len(set(vocab)) != len(vocab)
        ):
            raise invalid("vocab", vocab, "a list of distinct characters, or `None`")
        missing = sorted(set(text) - set(vocab))
        if missing:
            raise invalid(
                "vocab",
                f"{len(vocab)} characters",
                f"every character of `text` ({len(missing)} missing, e.g. "
                f"{missing[0]!r})",
            )
        vocab = list(vocab)
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


# Standard-library modules whose code (docstrings removed) makes the
# fine-tuning corpus; none is in `STDLIB_TEXT_MODULES`.
STDLIB_CODE_MODULES = (
    "ast",
    "base64",
    "copy",
    "fnmatch",
    "getopt",
    "glob",
    "graphlib",
    "gzip",
    "numbers",
    "operator",
    "pprint",
    "queue",
    "sched",
    "selectors",
    "shlex",
    "tokenize",
    "types",
    "uuid",
)


def load_stdlib_code(modules=STDLIB_CODE_MODULES, max_chars=None):
    """Reads Python code from the source of standard-library modules.

    Each module's source is parsed and printed back with `ast.unparse`
    without its docstrings (and so without comments), so the text is code
    only: none of the English of `load_stdlib_text`. About 215,000
    characters with the default modules (it varies a little with the Python
    version).

    Args:
        modules: Names of pure-Python standard-library modules to read.
            Defaults to `STDLIB_CODE_MODULES`.
        max_chars: Keep only the first `max_chars` characters.
            Defaults to `None` (all).

    Returns:
        The code, a `str`.

    Raises:
        ValueError: If `modules` is not a non-empty list of importable module
            names with Python source, or `max_chars` is not a positive
            integer or `None`.

    Example:

    >>> code = load_stdlib_code(["copy"], max_chars=2000)
    >>> "def " in code
    True
    """
    import inspect

    loaded = _import_modules(modules)
    max_chars = check_positive_int("max_chars", max_chars, allow_none=True)
    parts = []
    for module in loaded:
        try:
            source = inspect.getsource(module)
        except (OSError, TypeError):
            raise invalid(
                "modules",
                modules,
                f"modules with Python source ({module.__name__!r} has none)",
            ) from None
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(
                node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
            ) and _starts_with_docstring(node):
                node.body = node.body[1:] or [ast.Pass()]
        parts.append(ast.unparse(tree))
    text = "\n\n".join(parts)
    return text[:max_chars] if max_chars else text


def _starts_with_docstring(node):
    first = node.body[0] if node.body else None
    return (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    )


def load_fine_tuning_corpora(seq_len=64, held_out_fraction=0.1, max_chars=None):
    """Two corpora with one character vocabulary: docstrings, then code.

    The pretraining corpus is English prose (`load_stdlib_text`), the
    fine-tuning corpus is Python code without docstrings from other modules
    (`load_stdlib_code`): the character distributions differ (code has more
    brackets, `=`, `_`, newlines and indentation, fewer capitals and full
    stops), so a model fine-tuned on code can forget prose, and the
    pretraining corpus' held-out perplexity measures that forgetting. Both
    are encoded with the sorted union of their characters. Read from the
    running Python, no network.

    Args:
        seq_len: Characters per window. Defaults to `64`.
        held_out_fraction: Fraction of each corpus held out, in (0, 1).
            Defaults to `0.1`.
        max_chars: Keep only the first `max_chars` characters of each corpus.
            Defaults to `None` (all).

    Returns:
        Dict with `"vocab"` (the shared sorted list of characters),
        `"pretrain"` and `"finetune"` (each the dict of `make_char_lm_data`
        with that vocab: `"x_train"`, `"y_train"`, `"x_test"`, `"y_test"`)
        and `"texts"` (`{"pretrain": str, "finetune": str}`).

    Raises:
        ValueError: If an argument is invalid, e.g. a `max_chars` too short
            for one window of `seq_len` in each part.

    Example:

    >>> corpora = load_fine_tuning_corpora(seq_len=32, max_chars=5000)
    >>> corpora["pretrain"]["x_train"].shape[1], corpora["finetune"]["x_test"].shape[1]
    (32, 32)
    """
    seq_len = check_positive_int("seq_len", seq_len)
    held_out_fraction = check_number(
        "held_out_fraction",
        held_out_fraction,
        low=0.0,
        high=1.0,
        low_open=True,
        high_open=True,
    )
    max_chars = check_positive_int("max_chars", max_chars, allow_none=True)
    texts = {
        "pretrain": load_stdlib_text(max_chars=max_chars),
        "finetune": load_stdlib_code(max_chars=max_chars),
    }
    vocab = sorted(set(texts["pretrain"]) | set(texts["finetune"]))
    corpora = {"vocab": vocab, "texts": texts}
    for name, text in texts.items():
        try:
            corpora[name] = make_char_lm_data(
                text, seq_len=seq_len, held_out_fraction=held_out_fraction, vocab=vocab
            )
        except ValueError:
            # The culprit is the cut if there is one, else the window length.
            name_, value = (
                ("max_chars", max_chars) if max_chars else ("seq_len", seq_len)
            )
            raise invalid(
                name_,
                value,
                f"enough characters for one window of seq_len={seq_len} in "
                "the training and held-out parts of each corpus",
            ) from None
    return corpora
