"""Property tests of the pure clipping cores."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keras_stability import clipping
from keras_stability.clipping import clip_by_global_norm
from keras_stability.clipping import global_norm
from keras_stability.clipping import is_finite

_floats = st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False, width=32)
_grad_lists = st.lists(
    hnp.arrays(
        "float32",
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=4),
        elements=_floats,
    ),
    min_size=1,
    max_size=4,
)


def _norm(arrays):
    return float(np.sqrt(sum(np.sum(a.astype("float64") ** 2) for a in arrays)))


@settings(max_examples=25, deadline=None)
@given(grads=_grad_lists, max_norm=st.floats(1e-3, 1e3))
def test_clip_by_global_norm_properties(grads, max_norm):
    clipped, norm = clip_by_global_norm(
        [keras.ops.convert_to_tensor(g) for g in grads], max_norm
    )
    clipped = [np.asarray(c) for c in clipped]
    before = _norm(grads)
    assert float(norm) == pytest.approx(before, rel=1e-4, abs=1e-5)
    after = _norm(clipped)
    assert after <= max_norm * (1 + 1e-5) + 1e-6
    if before <= max_norm:
        for g, c in zip(grads, clipped, strict=True):
            np.testing.assert_array_equal(g, c)  # untouched
    else:
        assert after == pytest.approx(max_norm, rel=1e-4)
        # Direction preserved: one positive factor for every entry.
        flat_g = np.concatenate([g.ravel() for g in grads])
        flat_c = np.concatenate([c.ravel() for c in clipped])
        np.testing.assert_allclose(
            flat_c, flat_g * (max_norm / before), rtol=1e-4, atol=1e-6
        )


@settings(max_examples=15, deadline=None)
@given(
    grads=_grad_lists, bad=st.sampled_from([np.nan, np.inf, -np.inf]), data=st.data()
)
def test_nonfinite_inputs_are_reported(grads, bad, data):
    index = data.draw(st.integers(0, len(grads) - 1))
    grads[index].ravel()[0] = bad
    tensors = [keras.ops.convert_to_tensor(g) for g in grads]
    assert not bool(is_finite(tensors))
    assert not np.isfinite(float(global_norm(tensors)))
    # The clip itself leaves the gradients alone (no NaN spreading); the
    # optimizer is what skips the step.
    clipped, _ = clip_by_global_norm(tensors, 1.0)
    for g, c in zip(grads, clipped, strict=True):
        np.testing.assert_array_equal(g, np.asarray(c))


def test_none_entries_are_kept():
    clipped, norm = clip_by_global_norm([None, keras.ops.ones((2,)) * 3.0], 1.0)
    assert clipped[0] is None
    assert float(norm) == pytest.approx(np.sqrt(18))


@settings(max_examples=30, deadline=None)
@given(
    values=hnp.arrays(
        "float32", st.integers(1, 12), elements=st.floats(0, 100, width=32)
    ),
    percentile=st.floats(0.5, 100.0),
)
def test_masked_percentile_matches_numpy(values, percentile):
    buffer = np.concatenate([values, np.full(5, 7e3, "float32")])
    got = float(clipping.masked_percentile(buffer, len(values), percentile))
    assert got == pytest.approx(
        float(np.percentile(values, percentile)), rel=1e-5, abs=1e-5
    )


def _zclip_reference(norms, alpha, z_thr, warmup, max_norm=None, eps=1e-6):
    buffer, mean, var, out = [], None, None, []
    for g in norms:
        cap = np.inf if max_norm is None else max_norm
        if mean is None:
            buffer.append(g)
            if len(buffer) == warmup:
                mean = sum(buffer) / warmup
                var = sum((b - mean) ** 2 for b in buffer) / warmup
            out.append(cap)
            continue
        std = var**0.5
        z = (g - mean) / (std + eps)
        if z > z_thr:
            threshold = mean + z_thr**2 * std / z
            effective = threshold
        else:
            threshold = mean + z_thr * std
            effective = g
        out.append(min(threshold, cap))
        mean = alpha * mean + (1 - alpha) * effective
        var = alpha * var + (1 - alpha) * (effective - mean) ** 2
    return out, mean, var


def test_zclip_step_matches_formula_on_recorded_norms():
    rng = np.random.default_rng(0)
    norms = list(1.0 + 0.1 * rng.normal(size=30))
    norms[12], norms[20] = 5.0, 3.0  # spikes
    expected, mean_ref, var_ref = _zclip_reference(norms, 0.9, 2.0, 5, max_norm=4.0)
    mean = var = np.float32(0)
    count = np.int32(0)
    got = []
    for g in norms:
        threshold, (mean, var, count) = clipping.zclip_step(
            np.float32(g), mean, var, count, 5, 0.9, 2.0, max_norm=4.0
        )
        got.append(float(threshold))
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert float(mean) == pytest.approx(mean_ref, rel=1e-4)
    assert float(var) == pytest.approx(var_ref, rel=1e-3)
    assert got[12] < norms[12] and got[20] < norms[20]  # spikes clipped


def test_unitwise_norm_reduces_all_axes_but_last():
    rng = np.random.default_rng(1)
    dense = rng.normal(size=(3, 5)).astype("float32")
    conv = rng.normal(size=(2, 2, 3, 4)).astype("float32")
    bias = rng.normal(size=(4,)).astype("float32")
    np.testing.assert_allclose(
        np.asarray(clipping.unitwise_norm(dense)),
        np.sqrt((dense**2).sum(axis=0, keepdims=True)),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        np.asarray(clipping.unitwise_norm(conv)),
        np.sqrt((conv**2).sum(axis=(0, 1, 2), keepdims=True)),
        rtol=1e-5,
    )
    assert np.asarray(clipping.unitwise_norm(conv)).shape == (1, 1, 1, 4)
    np.testing.assert_allclose(
        np.asarray(clipping.unitwise_norm(bias)), [np.linalg.norm(bias)], rtol=1e-5
    )


def test_adaptive_clip_limits_each_output_unit():
    w = np.array([[3.0, 0.1], [4.0, 0.1]], "float32")  # unit norms 5, ~0.141
    g = np.array([[1.0, 1.0], [0.0, 1.0]], "float32")  # unit norms 1, ~1.414
    (out,), clipped = clipping.adaptive_clip([g], [w], clip_factor=0.5, epsilon=1e-3)
    out = np.asarray(out)
    np.testing.assert_array_equal(out[:, 0], g[:, 0])  # 1 <= 0.5 * 5: untouched
    np.testing.assert_allclose(
        np.linalg.norm(out[:, 1]), 0.5 * np.linalg.norm(w[:, 1]), rtol=1e-5
    )
    assert bool(clipped)


def test_agc_skips_vectors_and_final_layer():
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4),
            keras.layers.LayerNormalization(),
            keras.layers.Dense(2),
        ]
    )
    agc = clipping.AGC(clip_factor=0.01)
    agc.build(None, model.trainable_variables)
    applies = {v.path: agc.applies_to(v) for v in model.trainable_variables}
    assert [p for p, a in applies.items() if a] == [model.layers[0].kernel.path]
    keep_all = clipping.AGC(exclude_vectors=False, exclude_final_layer=False)
    keep_all.build(None, model.trainable_variables)
    assert all(keep_all.applies_to(v) for v in model.trainable_variables)


def test_spike_step_reference():
    rng = np.random.default_rng(2)
    window = 6
    history = np.zeros(window, "float32")
    count = np.int32(0)
    consecutive = np.int32(0)
    accepted = []
    norms = list(1 + 0.05 * rng.normal(size=8)) + [9.0, 9.0, 9.0, 1.0]
    flags = []
    for n in norms:
        spike, (history, count, consecutive) = clipping.spike_step(
            np.float32(n), history, count, consecutive, 4.0, 4, 2
        )
        recent = np.array(accepted[-window:])
        outlier = len(recent) >= 4 and n > recent.mean() + 4.0 * recent.std(ddof=1)
        expected = outlier and flags[-2:] != [True, True]
        assert bool(spike) == bool(expected), n
        flags.append(bool(spike))
        if not bool(spike):
            accepted.append(n)
    # Two spikes skipped, the third in a row accepted (max_consecutive=2).
    assert flags[8:] == [True, True, False, False]


def _robust_reference(
    norms,
    window,
    z,
    min_samples,
    max_consecutive,
    min_ratio,
    early_ratio=None,
    peak_ratio=None,
):
    """`robust_spike_step`'s flags computed in NumPy, step by step."""
    accepted, flags = [], []
    for n in norms:
        logs = np.log(np.array(accepted[-window:], "float64"))
        spike = False
        if early_ratio and 4 <= len(logs) < min_samples and n > 0:
            ordered = np.sort(logs)
            reference = max(ordered[(len(ordered) - 1) // 2], logs[0])
            spike = np.log(n) - reference > np.log(early_ratio)
        if len(logs) >= min_samples and n > 0:
            ordered = np.sort(logs)
            k = len(ordered) - 1
            low, center, high = ordered[[k // 4, k // 2, 3 * k // 4]]
            spread = (high - low) / 1.349
            spike = np.log(n) - center > max(z * spread, np.log(min_ratio))
        if peak_ratio and accepted:
            spike = spike and n > peak_ratio * max(accepted)
        spike = spike and flags[-max_consecutive:] != [True] * max_consecutive
        flags.append(bool(spike))
        if not spike and n > 0:
            accepted.append(n)
    return flags


def test_robust_spike_step_reference():
    """Median and IQR of the logs, the ratio floor, `min_samples` and
    `max_consecutive`, against NumPy; heavy-tailed noise is not a spike."""
    rng = np.random.default_rng(3)
    window, min_samples = 32, 20
    # Log-normal noise with a wide spread (batch-1 gradients), then spikes.
    noise = list(np.exp(1.5 * rng.normal(size=60)))
    norms = (
        [500.0]  # huge, but before `min_samples`: never a spike
        + noise[:30]
        + [1e6, 1e6, 1e6, 1e6]  # three skipped, the fourth accepted
        + noise[30:]
        + [0.0, 3.0]
    )
    history = np.zeros(window, "float32")
    count, consecutive = np.int32(0), np.int32(0)
    flags = []
    for n in norms:
        spike, (history, count, consecutive) = clipping.robust_spike_step(
            np.float32(n), history, count, consecutive, 6.0, min_samples, 3, 10.0
        )
        flags.append(bool(spike))
    expected = _robust_reference(norms, window, 6.0, min_samples, 3, 10.0)
    assert flags == expected
    assert flags[0] is False
    assert flags[31:35] == [True, True, True, False]
    # The log-normal noise (norms ~1000x apart) is never one.
    assert sum(flags) == 3 and max(noise) / min(noise) > 1000
    assert int(count) == len(norms) - 3 - 1  # spikes and the zero norm unrecorded


@pytest.mark.parametrize("early_ratio", [None, 100.0])
def test_robust_spike_step_early_ratio(early_ratio):
    """Before `min_samples`: with `early_ratio`, a norm that many times the
    median of at least 4 recorded ones and the first one is a spike;
    without, nothing is. (Batch 1: the median of well-fit samples' norms is
    ~0, and a misfit sample's norm, like the first, is no spike.)"""
    norms = [1.0, 300.0, 1.2, 0.9, 1.1, 50.0, 300.0, 1.0, 1.3]
    batch_1 = [4.5, 0.01, 0.02, 0.002, 0.01, 3.5, 0.01, 6.0]
    history = np.zeros(16, "float32")
    count, consecutive = np.int32(0), np.int32(0)
    flags = []
    for n in norms:
        spike, (history, count, consecutive) = clipping.robust_spike_step(
            np.float32(n), history, count, consecutive, 6.0, 10, 3, 10.0, early_ratio
        )
        flags.append(bool(spike))
    assert flags == _robust_reference(norms, 16, 6.0, 10, 3, 10.0, early_ratio)
    # 300 at step 2 (1 recorded) is never judged; 50 (~40x) is under 100x.
    expected = [False] * 6 + [early_ratio is not None] + [False] * 2
    assert flags == expected
    history = np.zeros(16, "float32")
    count, consecutive = np.int32(0), np.int32(0)
    for n in batch_1:  # 3.5 and 6.0 are 350x and 600x the median
        spike, (history, count, consecutive) = clipping.robust_spike_step(
            np.float32(n), history, count, consecutive, 6.0, 10, 3, 10.0, early_ratio
        )
        assert not bool(spike), n


def _robust_flags(norms, window, min_samples, peak_ratio, early_ratio=100.0):
    history = np.zeros(window, "float32")
    count, consecutive = np.int32(0), np.int32(0)
    peak = np.float32(clipping.spike.PEAK_NONE)
    flags = []
    for n in norms:
        spike, (history, count, consecutive, peak) = clipping.robust_spike_step(
            np.float32(n),
            history,
            count,
            consecutive,
            6.0,
            min_samples,
            3,
            10.0,
            early_ratio,
            peak,
            peak_ratio,
        )
        flags.append(bool(spike))
    return flags, float(peak)


def test_robust_spike_step_peak_ratio_applies_rare_genuine_norms():
    """A rare class at a small batch size: once the model fits the common
    batches their norms fall ~100x, and a batch holding the rare class is a
    spike by the median rule every time it comes back (never recorded, so
    never learnt). With `peak_ratio` it is one only when it is also 10x the
    largest norm applied so far (the untrained model's first norms); a
    corrupt batch (1000x) still is."""
    rng = np.random.default_rng(0)
    first = list(3.0 * np.exp(0.3 * rng.normal(size=20)))  # untrained
    fitted = list(0.02 * np.exp(0.5 * rng.normal(size=100)))  # well fit
    norms = first + fitted[:50] + [5.0] + fitted[50:] + [6.0, 2000.0, 0.03]
    flags, peak = _robust_flags(norms, 64, 20, peak_ratio=None)
    assert flags == _robust_reference(norms, 64, 6.0, 20, 3, 10.0, 100.0)
    assert [n for n, f in zip(norms, flags, strict=True) if f] == [5.0, 6.0, 2000.0]
    flags, peak = _robust_flags(norms, 64, 20, peak_ratio=10.0)
    assert flags == _robust_reference(norms, 64, 6.0, 20, 3, 10.0, 100.0, 10.0)
    assert [n for n, f in zip(norms, flags, strict=True) if f] == [2000.0]
    assert peak == pytest.approx(np.log(6.0), rel=1e-6)  # the rare ones recorded


@pytest.mark.parametrize("compiled", [None, "graph", "xla"])
def test_robust_spike_step_peak_condition_gates_the_quartiles(compiled):
    """With `peak_ratio` the window's quartiles are computed only in a
    `cond` on the two-op condition "`peak_ratio` times the peak"; the flags
    are the reference's whichever side it takes, eagerly, in a graph and
    under XLA (a low `peak_ratio`, so that both sides are taken often)."""
    rng = np.random.default_rng(7)
    norms = list(np.exp(1.2 * rng.normal(size=80)))
    for at in (25, 40, 41, 60, 75):
        norms[at] = float(norms[at] * 10.0 ** rng.uniform(1.0, 4.0))
    norms[50] = 0.0

    def step(n, history, count, consecutive, peak):
        return clipping.robust_spike_step(
            n, history, count, consecutive, 6.0, 20, 3, 10.0, 100.0, peak, 2.0
        )

    if compiled is not None:
        step = tf.function(step, jit_compile=compiled == "xla")
    history = np.zeros(32, "float32")
    count, consecutive = np.int32(0), np.int32(0)
    peak = np.float32(clipping.spike.PEAK_NONE)
    flags, gated = [], 0
    for n in norms:
        above_peak = np.log(max(n, 1e-30)) - peak > np.log(2.0)
        if peak > clipping.spike.PEAK_NONE and not above_peak:
            gated += 1  # the quartiles are not computed at this step
        spike, (history, count, consecutive, peak) = step(
            np.float32(n), history, count, consecutive, peak
        )
        flags.append(bool(spike))
        history, count, consecutive, peak = (
            np.asarray(history),
            np.asarray(count),
            np.asarray(consecutive),
            np.asarray(peak),
        )
    assert flags == _robust_reference(norms, 32, 6.0, 20, 3, 10.0, 100.0, 2.0)
    assert sum(flags) >= 3
    # Both sides of the `cond` are taken: most steps skip the quartiles.
    assert len(norms) // 2 < gated <= len(norms) - sum(flags)


def test_robust_spike_step_peak_needs_peak_ratio_state():
    with pytest.raises(ValueError, match="peak"):
        clipping.robust_spike_step(
            np.float32(1.0),
            np.zeros(8, "float32"),
            np.int32(0),
            np.int32(0),
            6.0,
            4,
            3,
            10.0,
            None,
            None,
            10.0,
        )
    with pytest.raises(ValueError, match="peak_ratio"):
        clipping.RobustSpikeSkipping(peak_ratio=1.0)


def test_robust_spike_step_ratio_floor():
    """A nearly constant series (full batch) has a tiny spread: a norm 3x its
    median is 100s of deviations out, but under the 10x floor it is kept."""
    history = np.zeros(8, "float32")
    count, consecutive = np.int32(0), np.int32(0)
    flags = []
    for n in [1.0, 1.001, 0.999, 1.0, 1.0005, 3.0, 12.0]:
        spike, (history, count, consecutive) = clipping.robust_spike_step(
            np.float32(n), history, count, consecutive, 6.0, 4, 3, 10.0
        )
        flags.append(bool(spike))
    assert flags == [False] * 5 + [False, True]
