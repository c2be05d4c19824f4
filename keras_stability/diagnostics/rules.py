"""The rules of `GradientExplosionDetector`: what it calls a spike and a problem.

This is where the detector's rules are described; the recovery from a
problem is in `keras_stability.callbacks.recovery`. Every loss below is the
raw loss of one step (not Keras' running mean); the argument names are the
detector's.

**Spikes** are single steps far from the run's recent level. On
heavy-tailed small-batch noise a spike is far more often noise than a
failure, so a spike is never rolled back for:

- a gradient-norm spike of a corrupt batch is skipped in-graph by the
  guard (`keras_stability.clipping.RobustSpikeSkipping`: at least 10x the
  median norm of the last `window` applied steps and `grad_z_threshold`
  robust deviations above it in log space once `min_samples` are recorded,
  100x the median of the first ones before that, and always 100x the
  largest norm applied so far, so that a rare genuine example is learnt;
  at most `max_consecutive_skips` in a row). Applied, such a batch would
  stay in Adam's second moments for ~1000 steps;
- any other loss or gradient-norm spike is only recorded (an event of kind
  `"spike"`) and stays out of the medians of the rules below: a robust
  z-score in log space above `loss_z_threshold` / `grad_z_threshold` (the
  median and MAD of the logs of the last `window` healthy values,
  `diagnostics.spikes.RobustZScore`), or, in the first `min_samples` steps,
  a loss `loss_factor` times the larger of their median and the starting
  loss (at batch sizes of 8 or more, the first step's loss). A loss of
  `SPIKE_FLOOR` (0.1) or below, or below a tenth of the starting loss, is
  never a spike.

**Problems** need sustained evidence, which a healthy run never shows:

- a non-finite loss, or more than `max_consecutive_skips` non-finite steps
  in a row (each skipped in-graph; before rolling back for them the
  detector checks that the weights, not the batches, are at fault);
- `rising`: more than `max_consecutive_skips` bad steps (loss spikes,
  non-finite steps) among the last `2 * (max_consecutive_skips + 1)`, with
  a non-finite step among them, the good ones after the first bad one at
  2x the median loss before the window, or a later bad loss
  `CLIMB_FACTOR` times the first: a climb, not bad steps at the level the
  run is at (a rare class at batch size 32: a quarter of the batches hold
  one and stay 500x the rest while the run learns them);
- `diverging`: the median loss of the last `min_samples` steps, all after
  the best snapshot, `loss_factor` times that snapshot's loss, floored at
  a tenth of the starting loss, at `NEAR_ZERO` and at the mean loss of the
  steps before that snapshot (a loss near zero, or a lucky low score, is
  not "10x" anything by noise; the median: one rare hard example's loss at
  batch size 1, 200x a well-fit sample's, is no trend);
- `regressing`: the median loss of the last `min_samples` steps
  `regress_factor` times the loss the fit started from (the mean raw loss
  of its first batches of at least 32 samples), with that start well
  outside their spread: a rate too high to explode but high enough to
  wreck the model;
- `exploded` then `stalled`: the median loss of a stretch of 256 samples
  `EXPLOSION_FACTOR` (2) times the start (or `EXPLOSION_SPIKES` loss spikes
  among those steps at `CLIMB_FACTOR` times it), above the healthy losses
  before it, with a gradient norm in it `EXPLOSION_NORM_FACTOR` times the
  starting one; and later the median of the last steps still at
  `STALL_LEVEL` (0.9) of the start or above, moving smoothly from step to
  step (`jitter` at most `STALL_JITTER`). An explosion that leaves the
  model dead (every unit saturated or off, the prediction the class prior)
  ends with the loss back at about where it started: the rise is over,
  nothing is regressing, yet the run learns nothing from there. A model
  that starts already fit (a fine-tune) also stays at its start, but there
  its losses jump by orders of magnitude from one batch to the next near
  zero, where a stuck model's are all alike. When the stretch's median
  itself is still at 0.9x a starting loss of 0.01 or more ("loss
  exploded"), the detector does not wait for the stall;
- a failed recovery after a rollback (`keras_stability.callbacks.recovery`).

With sample weights (or class weights, which Keras turns into them) every
loss these rules, the spike scores and the recovery checks compare is per
unit of weight (`per_unit_weight`): the step's loss over its batch's mean
weight. Keras' loss of a weighted batch is `sum(w * loss) / batch_size`, the
mean weight times the weighted mean of the per-sample losses, so without it
weights that change over the data (rising 20x over an epoch read in order)
move the loss as an explosion would, and the start (the first batches) is
no reference for the later ones.

The rules are pure functions of the raw losses (no Keras, no state):
`keras_stability.diagnostics.loss_history.LossHistory` keeps the windows of
one fit and calls them (a test can feed it losses without `fit`). The constants below say what
each threshold was measured on (`benchmarks/battery.py`).
"""

import math

import numpy as np

__all__ = [
    "NEAR_ZERO",
    "SPIKE_FLOOR",
    "all_below",
    "diverging",
    "exploded",
    "per_unit_weight",
    "jitter",
    "regressing",
    "rising",
    "stalled",
]

# The mean raw loss over a stretch of EXPLOSION_STRETCH x 32 samples (8
# batches of 32, or the last 8 * ceil(32 / batch) batches) at this multiple of
# the starting loss is an explosion. Measured on the battery of issue #16
# (`benchmarks/battery.py`): healthy runs reach 1.48x at most (the keras.io
# custom train_step's MSE, whose starting loss is one noisy batch); the
# exploding ones 2.56x (the char LM at 100x its best rate, whose
# cross-entropy over 64 classes cannot rise far) to 1000x.
EXPLOSION_FACTOR = 2.0
EXPLOSION_STRETCH = 8
# An explosion of the loss comes with one of the gradient: the largest
# gradient norm of the stretch's steps at least this many times the norm
# the fit started from. Measured on the battery: 4.7x (the char LM at 100x
# its best rate) to 1400x (the Keras example at SGD(5)) when the loss
# exploded; 1.6x in a Huber regression with 5% outliers at batch 64, whose
# loss is "2x the start" only because its first batch was a low draw (1.03,
# the batch losses near 1.7), Huber's gradient being bounded.
EXPLOSION_NORM_FACTOR = 2.0
# Loss spikes (single steps, which stay out of the stretch's median) are an
# explosion too when at least this many of the stretch's steps are
# `CLIMB_FACTOR` times the starting loss: the Keras example at SGD(5) and
# batch 64 (seed 0) spikes to 18x, 23x and 119x its start in 7 steps while
# the median of the other steps stays at 1.4x, then dies at the class prior.
EXPLOSION_SPIKES = 2
# Bad steps with too few good ones between them are a rise when a later bad
# loss is this many times the first (`rising`): a diverging run's climb by
# orders of magnitude, not a rare class's spikes at one level.
CLIMB_FACTOR = 10.0
# After an explosion, a median raw loss over the last `min_samples` steps at
# this fraction of the starting loss or above is a stall: no progress from
# where training began (a model killed by the explosion predicts the class
# prior, a loss of about the initial one: 0.96-1.0x in the Keras example at
# SGD(5)).
STALL_LEVEL = 0.9
# A stall also needs the losses to move smoothly: the median change of the
# log loss from one step to the next (`jitter`) at most this (consecutive
# losses within a factor e**0.5 = 1.65 of each other, in the median). A stuck
# model's per-batch losses are set by the batch's label mix: 0.08-0.28 when
# the battery's dead runs stall (the Keras example at SGD(5), the deep tanh
# MLP, the char LM at 100x its rate). A fit model's losses near zero jump by
# orders of magnitude: 0.91-1.9 fine-tuning a fit MLP on a new rare class at
# batch size 4, whose losses stay at the near-zero start (or 3x it) while the
# new class is learnt.
STALL_JITTER = 0.5
# A slow divergence is judged against a reference loss never below this: a
# fit model's losses move by multiples near zero (fine-tuning a fit MLP on a
# new rare class, batch 4: the median loss of the classes already fit rises
# from 3e-4 to 3e-3 while the new class is learnt, 10x the best snapshot's),
# and "10x" a near-zero loss is no divergence. With the default factor of
# 10, the median must pass 0.1 (a cross-entropy at which the typical sample
# gets 0.9 of the probability).
NEAR_ZERO = 0.01
# A raw loss of this or below is never a loss spike, whatever the losses
# before it: near zero, 10x the median is noise (a fit model's losses at
# batch size 16, in a second `fit`, jump 20-50x from one batch to the next,
# 0.0006 -> 0.03).
SPIKE_FLOOR = 0.1
# A regression needs the starting loss more than this many standard
# deviations of the last losses below their mean.
REGRESS_SPREAD = 2.0


def per_unit_weight(loss, mean_weight):
    """A step's loss per unit of sample weight, the loss the rules compare.

    Args:
        loss: The step's raw loss (Keras' reduction: `sum(w * loss) /
            batch_size`).
        mean_weight: The batch's mean sample weight; `loss` is returned as
            it is when it is not positive (a batch of zero weights) or
            not finite.

    Returns:
        `loss / mean_weight`.
    """
    if not (math.isfinite(mean_weight) and mean_weight > 0):
        return loss
    return loss / mean_weight


def all_below(values, bound, strict=False):
    """Whether every value is at most `bound` (below it if `strict`; a NaN
    never is): then so is their median, which need not be computed. A NumPy
    median of a short window costs about 9 µs, and the rules run at every
    judged step; a healthy run's losses are far below every bound."""
    if strict:
        return all(v < bound for v in values)
    return all(v <= bound for v in values)


def regressing(recent, start, factor):
    """Whether `recent` losses say training made the model worse than it began.

    Args:
        recent: The last raw losses (a full window).
        start: The loss the fit started from.
        factor: The median of `recent` must exceed `factor * start`.

    Returns:
        `True` if the median of `recent` is above `factor * start` and `start`
        is more than `REGRESS_SPREAD` standard deviations of `recent` below
        their mean (a lucky first batch, or a few bad batches in a row at
        batch size 1, is not a trend).
    """
    if len(recent) < 2 or not start > 0 or all_below(recent, factor * start):
        return False
    recent = np.asarray(recent, dtype=np.float64)
    if not float(np.median(recent)) > factor * start:
        return False
    return start < float(recent.mean() - REGRESS_SPREAD * recent.std(ddof=1))


def diverging(
    sustained, best, start, factor, floor, absolute_floor=NEAR_ZERO, typical=None
):
    """The median of `sustained` if it is `factor` times the reference, else `None`.

    The reference is `best` (the best snapshot's loss) floored at
    `floor * start` and at `absolute_floor`, so that a loss near zero is not
    "10x" anything by noise, and at `typical`, the mean loss of the steps
    before that snapshot: its own score is a short mean, the lowest of many,
    and where batch losses take two levels (a few outliers in some batches
    and not in others) the lowest short mean is one of the lower level, far
    below the median it is compared with.

    Args:
        sustained: The last raw losses, all after the best snapshot,
            single spikes left out.
        best: The best snapshot's loss.
        start: The loss the fit started from (`nan` if unknown).
        factor: The multiple of the reference that is a divergence.
        floor: The fraction of `start` the reference is floored at.
        absolute_floor: The loss the reference is floored at whatever the
            start. Defaults to `NEAR_ZERO`.
        typical: The mean raw loss of the last steps when the best snapshot
            was taken; `None` (or not finite) leaves it out.

    Returns:
        `(median, reference)` if diverging, else `None`.
    """
    if not (math.isfinite(best) and best > 0) or len(sustained) == 0:
        return None
    low = floor * start
    reference = max(best, low) if math.isfinite(low) else best
    reference = max(reference, absolute_floor)
    if typical is not None and math.isfinite(typical):
        reference = max(reference, typical)
    if all_below(sustained, factor * reference):
        return None
    median = float(np.median(np.asarray(sustained, dtype=np.float64)))
    if not median > factor * reference:
        return None
    return median, reference


def exploded(
    stretch,
    start,
    factor=EXPLOSION_FACTOR,
    norms=None,
    start_norm=None,
    norm_factor=EXPLOSION_NORM_FACTOR,
    before=None,
    spikes=None,
):
    """Whether the median of `stretch` is `factor` times the starting loss
    (or `EXPLOSION_SPIKES` loss spikes among its steps `CLIMB_FACTOR` times
    it), above the losses before it, and the gradient norm rose with it.

    The starting loss is floored at `NEAR_ZERO`: a fine-tune that starts
    fit (0.0018 at batch size 16) and learns a new class sees the losses of
    the classes already fit double near zero, which is no explosion.

    Args:
        stretch: The raw losses of the last batches holding at least
            `EXPLOSION_STRETCH` x 32 samples, single spikes left out (one
            corrupt batch's 1000x loss is no explosion). The median: an
            explosion raises most batches' losses, while heavy-tailed data
            (a rare class, regression targets with heavy-tailed noise) puts
            a few far above the rest and the mean with them.
        start: The loss the fit started from.
        factor: Defaults to `EXPLOSION_FACTOR`.
        norms: The gradient norms of the same steps, spikes included
            (`None` for a step without one), or `None` when no norm is
            seen: the losses alone then decide. A loss judged against one
            batch may be "2x" a lucky first batch, while the gradient of a
            loss that truly exploded rises with it.
        start_norm: The gradient norm the fit started from, or `None`.
        norm_factor: The largest of `norms` must be this many times
            `start_norm` (a non-finite norm always is). Defaults to
            `EXPLOSION_NORM_FACTOR`.
        before: The healthy raw losses of the steps before the stretch (the
            last of them), or `None`. When they are as many as the
            stretch's, its median must be above the largest of them: the
            median of 8 batches of a loss with heavy-tailed noise (a
            regression with Student-t noise of 2 degrees of freedom, whose
            squared errors have no variance) reaches 2x a start of one
            batch by chance, but not above the batches before it. An
            explosion in the first steps has no such history.
        spikes: The raw losses of the loss spikes among the same steps as
            `norms` (left out of `stretch`), or `None`. `EXPLOSION_SPIKES`
            of them `CLIMB_FACTOR` times the starting loss (and, with
            `before`, above its largest) are an explosion whatever the
            median of the other steps.
    """
    if len(stretch) == 0 or not (math.isfinite(start) and start > 0):
        return False
    floor = max(start, NEAR_ZERO)
    if all_below(stretch, factor * floor, strict=True):
        level = None  # the median is below too
    else:
        level = float(np.median(np.asarray(stretch, dtype=np.float64)))
    if level is None or level < factor * floor:
        big = sorted(
            s for s in spikes or () if s is not None and s >= CLIMB_FACTOR * floor
        )
        if len(big) < EXPLOSION_SPIKES:
            return False
        level = big[-EXPLOSION_SPIKES]  # the least of the largest spikes
    if before is not None and len(before) >= len(stretch):
        if not level > max(before):
            return False
    seen = [n for n in norms or () if n is not None]
    if (
        not seen
        or start_norm is None
        or not (math.isfinite(start_norm) and start_norm > 0)
    ):
        return True
    if not all(math.isfinite(n) for n in seen):
        return True
    return max(seen) >= norm_factor * start_norm


def rising(window, reference, factor=EXPLOSION_FACTOR, climb=CLIMB_FACTOR):
    """Whether a window with several bad steps shows a rising loss.

    Several loss spikes among a few steps are a rise when the loss climbs
    and does not come back: after the first bad step, the good steps (if
    two or more) sit at `factor` times the level before the window (the
    Keras example at SGD(5): 2.5, 5.5, 26, [151], 30, [2e4], [9e4], ...),
    or, with fewer good steps, the later bad losses reach `climb` times the
    first (SGD(20): [205], [5e5], [7e8], [3e14]). Spikes that recur between
    steps at the run's level (a rare class at batch size 32: 0.6 in a
    quarter of the batches, 0.001 in the rest, the class being learnt), or
    that stay level, are no rise.

    Args:
        window: Per step, in order, `(loss, bad)`: the step's raw loss
            (`math.inf` for a non-finite step, `None` if unknown) and
            whether it was bad (a loss spike, a non-finite or skipped step).
        reference: The level of the run before the window (the median of
            its healthy losses before it).
        factor: Defaults to `EXPLOSION_FACTOR`.
        climb: Defaults to `CLIMB_FACTOR`.

    Returns:
        `True` if the window holds a non-finite step, or if after its first
        bad step two or more good steps have a median `factor` times
        `reference` (floored at `NEAR_ZERO`) or more, or fewer good steps
        come and a later bad loss is `climb` times the first.
    """
    window = list(window)
    if any(loss == math.inf for loss, _ in window):
        return True
    first = next((i for i, (_, bad) in enumerate(window) if bad), None)
    if first is None:
        return False
    after = window[first + 1 :]
    good = [loss for loss, bad in after if not bad and loss is not None]
    if len(good) >= 2:
        if not math.isfinite(reference):
            return True
        return float(np.median(good)) >= factor * max(reference, NEAR_ZERO)
    losses = [loss for loss, bad in window[first:] if bad and loss is not None]
    return len(losses) >= 2 and max(losses[1:]) >= climb * losses[0]


def jitter(losses):
    """The median absolute change of the log loss from one step to the next.

    `losses` in the order of their steps; a loss of 0 or below counts as
    `1e-30` (so a series touching zero jumps, and is never stuck).
    """
    losses = np.maximum(np.asarray(losses, dtype=np.float64), 1e-30)
    if losses.size < 2:
        return math.inf
    return float(np.median(np.abs(np.diff(np.log(losses)))))


def stalled(recent, start, level=STALL_LEVEL, max_jitter=STALL_JITTER, window=None):
    """Whether `recent` is stuck at `level` times the start or above.

    Only evidence after an explosion (`exploded`): a healthy run may stay at
    its starting loss for a while before it learns.

    Args:
        recent: The last raw losses (a full window).
        start: The loss the fit started from.
        level: Defaults to `STALL_LEVEL`.
        max_jitter: The largest `jitter` that is stuck. Defaults to
            `STALL_JITTER`; `None` does not look at it.
        window: The raw losses, in step order, whose `jitter` is judged:
            256 samples or more keep a few small batches from moving
            smoothly by chance. Defaults to `recent`.

    Returns:
        `True` if the median of `recent` is `level * start` or above and,
        unless `max_jitter` is `None`, the `jitter` of `window` is
        `max_jitter` or below.
    """
    if len(recent) == 0 or not (math.isfinite(start) and start > 0):
        return False
    if all_below(recent, level * start, strict=True):
        return False
    if not float(np.median(np.asarray(recent, dtype=np.float64))) >= level * start:
        return False
    if max_jitter is None:
        return True
    return jitter(recent if window is None else window) <= max_jitter
