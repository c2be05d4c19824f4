"""The windows of one fit's raw losses and gradient norms, and the rules on them.

`LossHistory` is what `GradientExplosionDetector` remembers of the steps it
judged (the loss the fit started from, the last healthy losses, the stretch
an explosion is judged on, the recent bad steps) and asks of them: is this
step a spike, and is there a problem (`rules`, where the rules and their
thresholds are described). Host side and pure: no Keras, no model; a test
feeds it losses. What is done about a problem is in
`keras_stability.callbacks.recovery`.
"""

import collections
import math

import numpy as np

from keras_stability.diagnostics import rules
from keras_stability.diagnostics.spikes import RobustZScore

__all__ = ["DIVERGENCE_FLOOR", "SMALL_BATCH", "START_SAMPLES", "LossHistory"]

# A slow divergence is judged against the best snapshot's loss, but at least
# this fraction of the loss the fit started from.
DIVERGENCE_FLOOR = 0.1
# The loss a fit started from is the mean raw loss of its first batches
# holding at least this many samples.
START_SAMPLES = 32
# In the first steps a loss spike is also judged against a starting level:
# below this many samples per step the mean of the first START_SAMPLES
# samples (one step's loss is no statistic), at or above it the first
# step's loss.
SMALL_BATCH = 8


class LossHistory:
    """The raw losses and gradient norms of one fit, as the rules need them.

    Args:
        window: Healthy values the spike scores are taken over.
        min_samples: Values before a spike score is taken; the length of the
            windows of the level rules (divergence, regression, stall).
        loss_z_threshold: Robust z-score of a loss spike.
        grad_z_threshold: Robust z-score of a gradient-norm spike.
        loss_factor: `None`, or the multiple of the reference loss that is a
            spike in the first steps and a divergence later.
        regress_factor: `None`, or the multiple of the starting loss that is
            a regression.
        max_consecutive_skips: Bad steps tolerated among the last
            `2 * (max_consecutive_skips + 1)`.
        mark: Returns the epoch's loss total before a step (the detector's
            `RowLoss.mark`): taken at the first bad step of a streak, so
            that a rollback takes the whole streak out of the epoch's mean.
    """

    def __init__(
        self,
        window,
        min_samples,
        loss_z_threshold,
        grad_z_threshold,
        loss_factor,
        regress_factor,
        max_consecutive_skips,
        mark=None,
    ):
        self.min_samples = min_samples
        self.max_consecutive_skips = max_consecutive_skips
        self.loss_factor = loss_factor
        self.regress_factor = regress_factor
        self._mark = mark
        self.loss_z = RobustZScore(window, loss_z_threshold, min_samples)
        self.grad_z = RobustZScore(window, grad_z_threshold, min_samples)
        # The loss the fit started from (mean of its first raw losses), the
        # gradient norms of the same steps and their mean (`None` without a
        # norm); the calls that hold START_SAMPLES samples and the samples
        # per call (set by the detector at the first judged step).
        self.start_loss = math.nan
        self.start_losses = []
        self.start_norms = []
        self.start_norm = None
        self.start_calls = None
        self.call_samples = None
        # The last `min_samples` healthy losses, and those without spikes
        # after the best snapshot (a slow divergence is judged on them).
        self.recent = collections.deque(maxlen=min_samples)
        self.sustained = collections.deque(maxlen=min_samples)
        # The explosion rule's stretch (made at the first judged step): its
        # losses without spikes, its gradient norms, its spikes' losses (else
        # `None`) and the healthy losses that left it.
        self.stretch = None
        self.stretch_norms = None
        self.stretch_spikes = None
        self.before_stretch = None
        self._window = window
        self.exploded_at = None  # the step of the last explosion (`rules.exploded`)
        # After a rollback undone or declined, the rules comparing the loss
        # with its start or a snapshot are off for the rest of the fit.
        self.level_rules_off = False
        # The last 2 * (max_consecutive_skips + 1) steps as `(raw loss, bad)`
        # (bad: a loss spike, a skipped step; the loss `inf` for a non-finite
        # step, `None` when not judged), and how many were bad.
        self.bad_window = collections.deque(maxlen=2 * (max_consecutive_skips + 1))
        self.bad_streak = 0
        self.last_bad = False  # whether the last call was bad
        self.streak_mark = None  # the epoch's loss total before the first of them

    # -- kept in a backup -------------------------------------------------------
    _VALUES = (
        "start_loss",
        "start_norm",
        "start_calls",
        "call_samples",
        "exploded_at",
        "level_rules_off",
        "bad_streak",
        "last_bad",
    )
    _WINDOWS = (
        "recent",
        "sustained",
        "stretch",
        "stretch_norms",
        "stretch_spikes",
        "before_stretch",
        "bad_window",
    )

    def get_state(self):
        """Every window and value the rules judge, as a JSON-able dict (floats
        may be NaN or infinite, as Python's `json` writes them): a run
        resumed from a backup judges as the killed run would have
        (`set_state`)."""
        state = {name: getattr(self, name) for name in self._VALUES}
        state["start_losses"] = list(self.start_losses)
        state["start_norms"] = list(self.start_norms)
        for name in self._WINDOWS:
            window = getattr(self, name)
            state[name] = (
                None
                if window is None
                else {
                    "maxlen": window.maxlen,
                    "values": [list(v) if isinstance(v, tuple) else v for v in window],
                }
            )
        state["loss_z"] = self.loss_z.get_state()
        state["grad_z"] = self.grad_z.get_state()
        return state

    def set_state(self, state):
        """Takes back what `get_state` gave. The epoch's loss mark of a bad
        streak is not: the resumed epoch's mean starts afresh."""
        for name in self._VALUES:
            if name in state:
                setattr(self, name, state[name])
        self.start_losses = list(state.get("start_losses", []))
        self.start_norms = list(state.get("start_norms", []))
        for name in self._WINDOWS:
            window = state.get(name)
            if window is None:
                setattr(self, name, None)
                continue
            values = window["values"]
            if name == "bad_window":
                values = [tuple(v) for v in values]
            setattr(self, name, collections.deque(values, maxlen=window["maxlen"]))
        self.loss_z.set_state(state.get("loss_z", {}))
        self.grad_z.set_state(state.get("grad_z", {}))
        self.streak_mark = None

    # -- bad steps ------------------------------------------------------------
    def note_bad(self, bad, steps, loss=None, nonfinite=False):
        """Records a call of `steps` batches, `bad` of them bad.

        `loss`: the call's raw loss if it was judged; `nonfinite`: whether
        its bad steps were non-finite.
        """
        if bad and not self.bad_streak and self._mark is not None:
            self.streak_mark = self._mark()
        self.bad_window.extend(
            [(loss, False)] * (steps - bad)
            + [(math.inf if nonfinite else loss, True)] * bad
        )
        self.bad_streak = sum(is_bad for _, is_bad in self.bad_window)
        self.last_bad = bool(bad)

    def applied_bad_steps(self):
        """Whether a bad step in the window was applied: a loss spike (its
        loss finite), not a step skipped in-graph (non-finite, or a
        gradient-norm spike)."""
        return any(
            bad and loss is not None and math.isfinite(loss)
            for loss, bad in self.bad_window
        )

    def rising(self):
        """`rules.rising` on the window of the bad-step count.

        Its reference is the median of the healthy losses before the window
        (the loss window's values, less the window's good steps at its end),
        or the window's first good loss when none came before.
        """
        good = [v for v, bad in self.bad_window if not bad and v is not None]
        values = list(self.loss_z.values)
        before = values[: max(len(values) - len(good), 0)]
        if before:
            reference = float(np.median(before))
        else:
            reference = good[0] if good else math.inf
        return rules.rising(self.bad_window, reference)

    # -- one judged step ----------------------------------------------------
    def observe(self, raw, norm, steps, step):
        """Takes in a finite judged call (`steps` batches) at `step`.

        Returns:
            `(loss spike, gradient-norm spike)`: each a description, or
            `None` when the step is none.
        """
        if not self.start_losses:
            # The first judged step of this fit: the explosion evidence
            # starts afresh (the detector may be reused across `fit` calls).
            self.exploded_at = None
            maxlen = rules.EXPLOSION_STRETCH * (self.start_calls or 1)
            self.stretch = collections.deque(maxlen=maxlen)
            self.stretch_norms = collections.deque(maxlen=maxlen)
            self.stretch_spikes = collections.deque(maxlen=maxlen)
            self.before_stretch = collections.deque(maxlen=self._window)
        if len(self.start_losses) < (self.start_calls or 1):
            # The loss the fit started from: the mean over its first
            # START_SAMPLES samples (one batch of 1 may be a lucky one).
            self.start_losses.append(raw)
            self.start_loss = float(np.mean(self.start_losses))
            if norm is not None:
                self.start_norms.append(norm)
                self.start_norm = float(np.mean(self.start_norms))
        self.recent.append(raw)
        # The gradient norms of as many last steps as the stretch holds,
        # spikes included: an explosion's largest gradients may come with
        # loss spikes, which stay out of the stretch's losses.
        self.stretch_norms.append(norm)
        spike = self.loss_spike(raw)
        self.stretch_spikes.append(None if spike is None else raw)
        if spike is None:
            # A single spike is neither a divergence nor an explosion: it
            # stays out of their means (a bad batch of a 1000x loss is 50x
            # the mean of 20 steps, 125x that of 8).
            self.sustained.append(raw)
            if len(self.stretch) == self.stretch.maxlen:
                self.before_stretch.append(self.stretch[0])
            self.stretch.append(raw)
        if (
            self.exploded_at is None
            and not self.level_rules_off
            and len(self.stretch) == self.stretch.maxlen
            and rules.exploded(
                self.stretch,
                self.start_loss,
                norms=self.stretch_norms,
                start_norm=self.start_norm,
                before=self.before_stretch,
                spikes=self.stretch_spikes,
            )
        ):
            self.exploded_at = step
        if spike is not None:
            self.note_bad(steps, steps, loss=raw)
        else:
            self.note_bad(0, steps, loss=raw)
        return spike, None if norm is None else self.grad_spike(norm)

    def grad_spike(self, norm):
        """Describes `norm` if it is a gradient-norm spike (else `None`);
        updates the window."""
        z = self.grad_z
        score = z.zscore(norm)
        if not z.update(norm):
            return None
        return (
            f"gradient-norm spike: norm {norm:.4g} is {norm / z.median():.3g}x "
            f"the median {z.median():.4g} of the last {len(z.values)} healthy "
            f"steps (robust z-score {score:.1f})"
        )

    def loss_spike(self, raw):
        """Describes `raw` if it is a loss spike (else `None`); updates the window.

        Three floors keep heavy-tailed small-batch noise from counting: a
        loss of `rules.SPIKE_FLOOR` (0.1) or below, or below a tenth of the
        starting loss, is never a spike (near zero loss nothing is "10x"
        anything by noise), and in the first `min_samples` steps a spike
        must be `loss_factor` times the larger of their median and the
        starting loss, at batch sizes of `SMALL_BATCH` or more the first
        step's loss (the median of a few batch losses is no statistic: at
        batch size 1 a fast-falling run's are near zero, and an ordinary
        misclassified sample is then "400x" it; at batch size 32, fine-tuning
        on a 3% new class, 62% of the batches hold one (0.5-1.0), and the
        median of the first 5 was 3 lucky ones without (0.006)).
        """
        z = self.loss_z
        start = self.start_loss if math.isfinite(self.start_loss) else 0.0
        if not z.ready():
            median = z.median()
            if (self.call_samples or SMALL_BATCH) >= SMALL_BATCH:
                # The loss of the initial weights on a batch (the mean of the
                # first samples would take in a climb already under way).
                first = self.start_losses[0] if self.start_losses else math.nan
                start = first if math.isfinite(first) else 0.0
            reference = max(median, start) if math.isfinite(median) else start
            if (
                self.loss_factor is not None
                and reference > 0
                and len(z.values) > 0
                and raw > self.loss_factor * reference
                and raw > rules.SPIKE_FLOOR
            ):
                what = (
                    f"the median {median:.4g} of the first {len(z.values)} steps"
                    if median >= start
                    else f"the starting loss {start:.4g}"
                )
                return (
                    f"loss spike: raw loss {raw:.4g} is {raw / reference:.3g}x {what}"
                )
            z.update(raw)
            return None
        score = z.zscore(raw)
        median = z.median()
        if not raw > max(DIVERGENCE_FLOOR * start, rules.SPIKE_FLOOR):
            # Near zero, or far below the starting loss: never a spike (the
            # window still judges whether to keep it, as for any value).
            z.update(raw)
            return None
        if not z.update(raw):
            return None
        return (
            f"loss spike: raw loss {raw:.4g} is {raw / median:.3g}x the median "
            f"{median:.4g} of the last {len(z.values)} healthy steps (robust z-score "
            f"{score:.1f})"
        )

    # -- problems: `(kind, message)` or `None` ---------------------------------
    def problem(self, spike, step, best_score, best_typical):
        """The first problem of the rules after `observe`, but an explosion at
        the starting level (`exploded_at_start_level`, which needs a
        comparison the detector decides on).

        `spike`: `observe`'s loss spike; `best_score`, `best_typical`: the
        best snapshot's score and the mean loss of the steps before it.
        """
        if self.bad_streak > self.max_consecutive_skips and self.rising():
            return (
                "rising",
                f"loss rising: {self.bad_streak} of the last {len(self.bad_window)} "
                f"steps bad (loss spikes or non-finite steps)"
                + (f", the last: {spike}" if spike is not None else ""),
            )
        if not self.level_rules_off:
            found = self.diverging(best_score, best_typical)
            if found is not None:
                return found
            found = self.regressing()
            if found is not None:
                return found
        return self.stalled()

    def diverging(self, best_score, best_typical):
        """A slow divergence (`rules.diverging`): the median of the last
        `min_samples` losses, all after the best snapshot, `loss_factor`
        times its loss floored at a tenth of the starting loss, at
        `rules.NEAR_ZERO` and at the mean loss of the steps before it."""
        if self.loss_factor is None or len(self.sustained) < self.sustained.maxlen:
            return None
        found = rules.diverging(
            self.sustained,
            best_score,
            self.start_loss,
            self.loss_factor,
            DIVERGENCE_FLOOR,
            typical=best_typical,
        )
        if found is None:
            return None
        median, reference = found
        if reference <= best_score:
            floor = ""
        elif reference == rules.NEAR_ZERO:
            floor = f" (floored at {rules.NEAR_ZERO:g}: a loss near zero)"
        elif reference == best_typical:
            floor = (
                f" (floored at {reference:.4g}, the mean loss of the steps "
                "before that snapshot)"
            )
        else:
            floor = (
                f" (floored at {DIVERGENCE_FLOOR:g}x the starting loss: "
                f"{reference:.4g})"
            )
        return (
            "diverging",
            f"loss diverging: median raw loss {median:.4g} over the last "
            f"{len(self.sustained)} steps is above {self.loss_factor:g}x "
            f"the best healthy snapshot's loss {best_score:.4g}" + floor,
        )

    def regressing(self):
        """Whether the last `min_samples` losses say training made the model
        worse than it began: their median `regress_factor` times the loss
        the fit started from (the mean raw loss of its first START_SAMPLES
        samples), and that loss implausible as a draw from them (2 of their
        standard deviations below their mean), so that a lucky first batch,
        or a few bad batches in a row at batch size 1, are not a trend."""
        if (
            self.regress_factor is None
            or len(self.recent) < self.recent.maxlen
            or len(self.start_losses) < (self.start_calls or 1)
            or not rules.regressing(self.recent, self.start_loss, self.regress_factor)
        ):
            return None
        median = float(np.median(np.asarray(self.recent, dtype=np.float64)))
        return (
            "regressing",
            f"loss regressing: median raw loss {median:.4g} over the last "
            f"{len(self.recent)} steps is above {self.regress_factor:g}x the loss "
            f"the fit started from ({self.start_loss:.4g})",
        )

    def stall_window(self):
        """The losses whose jitter `stalled` judges (`None` while too few)."""
        if len(self.recent) < self.recent.maxlen:
            return None
        stretch = self.stretch
        if stretch is None or stretch.maxlen <= len(self.recent):
            return self.recent
        return stretch if len(stretch) == stretch.maxlen else None

    def stalled(self):
        """Whether the loss, after an explosion since the last rollback (or
        the start of `fit`), is stuck at the level it started from
        (`rules.stalled`): the median of the last `min_samples` losses at
        that level, and the losses moving smoothly from step to step over
        the last `min_samples` steps or the last 256 samples, whichever is
        longer (a few small batches may move smoothly by chance). An
        explosion that kills the model (its prediction the class prior) ends
        there, below any regression, and learns nothing more; a healthy run
        never explodes (`rules.exploded`: a stretch of 256 samples at 2x the
        start and above the losses before it, and a gradient norm in it at
        2x the starting one), and a fit model that stays at its near-zero
        start has losses that jump by orders of magnitude from one batch to
        the next."""
        window = self.stall_window()
        if (
            self.exploded_at is None
            or window is None
            or not rules.stalled(self.recent, self.start_loss, window=window)
        ):
            return None
        return (
            "stalled",
            f"no progress after an explosion: median raw loss "
            f"{np.median(self.recent):.4g} over the last {len(self.recent)} steps "
            f"is still {rules.STALL_LEVEL:g}x the loss the fit started from "
            f"({self.start_loss:.4g}) or more and stuck there (from one step "
            f"to the next x{math.exp(rules.jitter(window)):.3g} in the median), "
            f"after the explosion of step {self.exploded_at} (the loss at "
            f"{rules.EXPLOSION_FACTOR:g}x it or more, or "
            f"{rules.EXPLOSION_SPIKES} spikes at {rules.CLIMB_FACTOR:g}x)",
        )

    def exploded_at_start_level(self, step):
        """An explosion flagged at `step` that leaves the stretch's median at
        `rules.STALL_LEVEL` times the starting loss or above, from a start
        that is not near zero (`rules.NEAR_ZERO`): the model no better than
        where `fit` began. The detector acts on it only with a comparison
        (a rollback made blind this early cannot be told from a rise of the
        data, an unshuffled series); without one, the stall decides later. A
        fit model near zero loss (a second `fit`, 0.004, or learning a new
        rare class, 0.0007-0.005) explodes by the rules while healthy (its
        losses jump 20-50x from one batch to the next, and a rare class's
        batches spike) and its snapshot scores what the current weights do:
        it waits for the stall, whose smooth losses tell a dead model from a
        fit one."""
        if not (
            self.exploded_at == step
            and not self.level_rules_off
            and self.start_loss >= rules.NEAR_ZERO
        ):
            return None
        median = float(np.median(self.stretch))
        if not median >= rules.STALL_LEVEL * self.start_loss:
            return None
        return (
            "exploded",
            f"loss exploded: median raw loss {median:.4g} over the last "
            f"{len(self.stretch)} steps, {median / self.start_loss:.3g}x the loss "
            f"the fit started from ({self.start_loss:.4g}), after an explosion "
            f"(the loss at {rules.EXPLOSION_FACTOR:g}x it, or "
            f"{rules.EXPLOSION_SPIKES} spikes at {rules.CLIMB_FACTOR:g}x it, with "
            f"the gradient norm at {rules.EXPLOSION_NORM_FACTOR:g}x the starting one)",
        )

    def forget(self):
        """After a rollback: the bad steps, the level windows and the
        explosion are forgotten (a stall is judged on new evidence only:
        right after a rollback the loss is back at its start for a while)."""
        self.bad_window.clear()
        self.bad_streak = 0
        self.recent.clear()
        self.sustained.clear()
        self.exploded_at = None
        if self.stretch is not None:
            self.stretch.clear()
            self.stretch_norms.clear()
            self.stretch_spikes.clear()
            self.before_stretch.clear()
