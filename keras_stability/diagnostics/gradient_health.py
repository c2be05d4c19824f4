"""Pure numeric core of gradient health: vanishing / exploding layers.

Nothing here knows Keras training. `diagnose_layers` takes the recorded
per-layer gradient norms (one list per layer, one value per check) and says
which layers vanish or explode, with the standard remedies.
"""

import math
from collections.abc import Mapping

import numpy as np

from keras_stability._checks import check_choice
from keras_stability._checks import check_number
from keras_stability._checks import check_positive_int
from keras_stability._checks import check_str
from keras_stability._checks import invalid
from keras_stability._checks import is_number

__all__ = [
    "EXPLODING",
    "HEALTHY",
    "REMEDIES",
    "VANISHING",
    "LayerFinding",
    "diagnose_layers",
    "format_findings",
]

HEALTHY = "healthy"
VANISHING = "vanishing"
EXPLODING = "exploding"

REMEDIES = {
    VANISHING: (
        "use a ReLU-family activation (relu, gelu, swish) with He initialisation "
        "(kernel_initializer='he_normal'), add normalization (BatchNormalization "
        "or LayerNormalization), or add residual connections"
    ),
    EXPLODING: (
        "lower the learning rate, clip gradients (GuardedOptimizer with a "
        "clipping policy, or global_clipnorm), add normalization, or use a "
        "smaller initialisation scale"
    ),
}


class LayerFinding:
    """What the diagnosis says about one layer.

    Args:
        layer: Layer (group) name, a non-empty string.
        status: `"healthy"`, `"vanishing"` or `"exploding"`.
        norm: The layer's last gradient norm (a number; NaN or infinity for
            a non-finite gradient).
        ratio: The last norm divided by the largest layer's norm at that
            check (a number; NaN when there is no reference).
        reason: One sentence saying which rule fired. Defaults to `""`.

    Attributes:
        remedy: The standard remedies for `status` (empty when healthy).

    Raises:
        ValueError: On a bad argument.
    """

    def __init__(self, layer, status, norm, ratio, reason=""):
        self.layer = check_str("layer", layer)
        self.status = check_choice("status", status, (HEALTHY, VANISHING, EXPLODING))
        for name, value in (("norm", norm), ("ratio", ratio)):
            if not is_number(value):
                raise invalid(name, value, "a number (NaN or infinity allowed)")
        self.norm = float(norm)
        self.ratio = float(ratio)
        self.reason = check_str("reason", reason, allow_empty=True)
        self.remedy = REMEDIES.get(status, "")

    def to_dict(self):
        return {
            "layer": self.layer,
            "status": self.status,
            "norm": self.norm,
            "ratio": self.ratio,
            "reason": self.reason,
            "remedy": self.remedy,
        }

    def __repr__(self):
        return (
            f"LayerFinding(layer={self.layer!r}, status={self.status!r}, "
            f"norm={self.norm:.3g}, ratio={self.ratio:.3g})"
        )


def _check_norms(norms):
    if not isinstance(norms, Mapping) or not all(isinstance(n, str) for n in norms):
        raise invalid(
            "norms",
            norms,
            "a mapping of layer name (str) -> sequence of gradient norms",
        )
    table = []
    for name, values in norms.items():
        try:
            row = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            row = None
        if row is None or row.ndim != 1:
            raise invalid(
                "norms",
                norms,
                f"a sequence of numbers for every layer (layer {name!r})",
            )
        table.append(row)
    if len({len(row) for row in table}) > 1:
        raise ValueError(
            "Invalid value for argument `norms`. Expected sequences of equal "
            f"length. Received lengths: { {n: len(norms[n]) for n in norms} }"
        )
    return table


def _check_exclude(exclude):
    if (
        isinstance(exclude, (str, bytes))
        or not isinstance(exclude, (list, tuple, set, frozenset))
        or not all(isinstance(n, str) for n in exclude)
    ):
        raise invalid("exclude", exclude, "a list or tuple of layer names")
    return set(exclude)


def diagnose_layers(
    norms,
    exclude=(),
    vanish_floor=1e-8,
    vanish_ratio=1e-3,
    explode_norm=1e3,
    explode_factor=100.0,
    patience=3,
):
    """Says which layers' gradients vanish or explode.

    A layer is *vanishing* when, at each of its last `patience` checks, its
    gradient norm is below `vanish_floor` or below `vanish_ratio` times the
    largest norm of any layer at that check. It is *exploding* when at each
    of its last `patience` checks its norm is above `explode_norm` or above
    `explode_factor` times the median of its own earlier checks.

    Args:
        norms: Mapping layer name -> sequence of gradient norms, one per
            check; all sequences have the same length. Non-finite values count
            as exploding.
        exclude: Layer names reported but never flagged vanishing and not used
            as the reference norm (embeddings, whose gradients are sparse).
            Defaults to `()`.
        vanish_floor: Absolute norm floor. Defaults to `1e-8`.
        vanish_ratio: Fraction of the largest layer's norm, in (0, 1).
            Defaults to `1e-3`.
        explode_norm: Absolute norm bound. Defaults to `1e3`.
        explode_factor: Growth over the layer's own earlier median, > 1.
            Defaults to `100.0`.
        patience: Consecutive checks a rule must hold. Defaults to `3`.

    Returns:
        List of `LayerFinding`, one per layer, in the order of `norms`.

    Raises:
        ValueError: If `norms` is not a mapping of names to equally long
            sequences of numbers, `exclude` is not a list of names,
            `vanish_floor` or `explode_norm` is not positive, `vanish_ratio`
            is not in (0, 1), `explode_factor` is not > 1 or `patience` is
            not a positive integer.

    Example:

    >>> findings = diagnose_layers(
    ...     {"dense": [1e-9, 1e-9, 1e-9], "head": [0.5, 0.4, 0.6]})
    >>> [f.status for f in findings]
    ['vanishing', 'healthy']
    """
    rows = _check_norms(norms)
    excluded_names = _check_exclude(exclude)
    vanish_floor = check_number("vanish_floor", vanish_floor, low=0.0, low_open=True)
    vanish_ratio = check_number(
        "vanish_ratio", vanish_ratio, low=0.0, high=1.0, low_open=True, high_open=True
    )
    explode_norm = check_number("explode_norm", explode_norm, low=0.0, low_open=True)
    explode_factor = check_number(
        "explode_factor", explode_factor, low=1.0, low_open=True
    )
    patience = check_positive_int("patience", patience)
    names = list(norms)
    if not names:
        return []
    table = np.asarray(rows)
    n_checks = table.shape[1]
    excluded = np.asarray([n in excluded_names for n in names])
    reference_rows = table[~excluded] if (~excluded).any() else table
    with np.errstate(invalid="ignore"):
        finite_ref = np.where(np.isfinite(reference_rows), reference_rows, 0.0)
    reference = finite_ref.max(axis=0) if n_checks else np.zeros(0)

    findings = []
    for i, name in enumerate(names):
        row = table[i]
        last = row[-1] if n_checks else math.nan
        ratio = last / reference[-1] if n_checks and reference[-1] > 0 else math.nan
        if n_checks < patience:
            findings.append(LayerFinding(name, HEALTHY, last, ratio, "too few checks"))
            continue
        recent = row[-patience:]
        ref_recent = reference[-patience:]
        # Exploding: non-finite, above the bound, or grown past the factor.
        earlier = row[:-patience]
        earlier = earlier[np.isfinite(earlier)]
        baseline = float(np.median(earlier)) if earlier.size else math.inf
        with np.errstate(invalid="ignore"):
            too_big = (~np.isfinite(recent)) | (recent > explode_norm)
            if baseline > 0 and np.isfinite(baseline):
                too_big |= recent > explode_factor * baseline
        if too_big.all():
            reason = (
                f"gradient norm {last:.3g} for {patience} checks in a row is above "
                f"{explode_norm:g}"
                + (
                    f" or {explode_factor:g}x its earlier median {baseline:.3g}"
                    if np.isfinite(baseline)
                    else ""
                )
            )
            findings.append(LayerFinding(name, EXPLODING, last, ratio, reason))
            continue
        if not excluded[i]:
            with np.errstate(invalid="ignore"):
                too_small = (recent < vanish_floor) | (
                    recent < vanish_ratio * ref_recent
                )
            if too_small.all():
                reason = (
                    f"gradient norm {last:.3g} for {patience} checks in a row is "
                    f"below {vanish_floor:g} or {vanish_ratio:g}x the largest "
                    f"layer's ({ref_recent[-1]:.3g})"
                )
                findings.append(LayerFinding(name, VANISHING, last, ratio, reason))
                continue
        findings.append(LayerFinding(name, HEALTHY, last, ratio))
    return findings


def format_findings(findings):
    """Formats the unhealthy findings as warning lines with remedies.

    Args:
        findings: List of `LayerFinding`.

    Returns:
        A string: one paragraph per unhealthy status naming its layers, the
        rule that fired and the remedies; empty when all layers are healthy.

    Raises:
        ValueError: If `findings` is not a list of `LayerFinding`.
    """
    if not isinstance(findings, (list, tuple)) or not all(
        isinstance(f, LayerFinding) for f in findings
    ):
        raise invalid("findings", findings, "a list of `LayerFinding`")
    lines = []
    for status in (VANISHING, EXPLODING):
        bad = [f for f in findings if f.status == status]
        if not bad:
            continue
        names = ", ".join(f.layer for f in bad)
        lines.append(
            f"{status.capitalize()} gradients in {len(bad)} layer(s): {names}. "
            f"E.g. {bad[0].layer}: {bad[0].reason}. Remedies: {REMEDIES[status]}."
        )
    return "\n".join(lines)
