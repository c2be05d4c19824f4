import math

import numpy as np
import pytest

from keras_stability.diagnostics import rules
from keras_stability.diagnostics.loss_history import LossHistory


def make_history(marks=None, **kwargs):
    """The detector's defaults, batches of 32 (one call holds the start)."""
    settings = dict(
        window=128,
        min_samples=20,
        loss_z_threshold=6.0,
        grad_z_threshold=6.0,
        loss_factor=10.0,
        regress_factor=1.5,
        max_consecutive_skips=3,
    )
    settings.update(kwargs)
    mark = None if marks is None else (lambda: marks.append(len(marks)) or marks[-1])
    history = LossHistory(**settings, mark=mark)
    history.start_calls, history.call_samples = 1, 32
    return history


def feed(history, losses, norms=None, start=0, best=(math.inf, None)):
    """`observe` then `problem` per step, as the detector calls them.

    Returns `(spikes, problems)`: `(step, kind)` of each loss/gradient spike
    and each problem found.
    """
    spikes, problems = [], []
    norms = [1.0] * len(losses) if norms is None else norms
    for i, (loss, norm) in enumerate(zip(losses, norms, strict=True)):
        step = start + i + 1
        spike, grad_spike = history.observe(float(loss), float(norm), 1, step)
        if spike is not None:
            spikes.append((step, "loss"))
        if grad_spike is not None:
            spikes.append((step, "grad"))
        found = history.problem(spike, step, *best) or history.exploded_at_start_level(
            step
        )
        if found is not None:
            problems.append((step, found[0]))
    return spikes, problems


def test_a_healthy_noisy_run_has_no_problem_and_few_spikes():
    rng = np.random.default_rng(0)
    # A falling loss with heavy-tailed batch noise (log-normal, sigma 0.5).
    steps = 600
    losses = 2.3 * np.exp(-np.arange(steps) / 200) * np.exp(rng.normal(0, 0.5, steps))
    norms = 3.0 * np.exp(rng.normal(0, 0.5, steps))
    history = make_history()
    spikes, problems = feed(history, losses, norms)
    assert problems == []
    assert len(spikes) <= 2
    assert history.start_loss == pytest.approx(losses[0])
    assert history.exploded_at is None


def test_a_single_corrupt_batch_is_a_spike_not_a_problem():
    rng = np.random.default_rng(1)
    losses = 1.0 * np.exp(rng.normal(0, 0.2, 80))
    losses[50] = 1000.0
    history = make_history()
    spikes, problems = feed(history, losses)
    assert spikes == [(51, "loss")]
    assert problems == []
    # The spike stayed out of the divergence window and the stretch.
    assert max(history.sustained) < 10.0
    assert max(history.stretch) < 10.0


def test_bad_steps_climbing_are_a_rise_and_the_streak_is_marked_once():
    rng = np.random.default_rng(2)
    marks = []
    history = make_history(marks=marks)
    healthy = 1.0 * np.exp(rng.normal(0, 0.1, 40))
    feed(history, healthy)
    assert marks == []
    # Four spikes climbing 10x each: more than max_consecutive_skips=3 bad.
    spikes, problems = feed(history, [50.0, 500.0, 5000.0, 50000.0], start=40)
    assert [kind for _, kind in spikes] == ["loss"] * 4
    assert problems == [(44, "rising")]
    assert history.bad_streak == 4
    assert marks == [0]  # taken at the first bad step only
    found = history.problem("loss spike: x", 44, math.inf, None)
    assert found[0] == "rising"
    assert found[1].endswith(", the last: loss spike: x")


def test_spikes_at_one_level_are_no_rise():
    # A rare class at batch size 32: every other batch 500x the rest, the
    # run at that level: bad steps, no climb.
    history = make_history()
    feed(history, [0.01] * 40)
    losses = [0.01, 5.0] * 10
    _, problems = feed(history, losses, start=40)
    assert [kind for _, kind in problems if kind == "rising"] == []


def test_a_slow_divergence_from_the_best_snapshot_with_its_floors():
    history = make_history()
    feed(history, [1.0] + [1.5] * 30)
    # The best snapshot scored 0.05; the losses go to 1.5: 30x it, and 15x
    # its floor, a tenth of the starting loss (0.1).
    found = history.diverging(0.05, None)
    assert found[0] == "diverging"
    assert "median raw loss 1.5 over the last 20 steps" in found[1]
    assert "floored at 0.1x the starting loss: 0.1" in found[1]
    # A best of 0.2 (the median 7.5x it): no divergence.
    assert history.diverging(0.2, None) is None
    # The mean loss before the snapshot floors it too.
    assert history.diverging(0.05, 0.5) is None
    # Not before `min_samples` losses after the best snapshot.
    history.sustained.clear()
    assert history.diverging(0.05, None) is None


def test_a_regression_needs_the_start_outside_the_spread():
    rng = np.random.default_rng(3)
    history = make_history()
    feed(history, [1.0] + list(2.0 * np.exp(rng.normal(0, 0.05, 30))))
    kind, message = history.regressing()
    assert kind == "regressing"
    assert "above 1.5x the loss the fit started from (1)" in message
    # A lucky first batch inside a wide spread: no regression.
    history = make_history()
    feed(history, [1.0] + list(2.0 * np.exp(rng.normal(0, 1.0, 30))))
    assert history.regressing() is None


def test_an_explosion_then_a_stall_at_the_start_level():
    rng = np.random.default_rng(4)
    history = make_history()
    start = 2.3
    healthy = start * np.exp(rng.normal(0, 0.05, 10))
    # The loss at 10x the start for the stretch (8 calls of 32 samples), the
    # gradient norm 100x: an explosion.
    exploding = np.full(8, 10 * start)
    dead = start * np.exp(rng.normal(0, 0.05, 40))
    losses = np.concatenate([healthy, exploding, dead])
    norms = np.concatenate([np.ones(10), np.full(8, 100.0), np.ones(40)])
    spikes, problems = feed(history, losses, norms)
    assert history.exploded_at is not None
    kinds = [kind for _, kind in problems]
    assert "stalled" in kinds
    assert history.stalled()[1].startswith("no progress after an explosion")
    # The explosion at the start level was flagged at its step only.
    step = history.exploded_at
    assert history.exploded_at_start_level(step + 1) is None
    # After a rollback everything of it is forgotten.
    history.forget()
    assert history.exploded_at is None
    assert len(history.recent) == len(history.stretch) == 0
    assert history.stalled() is None
    assert history.bad_streak == 0


def test_rules_comparing_with_the_start_are_off_after_a_declined_rollback():
    history = make_history()
    history.level_rules_off = True
    feed(history, [1.0] + [2.0] * 30)
    assert history.problem(None, 31, math.inf, None) is None
    assert history.exploded_at is None


def test_the_start_is_the_mean_of_the_first_32_samples():
    # Batches of 4: the first 8 calls hold the start.
    history = make_history()
    history.start_calls, history.call_samples = 8, 4
    feed(history, [float(i) for i in range(1, 13)])
    assert history.start_loss == pytest.approx(np.mean(range(1, 9)))
    assert history.stretch.maxlen == rules.EXPLOSION_STRETCH * 8


def test_only_an_applied_loss_spike_is_an_applied_bad_step():
    # A backup waits while one is in the window (`ready_for_backup`); steps
    # skipped in-graph (non-finite, gradient-norm spikes) changed no weight.
    history = make_history()
    rng = np.random.default_rng(0)
    feed(history, 1.0 + 0.05 * rng.standard_normal(40))
    assert not history.applied_bad_steps()
    history.note_bad(1, 1, nonfinite=True)  # a NaN batch, skipped
    history.note_bad(1, 1)  # a gradient-norm spike, skipped
    assert history.bad_streak == 2
    assert not history.applied_bad_steps()
    spikes, _ = feed(history, [500.0], start=40)
    assert spikes == [(41, "loss")]
    assert history.applied_bad_steps()
    # Out of the window (2 * (max_consecutive_skips + 1) = 8 steps) after 8 more.
    feed(history, 1.0 + 0.05 * rng.standard_normal(8), start=41)
    assert not history.applied_bad_steps()


def test_a_state_taken_back_judges_as_the_original_would():
    # A run resumed from a backup (`get_state` into its metadata, as JSON):
    # the same losses then give the same spikes and problems.
    import json

    rng = np.random.default_rng(1)
    losses = list(np.exp(rng.standard_normal(60) * 0.3) * 2.0)
    original = make_history()
    feed(original, losses)
    resumed = make_history()
    resumed.set_state(json.loads(json.dumps(original.get_state())))
    later = list(np.exp(rng.standard_normal(40) * 0.3) * 2.0) + [400.0, 2.0, 900.0]
    later += [30.0] * 40  # an explosion that stays up
    a = feed(original, later, start=60)
    b = feed(resumed, later, start=60)
    assert a == b
    assert a[0] and a[1]  # spikes and a problem, judged the same
    assert original.get_state() == resumed.get_state()
