import math

import numpy as np

from keras_stability.diagnostics import rules


def test_per_unit_weight_divides_by_the_mean_weight_and_keeps_degenerate_batches():
    assert rules.per_unit_weight(6.0, 3.0) == 2.0
    assert rules.per_unit_weight(6.0, 1.0) == 6.0
    # A batch of zero weights (its loss is 0) or no weight known: as it is.
    assert rules.per_unit_weight(0.0, 0.0) == 0.0
    assert rules.per_unit_weight(6.0, math.nan) == 6.0
    assert math.isnan(rules.per_unit_weight(math.nan, 2.0))


def test_weights_rising_over_the_data_are_no_explosion_per_unit_of_weight():
    # A healthy run (the per-sample loss falls from 2.3 to 1.5) read in order
    # with weights rising 1 -> 20: Keras' weighted loss rises 13x, an
    # explosion and then a stall by the raw loss, nothing per unit of weight.
    steps = 40
    weights = np.linspace(1.0, 20.0, steps)
    per_sample = np.linspace(2.3, 1.5, steps)
    raw = weights * per_sample
    start = float(raw[0])
    assert rules.exploded(raw[8:16], start)
    assert rules.stalled(raw[-20:], start)
    judged = [rules.per_unit_weight(r, w) for r, w in zip(raw, weights, strict=True)]
    np.testing.assert_allclose(judged, per_sample)
    assert not rules.exploded(judged[8:16], judged[0])
    assert not rules.regressing(judged[-20:], judged[0], 1.5)
