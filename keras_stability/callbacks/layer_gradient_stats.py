"""In-graph per-layer gradient statistics: a `GradientObserver`.

`GuardedOptimizer` calls `observe` inside the compiled train step with the
all-reduced, unscaled, pre-clip gradients. This observer reduces them to a few
numbers per layer (group of variables) and writes them into variables, which
the host reads only when it wants to. With `buffer_size`, every report step
also writes one row into an in-graph ring buffer, so the host can read many
steps at once (`GradientMonitor`: every `read_freq` steps). Nothing here
syncs with the host.
"""

import contextlib

import keras
import numpy as np
from keras import ops

from keras_stability import _keras_internals
from keras_stability._checks import check_bool
from keras_stability._checks import check_nonnegative_int
from keras_stability._checks import check_number
from keras_stability._checks import check_positive_int
from keras_stability._checks import invalid
from keras_stability.clipping.base import SquaredNorms
from keras_stability.clipping.base import squared_norms
from keras_stability.clipping.base import stacked_squared_norms
from keras_stability.optimizers import GradientObserver
from keras_stability.optimizers.guarded_optimizer import state_variable

__all__ = ["LayerGradientStats", "group_variables_by_layer", "log10_abs_histogram"]

# log10|g| histogram range (TensorBoard histograms of gradients).
HISTOGRAM_RANGE = (-12.0, 4.0)


def log10_abs_histogram(values, bins):
    """Counts of `log10|values|` in `bins` equal bins over `HISTOGRAM_RANGE`.

    Values below the range count in the first bin, above it (and `inf`) in
    the last; `nan` counts in the last bin too, so the counts always add up
    to `values`' size. A segment sum of ones with a static number of
    segments, not `bincount`, whose output length XLA cannot know when
    compiling (`jit_compile=True`). Memory grows with `values`' size, as
    with `bincount`, not with `size * bins` as a one-hot sum would; the
    ones are summed as int32 (a float32 sum would stop growing at 2**24).

    Args:
        values: Float tensor, any shape.
        bins: Number of bins, a Python int.

    Returns:
        A float32 tensor of shape `(bins,)`.
    """
    lo, hi = HISTOGRAM_RANGE
    values = ops.reshape(values, (-1,))
    logs = ops.log10(ops.abs(values) + 1e-30)
    idx = ops.floor((logs - lo) / (hi - lo) * bins)
    # `nan` has no bin: cast to int it is backend-defined (negative on CPU).
    idx = ops.where(ops.isnan(idx), bins - 1, ops.clip(idx, 0, bins - 1))
    idx = ops.cast(idx, "int32")
    counts = ops.segment_sum(ops.ones_like(idx), idx, num_segments=bins)
    return ops.cast(counts, "float32")


def group_variables_by_layer(model):
    """Groups a model's trainable variables by top-level layer.

    Variables of an `Embedding` (also inside a nested layer) form a group of
    their own, of kind `"embedding"`, since their sparse gradients are not
    comparable with dense layers'.

    Args:
        model: A built Keras model.

    Returns:
        List of `(name, kind, paths)`: group name, `"layer"` or `"embedding"`,
        and the variable paths in it. Every trainable variable is in exactly
        one group.
    """
    groups = []
    seen = set()
    for layer in model.layers:
        sublayers = _keras_internals.flatten_layers(layer, include_self=True)
        for sub in sublayers:
            if isinstance(sub, keras.layers.Embedding):
                paths = [v.path for v in sub.trainable_variables if v.path not in seen]
                if paths:
                    name = sub.name if sub is layer else f"{layer.name}/{sub.name}"
                    groups.append((name, "embedding", paths))
                    seen.update(paths)
        paths = [v.path for v in layer.trainable_variables if v.path not in seen]
        if paths:
            groups.append((layer.name, "layer", paths))
            seen.update(paths)
    for variable in model.trainable_variables:  # model-level variables
        if variable.path not in seen:
            _add_by_prefix(groups, variable.path)
    return groups


def _check_groups(groups):
    """`None`, or a list of `(name, kind, paths)` as `group_variables_by_layer` gives."""
    if groups is None:
        return None
    ok = isinstance(groups, (list, tuple)) and all(
        isinstance(g, (list, tuple))
        and len(g) == 3
        and isinstance(g[0], str)
        and g[1] in ("layer", "embedding")
        and isinstance(g[2], (list, tuple))
        and all(isinstance(p, str) for p in g[2])
        for g in groups
    )
    if not ok:
        raise invalid(
            "groups",
            groups,
            "None or a list of (name, kind, paths) triples, kind 'layer' or "
            "'embedding' (see group_variables_by_layer)",
        )
    return [(name, kind, list(paths)) for name, kind, paths in groups]


def _add_by_prefix(groups, path):
    """Adds `path` to the group named by its prefix, creating the group if new."""
    prefix = path.rsplit("/", 1)[0]
    for name, _, members in groups:
        if name == prefix:
            members.append(path)
            return
    groups.append((prefix, "layer", [path]))


def _read(variable):
    """The variable's value now, as a tensor (not a deferred read).

    Inside `tf.function`, `convert_to_tensor` of a Keras variable may read
    when its consumer runs; this reads here (`_keras_internals.read`),
    ordered before later updates of the variable (which then copy on write).
    """
    if isinstance(variable, keras.Variable):
        return _keras_internals.read(variable)
    read = getattr(variable, "read_value", None)
    return read() if read is not None else ops.convert_to_tensor(variable)


def _dense(g):
    if g is not None and hasattr(g, "indices"):
        return ops.convert_to_tensor(g)
    return g


def _strategy_scope(optimizer):
    import tensorflow as tf

    strategy = getattr(optimizer, "_distribution_strategy", None)
    if strategy is None or tf.distribute.has_strategy():
        return contextlib.nullcontext()
    return strategy.scope()


class LayerGradientStats(GradientObserver):
    """Per-layer gradient norm, weight norm and update-to-weight ratio.

    Register it on a `GuardedOptimizer` (`observers=[...]` or `add_observer`).
    `global_norm` and `step` are updated every step; the per-layer
    statistics only every `check_freq` steps (the last computed values
    stay in between), inside a `cond`, so other steps cost almost nothing:

    - `grad_norms` `(G,)`: L2 norm of each group's pre-clip gradient;
    - `global_norm` `()`: L2 norm of the whole gradient;
    - `weight_norms` `(G,)`: each group's weight norm before the update
      (every `check_freq` steps, only if `track_updates` or `histogram_bins`);
    - `update_ratios` `(G,)`: `||w_after - w_before|| / ||w_before||`
      (0 for a skipped step), only if `track_updates`;
    - `histograms` `(G, histogram_bins)`: counts of `log10|g|` over
      `HISTOGRAM_RANGE`, only if `histogram_bins > 0`;
    - `step` `()`: steps observed.

    With `buffer_size > 0`, each report step (and anomalous step) also writes
    a row `[global_norm, grad_norms, weight_norms, update_ratios,
    histograms]` (the last two when tracked) and its `step` into a ring
    buffer of `buffer_size` rows; `read_rows` returns the rows written after a
    given step. The host then needs one read per `buffer_size` reports
    instead of one per report.

    Args:
        groups: `(name, kind, paths)` triples from `group_variables_by_layer`,
            or `None` to group by each variable's path prefix (its layer).
            Defaults to `None`.
        check_freq: Steps between computations of the per-layer statistics
            (counted by `step`). Defaults to `1`.
        track_updates: Whether to compute update ratios. When every step
            reports, they come from the weights read before the update (no
            copy is kept); otherwise report steps copy the weights into
            variables. Defaults to `True`.
        histogram_bins: Bins of the per-group `log10|g|` histogram, 0 for
            none. Defaults to `0`.
        anomaly_factor: If set, the per-layer statistics are also computed
            on steps whose global norm is non-finite or above this multiple of
            the previous step's (so a bad step's layers are always known).
            Defaults to `None`.
        buffer_size: Rows of the ring buffer of per-step statistics, 0 for
            none. Defaults to `0`.
    """

    def set_model(self, model):
        """Refuses `fit(callbacks=[...])`: this is an observer, not a callback."""
        raise ValueError(
            "Invalid value for argument `callbacks`. `LayerGradientStats` is a "
            "gradient observer, not a callback: register it on a GuardedOptimizer "
            "(`GuardedOptimizer(optimizer, observers=[stats])`), or pass "
            "`GradientMonitor()` to `fit` for its values in the logs. Received: "
            f"callbacks=[{self!r}, ...]"
        )

    def __init__(
        self,
        groups=None,
        check_freq=1,
        track_updates=True,
        histogram_bins=0,
        anomaly_factor=None,
        buffer_size=0,
    ):
        check_freq = check_positive_int("check_freq", check_freq)
        histogram_bins = check_nonnegative_int("histogram_bins", histogram_bins)
        buffer_size = check_nonnegative_int("buffer_size", buffer_size)
        anomaly_factor = check_number(
            "anomaly_factor", anomaly_factor, low=1.0, low_open=True, allow_none=True
        )
        self.anomaly_factor = anomaly_factor
        self.buffer_size = buffer_size
        self.groups = _check_groups(groups)
        self.check_freq = check_freq
        self.track_updates = check_bool("track_updates", track_updates)
        self.histogram_bins = histogram_bins
        self.built = False

    # -- GradientObserver -------------------------------------------------
    def build(self, optimizer, variables):
        paths = [v.path for v in variables]
        if self.groups is None:
            groups = []
            for path in paths:
                _add_by_prefix(groups, path)
        else:
            groups = [(n, k, list(p)) for n, k, p in self.groups]
        index = {p: i for i, p in enumerate(paths)}
        members, names, kinds = [], [], []
        for name, kind, group_paths in groups:
            idx = [index[p] for p in group_paths if p in index]
            if idx:
                members.append(idx)
                names.append(name)
                kinds.append(kind)
        covered = {i for m in members for i in m}
        for i, path in enumerate(paths):  # variables the groups missed
            if i not in covered:
                members.append([i])
                names.append(path)
                kinds.append("layer")
        self.layer_names = names
        self.layer_kinds = kinds
        self._members = members
        self._segment_ids = np.zeros(len(variables), "int32")
        for g, group in enumerate(members):
            self._segment_ids[group] = g
        n = len(names)
        with _strategy_scope(optimizer):
            self.step = state_variable("gradient_stats_step", (), "int64")
            # The `step` of the last computation of the per-layer statistics.
            self.report_step = state_variable("gradient_stats_report_step", (), "int64")
            self._reported = state_variable("gradient_stats_reported", (), "int32")
            self.global_norm = state_variable("gradient_stats_global_norm", ())
            self.grad_norms = state_variable("gradient_stats_grad_norms", (n,))
            self.weight_norms = state_variable("gradient_stats_weight_norms", (n,))
            if self.track_updates:
                self.update_ratios = state_variable(
                    "gradient_stats_update_ratios", (n,)
                )
                # Every step reports: the weights before the update are the
                # values read in `observe` (TensorFlow orders the read before
                # the update and copies on write), so no copy is kept.
                # Otherwise they are copied here on report steps.
                self._previous = (
                    []
                    if self._every_step
                    else [
                        state_variable(
                            f"gradient_stats_previous_{i}", tuple(v.shape), v.dtype
                        )
                        for i, v in enumerate(variables)
                    ]
                )
            if self.histogram_bins:
                self.histograms = state_variable(
                    "gradient_stats_histograms", (n, self.histogram_bins)
                )
            if self.buffer_size:
                # The last `buffer_size` reports, oldest first (step 0: empty).
                self.rows = state_variable(
                    "gradient_stats_rows", (self.buffer_size, self.row_width)
                )
                self.row_steps = state_variable(
                    "gradient_stats_row_steps", (self.buffer_size,), "int64"
                )
        self.built = True

    @property
    def row_width(self):
        """Length of a ring-buffer row (see `read_rows`)."""
        n = len(self.layer_names)
        return 1 + (3 if self.track_updates else 2) * n + n * self.histogram_bins

    def _write_row(self, values=None):
        """Appends the current statistics to the buffer, dropping its oldest row.

        A shift (slice + concatenate) rather than an indexed update: a few
        cheap ops, and the rows stay in step order. `values`: the statistics
        this step assigned, as tensors of the same graph (their variables
        are read otherwise).
        """
        values = values or {}

        def current(name):
            value = values.get(name)
            return getattr(self, name) if value is None else value

        parts = [
            ops.reshape(current("global_norm"), (1,)),
            current("grad_norms"),
            current("weight_norms"),
        ]
        if self.track_updates:
            parts.append(current("update_ratios"))
        if self.histogram_bins:
            parts.append(ops.reshape(current("histograms"), (-1,)))
        row = ops.concatenate([ops.convert_to_tensor(p) for p in parts])
        rows = ops.convert_to_tensor(self.rows)
        self.rows.assign(ops.concatenate([rows[1:], ops.reshape(row, (1, -1))], axis=0))
        steps = ops.convert_to_tensor(self.row_steps)
        step = ops.reshape(ops.cast(current("step"), "int64"), (1,))
        self.row_steps.assign(ops.concatenate([steps[1:], step], axis=0))

    def _group_sums(self, squares):
        """Sums per-variable scalars by group: one stack and one segment sum.

        `squares` is a list of scalars, one per variable, or a vector of them.
        """
        if isinstance(squares, (list, tuple)):
            squares = ops.stack(squares)
        return ops.segment_sum(
            squares, self._segment_ids, num_segments=len(self._members)
        )

    def _report_step(self, step):
        # Constants of the step's dtype: no cast in the step.
        # (Keras converts a Python int with a cast; a NumPy scalar is a constant.)
        dtype = keras.backend.standardize_dtype(step.dtype)
        freq = np.array(self.check_freq, dtype)
        return ops.equal(ops.mod(step, freq), np.array(0, dtype))

    def observe(self, grads, variables, stats):
        zero = ops.zeros((), "float32")
        # The guard's squared norms, where they equal the dense gradient's:
        # as its stacked vector when every gradient is there and dense.
        shared = (stats or {}).get("squared_norms")
        stacked = None
        if (
            isinstance(shared, SquaredNorms)
            and len(shared) == len(grads)
            and len(shared.present) == len(grads)
            and shared.stacked is not None
            and not any(hasattr(g, "indices") for g in grads)
        ):
            stacked = shared.stacked
        shared = shared or [None] * len(grads)
        if stacked is None:
            shared = [
                s if g is not None and not hasattr(g, "indices") else None
                for g, s in zip(grads, shared, strict=True)
            ]
        grads = [None if g is None else ops.cast(g, "float32") for g in grads]
        _keras_internals.assign_add(self.step, 1)
        step = _keras_internals.read(self.step)  # read once, after the += 1
        norm = (stats or {}).get("global_norm")
        if norm is None:
            norm = ops.sqrt(
                ops.sum(
                    ops.stack(
                        [zero if g is None else ops.sum(ops.square(g)) for g in grads]
                    )
                )
            )
        norm = ops.cast(norm, "float32")
        # Every step reports (`_every_step`): known when tracing, no op.
        report = None if self._every_step else self._report_step(step)
        if self.anomaly_factor is not None:
            previous = _keras_internals.read(self.global_norm)  # one read
            anomaly = ops.logical_or(
                ops.logical_not(ops.isfinite(norm)),
                ops.logical_and(
                    ops.greater(previous, 0.0),
                    ops.greater(norm, self.anomaly_factor * previous),
                ),
            )
            report = ops.logical_or(report, anomaly)
        self.global_norm.assign(norm)
        # What this step assigned, for the ring buffer's row (same graph).
        row = {"global_norm": norm, "step": step}
        if not self._every_step:
            self._reported.assign(ops.cast(report, "int32"))

        def compute():
            # Per-layer statistics: report steps (and anomalous steps) only.
            # Sparse gradients (embeddings) are measured dense: repeated
            # indices add up before squaring.
            if stacked is not None:
                squares = stacked
            else:
                own = squared_norms(
                    [
                        _dense(g) if s is None else None
                        for g, s in zip(grads, shared, strict=True)
                    ]
                )
                squares = [
                    zero if g is None else s if s is not None else o
                    for g, s, o in zip(grads, shared, own, strict=True)
                ]
            row["grad_norms"] = ops.sqrt(self._group_sums(squares))
            self.grad_norms.assign(row["grad_norms"])
            self.report_step.assign(step)
            if self.track_updates or self.histogram_bins:
                weights = [_read(v) for v in variables]
                row["weight_norms"] = ops.sqrt(
                    self._group_sums(stacked_squared_norms(weights)[0])
                )
                self.weight_norms.assign(row["weight_norms"])
                if self.track_updates and self._every_step:
                    # Read before the update; used in after_apply (with the
                    # step's other values, in the same graph: no `cond`).
                    self._before = weights
                    self._row = row
            if self.track_updates and not self._every_step:
                for prev, v in zip(self._previous, variables, strict=True):
                    prev.assign(v)
            if self.histogram_bins:
                row["histograms"] = self._histograms(grads)
                self.histograms.assign(row["histograms"])
            if self.buffer_size and not self.track_updates:
                self._write_row(row)  # complete now (else after the update)
            return ops.zeros((), "int32")

        if self._every_step:
            compute()  # no `cond` (and none of its per-input switches)
        else:
            ops.cond(report, compute, lambda: ops.zeros((), "int32"))

    @property
    def _every_step(self):
        """Whether every step is a report step (known when tracing)."""
        return self.check_freq == 1 and self.anomaly_factor is None

    def _histograms(self, grads):
        rows = []
        for m in self._members:
            values = ops.concatenate(
                [ops.reshape(grads[i], (-1,)) for i in m if grads[i] is not None]
                or [ops.zeros((1,), "float32")]
            )
            rows.append(log10_abs_histogram(values, self.histogram_bins))
        return ops.stack(rows)

    def after_apply(self, variables, skipped=None):
        if not self.track_updates:
            return

        def report():
            before, row = self._previous, None
            if self._every_step:
                # No graph tensor kept past this step.
                before, self._before = self._before, None
                row, self._row = self._row, None
            diffs, _ = stacked_squared_norms(
                [
                    ops.subtract(_read(v), ops.convert_to_tensor(p))
                    for v, p in zip(variables, before, strict=True)
                ]
            )
            # `weight_norms` holds the norms of `_previous`, from this step.
            weight_norms = self.weight_norms if row is None else row["weight_norms"]
            ratio = ops.sqrt(self._group_sums(diffs)) / (
                ops.convert_to_tensor(weight_norms) + 1e-12
            )
            self.update_ratios.assign(ratio)
            if self.buffer_size:
                self._write_row(
                    None if row is None else {**row, "update_ratios": ratio}
                )
            return ops.zeros((), "int32")

        if self._every_step:
            report()
        else:
            ops.cond(
                ops.greater(self._reported, 0), report, lambda: ops.zeros((), "int32")
            )

    # -- host side ------------------------------------------------------
    def reset(self):
        """Sets the step counter to 0 and empties the ring buffer (host call,
        e.g. at `on_train_begin`)."""
        if self.built:
            self.step.assign(0)
            if self.buffer_size:
                self.row_steps.assign(np.zeros(self.row_steps.shape, "int64"))

    def read(self):
        """Reads the latest statistics to numpy (one host transfer per variable).

        Returns:
            Dict with `"step"`, `"report_step"` (the `step` of the last
            per-layer computation, 0 if none yet), `"global_norm"`, `"grad_norms"`,
            `"weight_norms"` and, when tracked, `"update_ratios"` and
            `"histograms"`; per-layer entries are arrays in `layer_names` order.
        """

        def host(variable):
            return np.asarray(variable.numpy(), dtype=np.float64)

        out = {
            "step": int(self.step.numpy()),
            "report_step": int(self.report_step.numpy()),
            "global_norm": float(host(self.global_norm)),
            "grad_norms": host(self.grad_norms),
            "weight_norms": host(self.weight_norms),
        }
        if self.track_updates:
            out["update_ratios"] = host(self.update_ratios)
        if self.histogram_bins:
            out["histograms"] = host(self.histograms)
        return out

    def read_rows(self, after_step=0):
        """Reads the ring-buffer rows of the steps after `after_step`.

        Two host transfers, whatever the number of rows. Rows older than the
        last `buffer_size` reports are gone (the buffer wraps around).

        Args:
            after_step: Rows of this step and earlier are left out.
                Defaults to `0`.

        Returns:
            Dict of numpy arrays, in step order: `"step"` `(R,)` and
            `"global_norm"` `(R,)`, `"grad_norms"`, `"weight_norms"` and (when
            tracked) `"update_ratios"` `(R, G)` and `"histograms"`
            `(R, G, histogram_bins)`, in `layer_names` order.

        Raises:
            ValueError: If the observer has no ring buffer (`buffer_size=0`).
        """
        if not self.buffer_size:
            raise ValueError(
                "`read_rows` needs a ring buffer: create the LayerGradientStats "
                "with `buffer_size > 0`."
            )
        steps = np.asarray(self.row_steps.numpy(), dtype=np.int64)
        rows = np.asarray(self.rows.numpy(), dtype=np.float64)
        keep = np.flatnonzero(steps > after_step)  # rows are in step order
        rows = rows[keep]
        n = len(self.layer_names)
        out = {
            "step": steps[keep],
            "global_norm": rows[:, 0],
            "grad_norms": rows[:, 1 : 1 + n],
            "weight_norms": rows[:, 1 + n : 1 + 2 * n],
        }
        start = 1 + 2 * n
        if self.track_updates:
            out["update_ratios"] = rows[:, start : start + n]
            start += n
        if self.histogram_bins:
            out["histograms"] = rows[:, start:].reshape(
                len(keep), n, self.histogram_bins
            )
        return out
