import math

import numpy as np
import pytest

from keras_stability.diagnostics.spikes import RobustZScore
from keras_stability.diagnostics.spikes import RollingZScore


def _heavy_tailed_small_loss(n, seed=0):
    # A loss near zero where single batches are often 10x the median: the
    # shape of a well-trained classifier's batch losses.
    rng = np.random.default_rng(seed)
    return 0.01 * np.exp(rng.standard_t(3, size=n) * 0.6)


def test_robust_score_ignores_heavy_tailed_noise_that_a_mean_std_z_score_flags():
    values = _heavy_tailed_small_loss(2000)
    robust = RobustZScore()
    classic = RollingZScore()
    robust_spikes = sum(robust.update(v) for v in values)
    classic_spikes = sum(classic.update(v) for v in values)
    assert values.max() > 10 * np.median(values)  # the tail is there
    # t(3) in log space: some draws are real outliers even to a robust
    # score, but 5x fewer than to the mean/std one (9 against 47 here).
    assert classic_spikes >= 5 * robust_spikes, (robust_spikes, classic_spikes)


def test_robust_score_flags_a_real_jump_and_keeps_it_out_of_the_window():
    z = RobustZScore(window=32, min_samples=8)
    rng = np.random.default_rng(1)
    for v in 1.0 + 0.05 * rng.normal(size=20):
        assert not z.update(v)
    assert z.zscore(1.0) == pytest.approx(0.0, abs=1.5)
    assert z.update(20.0) and z.update(20.0)  # not learnt from
    assert 20.0 not in z.values
    assert z.median() == pytest.approx(1.0, abs=0.05)


def test_robust_score_judges_nothing_before_min_samples_and_no_log_of_zero():
    z = RobustZScore(window=8, min_samples=4)
    assert [z.update(v) for v in (1.0, 1000.0, 1.0)] == [False, False, False]
    assert math.isnan(z.zscore(5.0))  # not ready
    assert not z.update(0.0) and not z.update(-1.0)  # no log: neither judged nor kept
    assert len(z.values) == 3
    assert z.update(float("nan")) and z.update(float("inf"))


def test_robust_score_spread_has_a_floor():
    # A flat series: MAD 0; the floor (5% in log units) keeps a 10% wobble
    # from scoring above 6.
    z = RobustZScore(window=16, min_samples=4)
    for _ in range(10):
        z.update(2.0)
    assert z.zscore(2.2) == pytest.approx(math.log(1.1) / 0.05)
    assert not z.update(2.2)
    assert z.update(2.0 * math.exp(0.05 * 6.5))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"window": 0}, "Received: window=0"),
        ({"min_samples": 200}, "Received: min_samples=200"),
        ({"z_threshold": 0}, "Received: z_threshold=0"),
        ({"min_spread": -0.1}, "Received: min_spread=-0.1"),
    ],
)
def test_robust_score_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        RobustZScore(**kwargs)
