"""Shared pieces for benchmark scripts: environment report and robust timing.

Every script in `benchmarks/` is run as `python -m benchmarks.<name>`, prints
a Markdown section (what it measured, a table, the command) and keeps its
work small enough for a 2-core CPU machine.
"""

import os
import platform
import statistics
import time


def environment():
    """One Markdown line naming the machine and package versions."""
    import keras
    import numpy
    import tensorflow as tf

    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, TensorFlow {tf.__version__}, Keras "
        f"{keras.__version__}, NumPy {numpy.__version__}"
    )


def summarize(values):
    """Median and spread (min..max) of a list of numbers, as a dict."""
    values = list(values)
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def median_ci(values, seed=0, resamples=2000):
    """Median and a 95% percentile-bootstrap interval of the median."""
    import numpy as np

    values = np.asarray(values, "float64")
    rng = np.random.default_rng(seed)
    medians = np.median(
        values[rng.integers(0, len(values), (resamples, len(values)))], axis=1
    )
    lo, hi = np.percentile(medians, [2.5, 97.5])
    return float(np.median(values)), float(lo), float(hi)


def fmt(stat, digits=3, unit=""):
    """`median (min..max)` text for a `summarize` result."""
    return (
        f"{stat['median']:.{digits}f}{unit} "
        f"({stat['min']:.{digits}f}..{stat['max']:.{digits}f}, n={stat['n']})"
    )


def alternate(runners, repeats):
    """Runs each zero-argument callable `repeats` times, interleaved.

    Interleaving (A, B, A, B, ...) in one process keeps drift of the machine's
    speed from favouring one side. Returns `{name: [seconds, ...]}`.
    """
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times
