"""ZClip: z-score based adaptive clipping with EMA statistics of the norm."""

import keras
from keras import ops

from keras_stability import _keras_internals
from keras_stability._checks import check_number
from keras_stability._checks import check_positive
from keras_stability._checks import check_positive_int
from keras_stability.clipping.base import ClippingPolicy
from keras_stability.clipping.base import _scalar_variable
from keras_stability.clipping.base import check_count
from keras_stability.clipping.base import check_tensor


def _check_alpha(value):
    return check_number(
        "alpha", value, low=0.0, high=1.0, low_open=True, high_open=True
    )


__all__ = ["ZClip", "zclip_step"]


def zclip_step(
    norm,
    mean,
    var,
    count,
    warmup_steps,
    alpha,
    z_threshold,
    max_norm=None,
    epsilon=1e-6,
):
    """One ZClip step on scalar statistics (pure; no assignment).

    During warm-up (the first `warmup_steps` accepted steps) only `max_norm`
    clips, and `mean`/`var` accumulate the norms' running mean and sum of
    squared deviations (Welford); when warm-up completes `var` becomes their
    population variance, as the reference implementation computes from its
    buffer, without keeping a buffer. Afterwards, with
    `z = (norm - mean) / (sqrt(var) + epsilon)`, a norm with `z > z_threshold` is
    clipped to `mean + z_threshold**2 * std / z` (the paper's reciprocal
    "adaptive scaling"), otherwise the threshold reported is the z-score
    boundary `mean + z_threshold * std`. The EMA is then updated with the
    effective (post-clip) norm: `mean = alpha*mean + (1-alpha)*g`,
    `var = alpha*var + (1-alpha)*(g - mean)**2` (new mean), as in the reference
    implementation. `max_norm`, if given, caps the threshold at every step.

    Args:
        norm: Float32 scalar, this step's pre-clip global norm.
        mean: Float32 scalar, EMA mean (running mean during warm-up).
        var: Float32 scalar, EMA variance (sum of squared deviations during
            warm-up).
        count: Int32 scalar, accepted steps so far.
        warmup_steps: Int >= 1.
        alpha: Float in (0, 1), EMA factor.
        z_threshold: Positive float.
        max_norm: Optional positive float. Defaults to `None`.
        epsilon: Small positive float added to the std. Defaults to `1e-6`.

    Returns:
        Tuple `(threshold, (mean, var, count))` with the new state.

    Raises:
        ValueError: If an argument is of the wrong kind or out of range.
    """
    norm = check_tensor("norm", norm)
    mean = check_tensor("mean", mean)
    var = check_tensor("var", var)
    count = check_count("count", count)
    warmup_steps = check_positive_int("warmup_steps", warmup_steps)
    alpha = _check_alpha(alpha)
    z_threshold = check_positive("z_threshold", z_threshold)
    max_norm = check_positive("max_norm", max_norm, allow_none=True)
    epsilon = check_positive("epsilon", epsilon)
    norm = ops.cast(norm, "float32")
    count = ops.cast(count, "int32")
    in_warmup = ops.less(count, warmup_steps)

    # Warm-up: Welford's running mean and sum of squared deviations.
    n = ops.cast(count + 1, "float32")
    delta = norm - mean
    warm_mean = mean + delta / n
    warm_m2 = var + delta * (norm - warm_mean)
    warm_var = ops.where(ops.equal(count, warmup_steps - 1), warm_m2 / n, warm_m2)

    # After warm-up: z-score of this norm against the EMA statistics.
    std = ops.sqrt(ops.maximum(var, 0.0))
    z = (norm - mean) / (std + epsilon)
    spike = ops.greater(z, z_threshold)
    adaptive = mean + (z_threshold * z_threshold) * std / ops.where(spike, z, 1.0)
    boundary = mean + z_threshold * std
    effective = ops.where(spike, adaptive, norm)
    ema_mean = alpha * mean + (1.0 - alpha) * effective
    ema_var = alpha * var + (1.0 - alpha) * ops.square(effective - ema_mean)

    cap = float("inf") if max_norm is None else float(max_norm)
    threshold = ops.where(
        in_warmup, cap, ops.minimum(ops.where(spike, adaptive, boundary), cap)
    )
    new_mean = ops.where(in_warmup, warm_mean, ema_mean)
    new_var = ops.where(in_warmup, warm_var, ema_var)
    return threshold, (new_mean, new_var, count + 1)


@keras.saving.register_keras_serializable(package="keras_stability")
class ZClip(ClippingPolicy):
    """Clips norms whose z-score against EMA statistics exceeds a threshold.

    Keeps exponential moving averages of the mean and variance of the global
    gradient norm in variables (three scalars, no host sync, no buffer). See
    `zclip_step` for the exact update. Non-finite and skipped steps leave the
    statistics unchanged.

    Args:
        alpha: Float in (0, 1), EMA factor. Defaults to `0.97`.
        z_threshold: Positive float, z-score above which the norm is clipped.
            Defaults to `2.5`.
        warmup_steps: Integer >= 1, accepted steps used to initialise the
            statistics. Defaults to `25`.
        max_norm: Optional positive float, a hard cap applied at every step
            (also during warm-up). Defaults to `None`.

    Reference:
        Kumar et al., "ZClip: Adaptive Spike Mitigation for LLM Pre-Training",
        arXiv:2504.02507, 2025.
    """

    def __init__(self, alpha=0.97, z_threshold=2.5, warmup_steps=25, max_norm=None):
        super().__init__()
        self.alpha = _check_alpha(alpha)
        self.z_threshold = check_positive("z_threshold", z_threshold)
        self.warmup_steps = check_positive_int("warmup_steps", warmup_steps)
        self.max_norm = check_positive("max_norm", max_norm, allow_none=True)

    def build(self, optimizer, variables):
        del variables
        self.mean = _scalar_variable(optimizer, "zclip_mean")
        self.var = _scalar_variable(optimizer, "zclip_var")
        self.count = _scalar_variable(optimizer, "zclip_count", 0, "int32")
        self.state_variables = [self.mean, self.var, self.count]

    def threshold(self, norm):
        # Each variable read once (`.value` is read again by each op using it).
        mean, var, count = (_keras_internals.read(v) for v in self.state_variables)
        threshold, state = zclip_step(
            norm,
            mean,
            var,
            count,
            self.warmup_steps,
            self.alpha,
            self.z_threshold,
            self.max_norm,
        )
        return threshold, list(state)

    def get_config(self):
        return {
            "alpha": self.alpha,
            "z_threshold": self.z_threshold,
            "warmup_steps": self.warmup_steps,
            "max_norm": self.max_norm,
        }
