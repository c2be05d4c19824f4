import math
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

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


def test_a_stall_is_a_stuck_loss_not_a_fit_one_jumping_near_zero():
    rng = np.random.default_rng(0)
    start = 2.3
    # A dead model predicting the class prior: losses set by the batch's
    # label mix, a few percent apart from one batch to the next.
    dead = start * np.exp(rng.normal(scale=0.1, size=64))
    assert rules.jitter(dead) < 0.15
    assert rules.stalled(dead[-20:], start)
    # A fit model near zero loss (a fine-tune): at its start level too, but
    # its losses spread over orders of magnitude (log-normal, sigma 1.5).
    start = 1e-3
    fit = start * np.exp(rng.normal(scale=1.5, size=64))
    assert np.median(fit) >= rules.STALL_LEVEL * start
    assert rules.jitter(fit) > 1.0
    assert not rules.stalled(fit, start)
    assert rules.stalled(fit, start, max_jitter=None)  # the level alone
    # A steady climb (x1.21 per step) moves smoothly: stuck by this measure.
    climb = 0.5 * 1.21 ** np.arange(20)
    assert rules.jitter(climb) == pytest.approx(math.log(1.21))
    assert rules.stalled(climb, 1.0)
    # `window` judges the jitter on a longer stretch than the level.
    assert not rules.stalled(climb, 1.0, window=np.concatenate([fit, climb]))
    # A loss of 0 (or below) jumps: never stuck.
    assert rules.jitter([1.0, 0.0, 1.0]) > 60
    assert math.isinf(rules.jitter([1.0]))


def test_divergence_reference_is_never_below_near_zero():
    # The fine-tune of a fit model on a new rare class: the median loss of the
    # classes already fit rises from the best snapshot's 2.5e-4 to 3.5e-3
    # while the new class is learnt; the start (1.8e-3) floors nothing.
    sustained = np.full(20, 3.5e-3)
    assert rules.diverging(sustained, 2.5e-4, 1.8e-3, 10.0, 0.1) is None
    median, reference = rules.diverging(
        sustained, 2.5e-4, 1.8e-3, 10.0, 0.1, absolute_floor=0.0
    )
    assert median == pytest.approx(3.5e-3) and reference == pytest.approx(2.5e-4)
    # Above 10x the floor it is a divergence, against the floor.
    median, reference = rules.diverging(np.full(20, 0.2), 2.5e-4, 1.8e-3, 10.0, 0.1)
    assert reference == rules.NEAR_ZERO == 0.01
    # The start's floor still wins when larger.
    _, reference = rules.diverging(np.full(20, 30.0), 0.05, 2.3, 10.0, 0.1)
    assert reference == pytest.approx(0.23)


def test_an_explosion_raises_most_losses_not_a_few():
    start = 1.0
    # Heavy-tailed data: 3 batches of 32 far above the rest (a rare class,
    # noise of infinite variance) put the mean at 4x the start.
    heavy = np.full(32, 0.8)
    heavy[[5, 17, 29]] = 30.0
    assert np.mean(heavy) > 2 * start
    assert not rules.exploded(heavy, start)
    # An explosion: most batches at 2x the start or more.
    rising = np.concatenate([np.full(15, 0.8), np.full(17, 2.5)])
    assert rules.exploded(rising, start)
    assert not rules.exploded(rising, float("nan"))


def test_divergence_reference_is_floored_at_the_typical_loss_before_the_best():
    # Batch losses at two levels (outliers in some batches): the best score
    # is a lucky streak of the lower one; the median later at the upper one.
    sustained = np.full(20, 1.23)
    assert rules.diverging(sustained, 0.039, 1.0, 10.0, 0.1) is not None
    assert rules.diverging(sustained, 0.039, 1.0, 10.0, 0.1, typical=0.8) is None
    # A real rise past 10x the typical level still is one.
    median, reference = rules.diverging(
        np.full(20, 9.0), 0.039, 1.0, 10.0, 0.1, typical=0.8
    )
    assert reference == 0.8 and median == 9.0
    assert rules.diverging(sustained, 0.039, 1.0, 10.0, 0.1, typical=math.nan)


def test_an_explosion_near_zero_is_measured_from_near_zero():
    # A fine-tune that starts fit (1.8e-3 at batch size 16): while a new
    # class is learnt, the classes already fit go to 4e-3, "2x" the start.
    assert not rules.exploded(np.full(32, 4e-3), 1.8e-3)
    assert not rules.exploded(np.full(32, 0.019), 1e-3)
    # From the floor, a real rise still is one.
    assert rules.exploded(np.full(32, 0.03), 1.8e-3)


def test_an_explosion_of_the_loss_needs_one_of_the_gradient():
    # A Huber regression at batch 64: the first batch a low draw (1.03),
    # the batch losses near 1.7-2.1, the gradient norms level (0.78 ->
    # 1.25 at most, Huber's gradient is bounded).
    losses = [2.25, 1.68, 2.01, 2.37, 3.27, 0.86, 1.46, 2.42]
    level = [0.78, 1.12, 0.95, 1.0, 1.25, 0.9, 0.85, 1.1]
    assert rules.exploded(losses, 1.03)  # the losses alone: "2x the start"
    assert not rules.exploded(losses, 1.03, norms=level, start_norm=0.78)
    # The char LM at 100x its rate: the norms 2.2 -> 10.3 with the loss.
    lm = [9.4, 9.8, 9.1, 9.6, 9.2, 8.9, 9.5, 9.3]
    rising = [2.96, 5.27, 3.99, 7.09, 10.3, 8.2, 6.6, 5.9]
    assert rules.exploded(lm, 4.61, norms=rising, start_norm=2.2)
    assert not rules.exploded(lm, 4.61, norms=[2.2] * 8, start_norm=2.2)
    # A non-finite norm is a rise; steps without a norm, or no starting
    # norm, leave the losses to decide.
    assert rules.exploded(lm, 4.61, norms=[2.2] * 7 + [math.nan], start_norm=2.2)
    assert rules.exploded(lm, 4.61, norms=[2.2] * 7 + [math.inf], start_norm=2.2)
    assert rules.exploded(lm, 4.61, norms=[None] * 8, start_norm=2.2)
    assert rules.exploded(lm, 4.61, norms=rising, start_norm=None)
    # Without the loss's rise the gradient's alone is none.
    assert not rules.exploded([5.0] * 8, 4.61, norms=[50.0] * 8, start_norm=2.2)


def test_an_explosion_rises_above_the_losses_before_it():
    # Student-t noise at batch 32: a stretch's median at 2x the first batch
    # and below the largest of the batches before it.
    stretch = [11.0, 15.0, 13.0, 9.0, 14.0, 20.0, 12.0, 13.5]
    assert rules.exploded(stretch, 6.5)
    assert not rules.exploded(stretch, 6.5, before=[6.0, 4.0, 62.0] + [5.0] * 10)
    # Above all of them: an explosion.
    assert rules.exploded(stretch, 6.5, before=[6.0, 4.0, 9.0] + [5.0] * 10)
    # Fewer losses before it than in the stretch (an explosion in the first
    # steps): the start alone decides.
    assert rules.exploded(stretch, 6.5, before=[62.0] * 7)


def test_loss_spikes_at_10x_the_start_are_an_explosion():
    # The Keras example at SGD(5), batch 64, seed 0: three loss spikes (45,
    # 55, 292 against a start of 2.46) among the stretch's steps, the median
    # of the other steps 1.4x the start, the gradient norm up 160x.
    stretch = [2.70, 8.02, 5.72, 3.46, 5.26, 3.58, 2.57, 2.77]
    norms = [2.2, 7.0, 7.5, 23.9, 3.9, 9.6, 3.7, 2.2, 43.1, 194.5, 0.5]
    spikes = [None, None, None, 45.1, None, None, None, None, 55.4, 291.8, None]
    assert not rules.exploded(stretch, 2.46, norms=norms, start_norm=1.22)
    assert rules.exploded(stretch, 2.46, norms=norms, start_norm=1.22, spikes=spikes)
    # One spike is no explosion (a corrupt batch), nor are spikes under 10x
    # the start (a rare class's, at one level).
    one = [None] * 10 + [291.8]
    assert not rules.exploded(stretch, 2.46, norms=norms, start_norm=1.22, spikes=one)
    low = [None, 20.0, None, 22.0, 18.0]
    assert not rules.exploded(stretch, 2.46, norms=norms, start_norm=1.22, spikes=low)
    # The gradient must rise with them; and with a stretch's worth of losses
    # before, the spikes must be above every one of them.
    assert not rules.exploded(
        stretch, 2.46, norms=[1.2] * 11, start_norm=1.22, spikes=spikes
    )
    before = [2.5] * 7 + [60.0]
    assert not rules.exploded(
        stretch, 2.46, norms=norms, start_norm=1.22, spikes=spikes, before=before
    )
    assert rules.exploded(
        stretch, 2.46, norms=norms, start_norm=1.22, spikes=spikes, before=[2.5] * 8
    )
    # Near zero the start is floored at NEAR_ZERO: spikes of 0.05 over a
    # start of 0.001 (a fit model's noise) are no explosion.
    assert not rules.exploded([0.001] * 8, 0.001, spikes=[0.05, 0.06, 0.08])


def _steps(*losses):
    # A loss in a list is a bad step's.
    return [(v[0], True) if isinstance(v, list) else (v, False) for v in losses]


def test_bad_steps_are_a_rise_when_the_loss_climbs_not_when_they_recur():
    inf = math.inf
    # The Keras example at SGD(5): the good step between the spikes has
    # climbed too (one good step after the first spike: the spikes climb).
    climbing = _steps(2.53, 5.46, 25.9, [151.0], 29.9, [2.1e4], [8.7e4], [8.6e4])
    assert rules.rising(climbing, 2.53)
    # SGD(20) with the invariance test's settings: no good step after the
    # first spike, the spikes climb by orders of magnitude.
    assert rules.rising(_steps(2.38, 4.25, [205.0], [5e5], [6.7e8], [3e14]), 3.3)
    # Spikes at one level with no good step between them: no rise.
    assert not rules.rising(_steps(0.5, [0.9], [0.6], [1.1], [0.7]), 0.5)
    # A new rare class at batch size 32: a quarter of the batches hold one
    # (0.3-0.6, spikes), the others stay at the fit level.
    recurring = _steps(1.1e-3, [0.3], 9e-4, [0.5], 2e-3, [0.4], 1.4e-3, [0.6])
    assert not rules.rising(recurring, 1.2e-3)
    # At a level above NEAR_ZERO, the same pattern is no rise either ...
    assert not rules.rising(_steps(0.5, [5.0], 0.6, [4.0], 0.4, [6.0], 0.7), 0.5)
    # ... and the good steps at 2x the level are.
    assert rules.rising(_steps(0.5, [5.0], 1.1, [4.0], 1.2, [6.0], 1.3), 0.5)
    # A non-finite step is always a rise; no bad step never is.
    assert rules.rising(recurring[:-1] + [(inf, True)], 1.2e-3)
    assert not rules.rising(_steps(1.0, 2.0, 3.0), 1.0)
    assert rules.rising(_steps([0.3], 0.5, 0.6), math.inf)


_LOSSES = st.lists(
    st.one_of(
        st.floats(0.0, 10.0),
        st.sampled_from([0.001, 0.5, 1.0, 2.0, 2.5, 4.0, math.nan, math.inf]),
    ),
    min_size=1,
    max_size=24,
)


@settings(max_examples=300, deadline=None)
@given(
    losses=_LOSSES,
    before=_LOSSES,
    start=st.sampled_from([0.0, 0.001, 0.5, 1.0, 2.0, math.nan]),
    best=st.sampled_from([0.001, 0.3, 1.0, 2.0]),
)
def test_the_rules_skip_the_median_only_where_it_cannot_decide(
    losses, before, start, best
):
    """`all_below` spares the median of a window every value of which is
    below the rule's bound (the median is then below it too): each rule
    gives what it gives when the median is always computed, NaN and inf
    included."""
    norms = [1.0] * len(losses)
    spikes = [None, 30.0] * (len(losses) // 2) + [None] * (len(losses) % 2)

    def every_rule():
        return (
            rules.regressing(losses, start, 1.5),
            rules.diverging(losses, best, start, 3.0, 0.1, typical=0.2),
            rules.exploded(losses, start, norms=norms, start_norm=0.5, spikes=spikes),
            rules.exploded(losses, start, before=before),
            rules.stalled(losses, start, max_jitter=None),
        )

    gated = every_rule()
    with mock.patch.object(rules, "all_below", return_value=False):
        always = every_rule()
    assert repr(gated) == repr(always)  # repr: NaN equal to NaN
