import math

import numpy as np
import pytest

from keras_stability.diagnostics import EXPLODING
from keras_stability.diagnostics import HEALTHY
from keras_stability.diagnostics import REMEDIES
from keras_stability.diagnostics import VANISHING
from keras_stability.diagnostics import RollingZScore
from keras_stability.diagnostics import dead_fraction
from keras_stability.diagnostics import diagnose_layers
from keras_stability.diagnostics import format_findings
from keras_stability.diagnostics import saturated_fraction


def _status(findings):
    return {f.layer: f.status for f in findings}


def test_vanishing_by_ratio_and_floor_needs_patience():
    norms = {
        "first": [1e-5, 1e-5, 1e-5],  # 1e-5 < 1e-3 * 0.5
        "floor": [1e-9, 1e-9, 1e-9],
        "head": [0.5, 0.5, 0.5],
        "blip": [0.5, 1e-9, 1e-9],  # only 2 checks in a row
    }
    status = _status(diagnose_layers(norms, patience=3))
    assert status == {
        "first": VANISHING,
        "floor": VANISHING,
        "head": HEALTHY,
        "blip": HEALTHY,
    }


def test_exploding_by_bound_factor_and_nonfinite():
    norms = {
        "bound": [1.0, 2e3, 3e3, 4e3],
        "factor": [1.0, 1.0, 150.0, 200.0],
        "nan": [1.0, 1.0, math.nan, math.inf],
        "ok": [1.0, 2.0, 3.0, 4.0],
    }
    status = _status(diagnose_layers(norms, patience=2))
    assert status == {
        "bound": EXPLODING,
        "factor": EXPLODING,
        "nan": EXPLODING,
        "ok": HEALTHY,
    }


def test_embedding_excluded_from_vanishing_and_reference():
    norms = {"embedding": [100.0] * 3, "dense": [0.01] * 3}
    assert _status(diagnose_layers(norms, exclude=["embedding"])) == {
        "embedding": HEALTHY,
        "dense": HEALTHY,  # not compared against the embedding's norm
    }
    assert _status(diagnose_layers(norms))["dense"] == VANISHING


def test_finding_ratio_and_remedy_text():
    findings = diagnose_layers({"a": [1e-6] * 3, "b": [2.0] * 3})
    a = findings[0]
    assert a.ratio == pytest.approx(5e-7)
    assert a.remedy == REMEDIES[VANISHING]
    text = format_findings(findings)
    assert "Vanishing gradients in 1 layer(s): a" in text
    assert "He initialisation" in text and "residual" in text
    assert format_findings(diagnose_layers({"b": [1.0] * 3})) == ""


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"vanish_ratio": 0},
            "Invalid value for argument `vanish_ratio`. Expected a number in (0, 1). Received: vanish_ratio=0",
        ),
        (
            {"vanish_floor": np.float32(0.0)},
            "Invalid value for argument `vanish_floor`. Expected a positive number.",
        ),
        (
            {"explode_factor": 1.0},
            "Invalid value for argument `explode_factor`. Expected a number > 1. Received: explode_factor=1.0",
        ),
        (
            {"exclude": "embedding"},
            "Invalid value for argument `exclude`. Expected a list or tuple of layer names. Received: exclude='embedding'",
        ),
        (
            {"patience": 0},
            "Invalid value for argument `patience`. Expected a positive integer. Received: patience=0",
        ),
        ({"explode_factor": -1.0}, "Received: explode_factor=-1.0"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError) as info:
        diagnose_layers({"a": [1.0]}, **kwargs)
    assert message in str(info.value)


def test_numpy_numbers_are_numbers():
    findings = diagnose_layers(
        {"a": np.array([1e-9] * 3), "b": [0.5] * 3},
        vanish_floor=np.float32(1e-8),
        explode_norm=np.float64(1e3),
        patience=np.int64(3),
    )
    assert _status(findings) == {"a": VANISHING, "b": HEALTHY}
    z = RollingZScore(
        window=np.int32(8), z_threshold=np.float32(3.0), min_samples=np.int64(4)
    )
    assert [z.update(v) for v in [1.0, 1.1, 0.9, 1.0, 10.0]] == [False] * 4 + [True]
    assert (
        saturated_fraction(np.full((2, 3), 0.999), "sigmoid", epsilon=np.float32(0.01))
        == 1.0
    )


def test_bad_norms_name_the_argument():
    for norms in ("a", {"a": "x"}, {"a": [1.0], "b": [1.0, 2.0]}, {1: [1.0]}):
        with pytest.raises(ValueError, match="Invalid value for argument `norms`"):
            diagnose_layers(norms)


def test_rolling_zscore_spikes_do_not_join_window():
    z = RollingZScore(window=50, z_threshold=4.0, min_samples=10)
    rng = np.random.default_rng(0)
    for v in 1.0 + 0.01 * rng.normal(size=30):
        assert not z.update(v)
    before = list(z.values)
    # A run of spikes stays a run of spikes: the window is not dragged up.
    assert all(z.update(5.0) for _ in range(20))
    assert list(z.values) == before
    assert z.update(math.nan) and z.update(math.inf)
    assert z.zscore(1.0) == pytest.approx((1.0 - np.mean(before)) / np.std(before))


def test_rolling_zscore_factor_rule_before_min_samples():
    z = RollingZScore(window=10, z_threshold=6.0, min_samples=10, factor=10.0)
    assert not z.update(2.3)
    assert not z.update(2.2)
    assert z.update(50.0)  # > 10 x median, long before min_samples
    assert z.median() == pytest.approx(2.25)


def test_rolling_zscore_factor_rule_stops_at_min_samples():
    # A heavy-tailed series: 10x the median is not a spike once the z-score
    # can judge (it is 2.5 standard deviations here).
    z = RollingZScore(window=20, z_threshold=6.0, min_samples=10, factor=10.0)
    history = [0.02, 0.02, 0.15, 0.02, 0.2, 0.02, 0.02, 0.18, 0.02, 0.02]
    assert not any(z.update(v) for v in history)
    assert 0.25 > 10 * z.median() and z.zscore(0.25) < 3.0
    assert not z.update(0.25)
    assert z.update(5.0)  # still a spike by z-score


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"window": 0},
            "Invalid value for argument `window`. Expected a positive integer. Received: window=0",
        ),
        (
            {"window": 5, "min_samples": 6},
            "Expected at most `window`=5. Received: min_samples=6",
        ),
        (
            {"z_threshold": 0},
            "Invalid value for argument `z_threshold`. Expected a positive number. Received: z_threshold=0",
        ),
        ({"factor": 1.0}, "Expected None or a number > 1. Received: factor=1.0"),
    ],
)
def test_rolling_zscore_invalid(kwargs, message):
    with pytest.raises(ValueError) as info:
        RollingZScore(**kwargs)
    assert message in str(info.value)


def test_dead_and_saturated_fractions_match_reference():
    rng = np.random.default_rng(0)
    a = np.maximum(rng.normal(size=(16, 4, 8)), 0.0)
    a[..., [1, 5]] = 0.0  # two dead channels
    assert dead_fraction(a) == pytest.approx(2 / 8)
    s = rng.uniform(0.2, 0.8, size=(32, 10))
    s[:, :3] = 0.999  # saturated high
    s[:, 3] = 0.001  # saturated low
    s[0, 4] = 0.999  # saturated for one sample only: not counted
    assert saturated_fraction(s, "sigmoid") == pytest.approx(4 / 10)
    t = np.tanh(rng.normal(size=(32, 5)))
    t[:, 0] = -0.9999
    assert saturated_fraction(t, "tanh") == pytest.approx(1 / 5)
    with pytest.raises(ValueError, match="Received: kind='relu'"):
        saturated_fraction(t, "relu")
