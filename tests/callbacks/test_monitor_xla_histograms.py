"""`log10|g|` histograms of `GradientMonitor(log_dir=...)` under XLA.

The histogram counts run inside the compiled train step; they used
`bincount`, whose output length XLA cannot know when compiling, so
`jit_compile=True` failed at the first step.
"""

import functools
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_stability.callbacks import GradientMonitor
from keras_stability.callbacks.layer_gradient_stats import HISTOGRAM_RANGE
from keras_stability.callbacks.layer_gradient_stats import log10_abs_histogram


def _reference_indices(values, bins):
    """numpy: bin of each value over HISTOGRAM_RANGE, out of range at the ends."""
    lo, hi = HISTOGRAM_RANGE
    logs = np.log10(np.abs(values.astype(np.float32)) + np.float32(1e-30))
    idx = np.floor((logs - lo) / (hi - lo) * bins)
    return np.where(np.isnan(idx), bins - 1, np.clip(idx, 0, bins - 1)).astype("int32")


def _fixed_values():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(40, 25)) * 10.0 ** rng.uniform(-15, 7, size=(40, 25))
    values[0, :5] = 0.0  # log10(1e-30): below the range, first bin
    return values.astype("float32")


@pytest.mark.parametrize("bins", [1, 7, 30])
def test_histogram_counts_match_numpy_eager_graph_and_xla(bins):
    values = _fixed_values()
    idx = _reference_indices(values, bins).ravel()
    expected = np.bincount(idx, minlength=bins)
    assert expected.sum() == values.size
    # In-range values: numpy's own histogram gives the same counts.
    lo, hi = HISTOGRAM_RANGE
    with np.errstate(divide="ignore"):  # the zeros: -inf, below the range
        logs = np.log10(np.abs(values.ravel()))
    inside = (logs >= lo) & (logs < hi)
    assert 0 < inside.sum() < values.size
    np.testing.assert_array_equal(
        np.histogram(logs[inside], bins=np.linspace(lo, hi, bins + 1))[0],
        np.bincount(idx[inside], minlength=bins),
    )
    # The counts `bincount` gave before (it cannot run under XLA).
    old = keras.ops.bincount(tf.constant(idx), minlength=bins)
    np.testing.assert_array_equal(old.numpy(), expected)

    x = tf.constant(values)
    eager = log10_abs_histogram(x, bins)
    fn = functools.partial(log10_abs_histogram, bins=bins)
    graph = tf.function(fn)(x)
    xla = tf.function(fn, jit_compile=True)(x)
    for counts in (eager, graph, xla):
        assert counts.dtype == tf.float32 and counts.shape == (bins,)
        np.testing.assert_array_equal(counts.numpy(), expected)


def test_non_finite_values_count_in_the_last_bin():
    # A cast of nan to int32 is backend-defined (negative on CPU, which made
    # `bincount` raise in a plain graph): nan, like inf, goes to the last bin.
    x = tf.constant([np.nan, np.inf, -np.inf, 0.0, 1.0, -1e-13], tf.float32)
    expected = [2, 0, 0, 4]  # 0 and 1e-13 below the range; 1.0: log 0, bin 3
    for fn in (
        log10_abs_histogram,
        tf.function(log10_abs_histogram, jit_compile=True),
    ):
        np.testing.assert_array_equal(fn(x, 4).numpy(), expected)


def _read_histograms(log_dir):
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        os.path.join(log_dir, "gradients"), size_guidance={"tensors": 0}
    )
    acc.Reload()
    return {
        tag: [tf.make_ndarray(e.tensor_proto) for e in acc.Tensors(tag)]
        for tag in acc.Tags()["tensors"]
        if tag.startswith("log10_abs_grad/")
    }


def _tiny_model(jit_compile):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, activation="relu", name="hidden"),
            keras.layers.Dense(2, name="head"),
        ]
    )
    model.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=jit_compile)
    return model


def test_monitor_writes_histograms_under_jit_compile(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.normal(size=(16, 2)).astype("float32")
    model = _tiny_model(jit_compile=True)
    log_dir = str(tmp_path)
    monitor = GradientMonitor(check_freq=1, log_dir=log_dir, verbose=0)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[monitor])
    assert monitor.history["step"] == [1, 2]

    hists = _read_histograms(log_dir)
    assert set(hists) == {"log10_abs_grad/hidden", "log10_abs_grad/head"}
    sizes = {"hidden": 4 * 3 + 3, "head": 3 * 2 + 2}
    for name, size in sizes.items():
        events = hists[f"log10_abs_grad/{name}"]
        assert len(events) == 2  # one per check
        for buckets in events:
            assert buckets.shape == (30, 3)  # the default histogram_bins
            assert buckets[:, 2].sum() == size  # every gradient entry, once


def test_monitor_histogram_of_a_nan_step_without_xla(tmp_path):
    # A NaN gradient (a NaN input) with histograms used to raise in the
    # compiled (non-XLA) step: `bincount` of a negative index.
    x = np.ones((8, 4), "float32")
    x[0, 0] = np.nan
    y = np.zeros((8, 2), "float32")
    model = _tiny_model(jit_compile=False)
    log_dir = str(tmp_path)
    monitor = GradientMonitor(check_freq=1, log_dir=log_dir, verbose=0)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[monitor])
    buckets = _read_histograms(log_dir)["log10_abs_grad/hidden"][-1]
    assert buckets[:, 2].sum() == 4 * 3 + 3
    # At least the kernel row of the NaN feature is NaN: in the last bin.
    assert buckets[-1, 2] >= 3
    assert np.isnan(monitor.history["global_norm"][-1])


def _histograms_on_one_and_two_replicas():
    """Runs in a subprocess with 2 logical CPU devices."""
    import contextlib
    import tempfile

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.normal(size=(32, 2)).astype("float32")
    out = {}
    for replicas, scope in ((1, contextlib.nullcontext()), (2, strategy.scope())):
        with scope:
            model = _tiny_model(jit_compile=False)
        monitor = GradientMonitor(
            check_freq=2, log_dir=tempfile.mkdtemp(), histogram_bins=12, verbose=0
        )
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[monitor])
        out[replicas] = monitor.observer.read()["histograms"]
    return out


@pytest.mark.distributed
def test_histograms_same_on_two_replicas(two_cpu_devices):
    # (MirroredStrategy with jit_compile=True fails in Keras itself on
    # logical CPU devices, with or without the monitor: not tested here.)
    out = two_cpu_devices(_histograms_on_one_and_two_replicas)
    assert out[1].shape == (2, 12)
    np.testing.assert_array_equal(out[1].sum(axis=1), [4 * 3 + 3, 3 * 2 + 2])
    np.testing.assert_array_equal(out[2], out[1])
