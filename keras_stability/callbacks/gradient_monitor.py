"""`GradientMonitor`: per-layer gradient health inside `fit`.

The statistics are computed in the compiled step by a `LayerGradientStats`
observer on the (automatically added) `GuardedOptimizer`, every `check_freq`
steps, into an in-graph ring buffer that the host reads only every
`read_freq` steps (and at the end of each epoch). They reach fit's logs (so
`History`, the progress bar, `CSVLogger` and `TensorBoard` see them, in any
order of the callbacks), TensorBoard, a bounded in-memory history with
running summaries, a text table (`summary`) and a heatmap (`plot`). The pure
diagnosis lives in `keras_stability.diagnostics.gradient_health`.
"""

import math
import os
import warnings

import keras
import numpy as np

from keras_stability import _keras_internals
from keras_stability._checks import check_bool
from keras_stability._checks import check_int
from keras_stability._checks import check_nonnegative_int
from keras_stability._checks import check_path
from keras_stability._checks import check_positive
from keras_stability._checks import check_positive_int
from keras_stability._checks import check_verbose
from keras_stability._checks import check_writable_dir
from keras_stability.callbacks.layer_gradient_stats import HISTOGRAM_RANGE
from keras_stability.callbacks.layer_gradient_stats import LayerGradientStats
from keras_stability.callbacks.layer_gradient_stats import group_variables_by_layer
from keras_stability.callbacks.step_logs import StepLogs
from keras_stability.diagnostics.gradient_health import EXPLODING
from keras_stability.diagnostics.gradient_health import HEALTHY
from keras_stability.diagnostics.gradient_health import VANISHING
from keras_stability.diagnostics.gradient_health import diagnose_layers
from keras_stability.diagnostics.gradient_health import format_findings
from keras_stability.distribute.strategy import chief_path
from keras_stability.optimizers.attach import ModelObservers
from keras_stability.optimizers.attach import check_optimizer_argument
from keras_stability.optimizers.attach import guarded_attribute
from keras_stability.optimizers.attach import log_prefix
from keras_stability.optimizers.attach import watch_optimizer_loads

__all__ = ["GradientMonitor"]

# Checks the diagnosis looks at (the exploding rule's baseline is their median).
DIAGNOSIS_WINDOW = 64


def _empty_summary():
    return {
        "min": math.inf,
        "max": -math.inf,
        "mean": math.nan,
        "count": 0,
        "nonfinite": 0,
    }


def _update_summary(summary, values):
    """Folds a 1-D array of new values into a running min / max / mean."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    summary["nonfinite"] += int(values.size - finite.size)
    if finite.size:
        n = summary["count"] + finite.size
        previous = summary["mean"] if summary["count"] else 0.0
        summary["mean"] = previous + (float(finite.sum()) - previous * finite.size) / n
        summary["min"] = min(summary["min"], float(finite.min()))
        summary["max"] = max(summary["max"], float(finite.max()))
        summary["count"] = n


@keras.saving.register_keras_serializable(package="keras_stability")
class GradientMonitor(keras.callbacks.Callback):
    """Monitors per-layer gradient norms and diagnoses vanishing / exploding.

    Each layer's variables form a group (an `Embedding` is a group of its
    own, reported but never called vanishing). Every `check_freq` steps (a
    "check") the compiled step computes the group gradient norms, weight
    norms and update-to-weight ratios and writes them into a ring buffer.
    The host reads the buffer, all checks at once, every `read_freq` steps
    (rounded up to a multiple of `check_freq`), after the last step of each
    epoch and at the end of training, and on `flush()`; the monitor also
    keeps the raw loss of each step (Keras' logged `loss` is the running
    epoch mean). The optimizer is wrapped in a `GuardedOptimizer`, which
    skips steps with non-finite gradients; a skipped step's loss is left out
    of the logged `loss` (the mean of the applied steps, as with
    `AdaptiveClipping` and `GradientExplosionDetector`). On each read it:

    - adds `raw_loss`, `grad_norm` (global, pre-clip), `min_layer_grad_ratio`
      (smallest layer norm over the largest) and, if `logs_per_layer`,
      `grad_norm/<layer>` and `update_ratio/<layer>` to the batch and epoch
      logs of every callback (`History`, the progress bar, `CSVLogger`,
      `TensorBoard`), in any order of the callbacks (batch logs carry the
      values of the last read, up to `read_freq - 1` steps old; `raw_loss`
      is always the current step's; epoch logs are exact);
    - appends every check to `history`;
    - writes TensorBoard scalars and `log10|g|` histograms if `log_dir`
      (one point per check);
    - runs the diagnosis (`diagnose_layers`) on the last checks and, with
      `verbose`, warns once per layer and status, naming the layers and the
      standard remedies.

    Memory is bounded: `history` (a dict of lists: `"step"`, `"raw_loss"`,
    `"global_norm"`, and per layer `"grad_norm"`, `"weight_norm"`,
    `"update_ratio"`) holds the last `history_size` checks, oldest first,
    and `raw_losses` the raw losses of the last `history_size` steps. Over
    every check of the `fit`, `totals` keeps running summaries:
    `totals["checks"]`, and for `"global_norm"`, `"raw_loss"` and each layer
    in `totals["grad_norm"]` a dict of `min`, `max`, `mean` (of the finite
    values), `count` (finite values) and `nonfinite`. `summary()` shows the
    median of the kept checks and the minimum over all of them.

    Args:
        check_freq: Steps between checks (the resolution of the
            statistics). Defaults to `1`.
        per_layer: Whether to group by layer; otherwise only the global norm
            is kept. Defaults to `True`.
        log_dir: TensorBoard log directory, or `None`. Checked (created and
            writable) at the start of training. Defaults to `None`.
        logs_per_layer: Whether per-layer values go into fit's logs too
            (one column per layer). Defaults to `False`.
        track_updates: Whether to compute update-to-weight ratios.
            Defaults to `True`.
        histogram_bins: Bins of TensorBoard gradient histograms (used only
            with `log_dir`). Defaults to `30`.
        vanish_floor: See `diagnose_layers`. Defaults to `1e-8`.
        vanish_ratio: See `diagnose_layers`. Defaults to `1e-3`.
        explode_norm: See `diagnose_layers`. Defaults to `1e3`.
        explode_factor: See `diagnose_layers`. Defaults to `100.0`.
        patience: Consecutive checks before a layer is flagged.
            Defaults to `3`.
        verbose: 0 (silent) or 1 (warn about unhealthy layers).
            Defaults to `0`.
        read_freq: Steps between host reads of the buffered checks, rounded
            up to a multiple of `check_freq`; each read is one host transfer
            however many checks it holds. `1` reads after every step (fresh
            batch logs, slower). Defaults to `32`.
        history_size: Checks kept in `history` (at least
            `DIAGNOSIS_WINDOW`, 64, which the diagnosis reads), or `None` to
            keep every check (memory then grows with the run).
            Defaults to `2000`.
        optimizer: Which optimizer's gradients to monitor: `None`
            (`model.optimizer`), an optimizer the model holds, or the name of
            the model attribute holding it, for a model with several
            optimizers (the keras.io GAN's `"d_optimizer"`; one monitor per
            optimizer, each logging under its attribute,
            `d_optimizer/grad_norm`; the layers are then those whose
            variables it updates).
            At the start of training, with `None`, a model whose
            `model.optimizer` is `None`, or that overrides `train_step` and
            holds other optimizers, raises a `ValueError` naming them. An
            instance is a runtime attachment: `get_config` gives `None` for
            it. Defaults to `None`.

    Example:

    ```python
    monitor = GradientMonitor(check_freq=10, verbose=1)
    model.fit(x, y, callbacks=[monitor])
    report = monitor.summary(print_to_stdout=False)
    monitor.plot("gradients.png")
    ```
    """

    def __init__(
        self,
        check_freq=1,
        per_layer=True,
        log_dir=None,
        logs_per_layer=False,
        track_updates=True,
        histogram_bins=30,
        vanish_floor=1e-8,
        vanish_ratio=1e-3,
        explode_norm=1e3,
        explode_factor=100.0,
        patience=3,
        verbose=0,
        read_freq=32,
        history_size=2000,
        optimizer=None,
    ):
        super().__init__()
        self.check_freq = check_positive_int("check_freq", check_freq)
        self.per_layer = check_bool("per_layer", per_layer)
        self.log_dir = check_path("log_dir", log_dir, allow_none=True)
        self.logs_per_layer = check_bool("logs_per_layer", logs_per_layer)
        self.track_updates = check_bool("track_updates", track_updates)
        self.histogram_bins = check_nonnegative_int("histogram_bins", histogram_bins)
        self.vanish_floor = check_positive("vanish_floor", vanish_floor)
        self.vanish_ratio = check_positive("vanish_ratio", vanish_ratio)
        self.explode_norm = check_positive("explode_norm", explode_norm)
        self.explode_factor = check_positive("explode_factor", explode_factor)
        self.patience = check_positive_int("patience", patience)
        self.verbose = check_verbose("verbose", verbose)
        self.read_freq = check_positive_int("read_freq", read_freq)
        self.history_size = check_int(
            "history_size", history_size, low=DIAGNOSIS_WINDOW, allow_none=True
        )
        self.optimizer = check_optimizer_argument("optimizer", optimizer)
        self.observer = None
        self._observers = ModelObservers()
        self.history = {}
        self.raw_losses = []
        self.totals = {}
        self.findings = []

    def get_config(self):
        return {
            "check_freq": self.check_freq,
            "per_layer": self.per_layer,
            "log_dir": self.log_dir,
            "logs_per_layer": self.logs_per_layer,
            "track_updates": self.track_updates,
            "histogram_bins": self.histogram_bins,
            "vanish_floor": self.vanish_floor,
            "vanish_ratio": self.vanish_ratio,
            "explode_norm": self.explode_norm,
            "explode_factor": self.explode_factor,
            "patience": self.patience,
            "verbose": self.verbose,
            "read_freq": self.read_freq,
            "history_size": self.history_size,
            "optimizer": self.optimizer if isinstance(self.optimizer, str) else None,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    # -- fit hooks --------------------------------------------------------
    def _make_observer(self):
        model = self.model
        # Groups without a variable of the optimizer (a GAN's other half)
        # are dropped when the observer builds (`_set_layers`).
        groups = (
            group_variables_by_layer(model)
            if self.per_layer
            else [("model", "layer", [v.path for v in model.trainable_variables])]
        )
        return LayerGradientStats(
            groups=groups,
            check_freq=self.check_freq,
            track_updates=self.track_updates,
            histogram_bins=self.histogram_bins if self.log_dir else 0,
            buffer_size=self.buffer_size,
        )

    def set_model(self, model):
        super().set_model(model)
        # Before any callback's `on_train_begin` (a BackupAndRestore listed
        # first restores there, before we wrap the optimizer).
        watch_optimizer_loads(model)
        StepLogs.of(model).expect(self)  # in this fit (`StepLogs.enter`)

    def _model_state(self, model):
        # What a later instance of the same configuration takes over when
        # this one is not in its `fit` (see `StepLogs.enter`): no retrace.
        return self._observers.entry(model)

    def _set_model_state(self, model, state):
        self._observers.put(model, state)  # `None` forgets it

    def on_train_begin(self, logs=None):
        StepLogs.of(self.model).enter(self)  # drops an earlier fit's instances
        log_dir = None
        if self.log_dir:
            log_dir = chief_path(self.log_dir, self.model.distribute_strategy)
            check_writable_dir("log_dir", log_dir)
        self._attribute = guarded_attribute(self.model, self.optimizer)
        guard, self.observer = self._observers.attach(
            self.model, self._make_observer, optimizer=self._attribute
        )
        StepLogs.of(self.model).own_observer(self, guard, self.observer)
        self.observer.reset()
        self._set_layers()
        self.raw_losses = []
        self._raw_offset = 0  # steps dropped from the front of `raw_losses`
        self.findings = []
        self._warned = set()
        self._step = 0
        self._read_step = 0  # observer step of the last row read
        self._last = {}
        # Batches per read: the buffer (`buffer_size` checks) must not wrap
        # around between two reads, whatever `steps_per_execution` is.
        per_call = max(1, int(getattr(self.model, "steps_per_execution", 1) or 1))
        self._read_calls = max(1, (self.buffer_size * self.check_freq) // per_call)
        self._step_logs = StepLogs.of(self.model)
        self._step_logs.attach(self, self._after_step, self.params)
        self._writer = None
        if log_dir:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(
                os.path.join(log_dir, "gradients")
            )

    def _set_layers(self):
        """The layers (groups) of the observer: as configured, or as built
        (an optimizer met only in the train step builds there)."""
        observer = self.observer
        if observer.built:
            self.layer_names = list(observer.layer_names)
            self.layer_kinds = list(observer.layer_kinds)
        else:
            self.layer_names = [name for name, _, _ in observer.groups or []]
            self.layer_kinds = [kind for _, kind, _ in observer.groups or []]
        self.history = {
            "step": [],
            "raw_loss": [],
            "global_norm": [],
            "grad_norm": {n: [] for n in self.layer_names},
            "weight_norm": {n: [] for n in self.layer_names},
            "update_ratio": {n: [] for n in self.layer_names},
        }
        self.totals = {
            "checks": 0,
            "global_norm": _empty_summary(),
            "raw_loss": _empty_summary(),
            "grad_norm": {n: _empty_summary() for n in self.layer_names},
        }

    def on_epoch_begin(self, epoch, logs=None):
        self._step_logs.start_epoch(epoch)

    def _after_step(self, logs):
        """After each call of the train function, before any callback."""
        self._step += 1
        raw = self._step_logs.raw_loss
        self.raw_losses.append(raw)
        if self._step % self._read_calls == 0 or self._step_logs.epoch_end:
            self.flush()
        self._last["raw_loss"] = raw
        logs.update(self._logged())

    def on_epoch_end(self, epoch, logs=None):
        self.flush()  # when the steps per epoch are unknown
        if logs is not None:
            logs.update(self._logged())

    def _logged(self):
        """The values for the logs: under `optimizer`'s attribute (a GAN's
        `d_optimizer/grad_norm`) unless it is the model's `optimizer`."""
        prefix = log_prefix(getattr(self, "_attribute", "optimizer"))
        if not prefix:
            return self._last
        return {prefix + key: value for key, value in self._last.items()}

    def on_train_end(self, logs=None):
        self._step_logs.detach(self)
        self.flush()
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    def detach(self):
        """Stops computing the statistics in later `fit` calls without this callback.

        The monitor's observer stays on the optimizer after `fit` (so a loop
        of short `fit` calls does not retrace each time); `detach` removes it
        from every model the monitor was used with, and retraces their train
        functions. `history` is kept, and the next `fit` with this monitor
        attaches it again.

        Returns:
            Whether it was attached.
        """
        if self.observer is None:
            return False
        if self.model is not None:
            self.flush()
        return self._observers.detach()

    # -- reading and diagnosis ---------------------------------------------
    @property
    def buffer_size(self):
        """Checks the ring buffer holds: `ceil(read_freq / check_freq)`."""
        return -(-self.read_freq // self.check_freq)

    def flush(self):
        """Reads the checks buffered since the last read, now.

        Called every `read_freq` steps, after the last step of each epoch
        and at the end of training; call it from another callback that needs `history` (or the
        logged values) up to the current step. Appends the checks to
        `history`, refreshes the logged values, writes TensorBoard and runs
        the diagnosis.

        Returns:
            The number of checks read.
        """
        if self.observer is None or not self.observer.built:
            return 0
        if self.totals["checks"] == 0 and self.layer_names != list(
            self.observer.layer_names
        ):  # built in the first step, with only some of the groups
            self._set_layers()
        rows = self.observer.read_rows(after_step=self._read_step)
        steps = rows["step"]
        if not len(steps):
            return 0
        self._read_step = int(steps[-1])
        # The raw loss of each check's step (per batch: with
        # steps_per_execution > 1, the mean over its execution).
        per_call = max(1, int(getattr(self.model, "steps_per_execution", 1) or 1))
        losses, offset = self.raw_losses, getattr(self, "_raw_offset", 0)
        raw = np.asarray(
            [
                losses[i - offset] if 0 <= i - offset < len(losses) else math.nan
                for i in ((steps - 1) // per_call).tolist()
            ],
            dtype=np.float64,
        )

        h = self.history
        h["step"].extend(steps.tolist())
        h["raw_loss"].extend(raw.tolist())
        h["global_norm"].extend(rows["global_norm"].tolist())
        for i, name in enumerate(self.layer_names):
            h["grad_norm"][name].extend(rows["grad_norms"][:, i].tolist())
            h["weight_norm"][name].extend(rows["weight_norms"][:, i].tolist())
            if self.track_updates:
                h["update_ratio"][name].extend(rows["update_ratios"][:, i].tolist())

        norms = rows["grad_norms"][-1]
        dense = [i for i, k in enumerate(self.layer_kinds) if k != "embedding"] or list(
            range(len(norms))
        )
        largest = float(np.max(norms[dense])) if len(dense) else 0.0
        last = {
            # The current step's raw loss (the last check's may be older).
            "raw_loss": float(self.raw_losses[-1])
            if self.raw_losses
            else float(raw[-1]),
            "grad_norm": float(rows["global_norm"][-1]),
            # Undefined (nan) unless the largest norm is finite and > 0:
            # no numpy warning for inf / inf, and no 0 (which would read
            # as vanishing) for finite / inf.
            "min_layer_grad_ratio": float(np.min(norms[dense]) / largest)
            if 0 < largest < math.inf
            else math.nan,
        }
        if self.logs_per_layer:
            for i, name in enumerate(self.layer_names):
                last[f"grad_norm/{name}"] = float(norms[i])
                if self.track_updates:
                    last[f"update_ratio/{name}"] = float(rows["update_ratios"][-1, i])
        self._last = last
        if self._writer is not None:
            self._write_tensorboard(rows, raw)
        # A rule needs `patience` checks in a row. Checks inside the chunk
        # where one might hold are diagnosed too, so a run that ended before
        # the last check is still warned about; the last check always is.
        for end in self._suspect_ends(len(steps)):
            self._warn_new(self.diagnose(end=end), int(h["step"][end - 1]))
        self.findings = self.diagnose()
        self._warn_new(self.findings, int(steps[-1]))
        self._summarize(rows, raw)
        self._trim()
        return len(steps)

    def _summarize(self, rows, raw):
        """Folds the checks just read into the running summaries (`totals`)."""
        totals = self.totals
        if not totals:
            return
        totals["checks"] += len(rows["step"])
        _update_summary(totals["global_norm"], rows["global_norm"])
        _update_summary(totals["raw_loss"], raw)
        for i, name in enumerate(self.layer_names):
            _update_summary(totals["grad_norm"][name], rows["grad_norms"][:, i])

    def _trim(self):
        """Keeps the last `history_size` checks and raw losses (after a read:
        the diagnosis of the chunk read needs the checks before it)."""
        size = self.history_size
        if size is None:
            return
        h = self.history
        if len(h["step"]) > size:
            for key in ("step", "raw_loss", "global_norm"):
                del h[key][:-size]
            for key in ("grad_norm", "weight_norm", "update_ratio"):
                for values in h[key].values():
                    del values[:-size]
        # Raw losses: the unread checks' steps must stay (`_read_calls` calls).
        keep = max(size, self._read_calls)
        extra = len(self.raw_losses) - keep
        if extra > 0:
            del self.raw_losses[:extra]
            self._raw_offset += extra

    def _suspect_ends(self, new):
        """History lengths (before the last) at which a new warning may come.

        A vectorized superset of `diagnose_layers`' rules over the `new`
        checks just read, for the layers not yet warned about: `patience`
        checks in a row that are non-finite, above `explode_norm` or above
        `explode_factor` times half the smallest positive norm (a positive
        median is never below that); or, for non-embedding layers, below
        `vanish_floor` or `vanish_ratio` times the largest norm. Usually
        empty, so each read runs a single diagnosis.
        """
        p = self.patience
        total = len(self.history["step"])
        start = max(0, total - new - DIAGNOSIS_WINDOW)
        table = np.asarray(
            [self.history["grad_norm"][n][start:] for n in self.layer_names],
            dtype=np.float64,
        )
        if table.shape[1] < p:
            return []

        def open_rows(status):
            return np.asarray(
                [[(n, status) not in self._warned] for n in self.layer_names],
                dtype=bool,
            )

        dense = np.asarray([[k != "embedding"] for k in self.layer_kinds], dtype=bool)
        with np.errstate(invalid="ignore"):
            finite = np.isfinite(table)
            smallest = np.min(
                np.where(finite & (table > 0), table, np.inf), axis=1, keepdims=True
            )
            largest = np.max(np.where(finite, table, 0.0), axis=0, keepdims=True)
            exploding = open_rows(EXPLODING) & (
                ~finite
                | (table > self.explode_norm)
                | (table > self.explode_factor * 0.5 * smallest)
            )
            vanishing = (open_rows(VANISHING) & dense) & (
                (table < self.vanish_floor) | (table < self.vanish_ratio * largest)
            )

        def runs(flags):
            return np.lib.stride_tricks.sliding_window_view(flags, p, axis=1).all(
                axis=2
            )

        hits = (runs(exploding) | runs(vanishing)).any(axis=0)
        ends = start + p + np.flatnonzero(hits)  # history length at each run's end
        return [int(e) for e in ends if total - new < e < total]

    def _warn_new(self, findings, step):
        new = [
            f
            for f in findings
            if f.status != HEALTHY and (f.layer, f.status) not in self._warned
        ]
        if new and self.verbose:
            warnings.warn(
                f"GradientMonitor at step {step}: " + format_findings(new),
                stacklevel=3,
            )
        self._warned.update((f.layer, f.status) for f in new)

    def diagnose(self, end=None):
        """Runs the diagnosis on the last `DIAGNOSIS_WINDOW` checks.

        Args:
            end: Diagnose as of this many checks (the window ends there), or
                `None` for all recorded checks. Defaults to `None`.

        Returns:
            List of `LayerFinding`, one per layer group.
        """
        checks = len(self.history.get("step", []))
        end = checks if end is None else end
        recent = {
            name: values[max(0, end - DIAGNOSIS_WINDOW) : end]
            for name, values in self.history.get("grad_norm", {}).items()
        }
        return diagnose_layers(
            recent,
            exclude=[
                n
                for n, k in zip(self.layer_names, self.layer_kinds, strict=True)
                if k == "embedding"
            ],
            vanish_floor=self.vanish_floor,
            vanish_ratio=self.vanish_ratio,
            explode_norm=self.explode_norm,
            explode_factor=self.explode_factor,
            patience=self.patience,
        )

    def unhealthy_layers(self, status=None):
        """Names of the layers currently flagged (optionally of one status)."""
        return [
            f.layer
            for f in self.findings
            if f.status != HEALTHY and (status is None or f.status == status)
        ]

    def _write_tensorboard(self, rows, raw):
        import tensorflow as tf

        for r, step in enumerate(rows["step"].tolist()):
            with self._writer.as_default(step=step):
                tf.summary.scalar("raw_loss", raw[r])
                tf.summary.scalar("grad_norm/global", rows["global_norm"][r])
                for i, name in enumerate(self.layer_names):
                    tf.summary.scalar(f"grad_norm/{name}", rows["grad_norms"][r, i])
                    if self.track_updates:
                        tf.summary.scalar(
                            f"update_ratio/{name}", rows["update_ratios"][r, i]
                        )
                    if "histograms" in rows:
                        _write_histogram(
                            f"log10_abs_grad/{name}", rows["histograms"][r, i], step
                        )

    # -- reports -------------------------------------------------------------
    def summary(self, print_to_stdout=True):
        """A per-layer table: last / median / min gradient norm, update ratio, status.

        The median is over the checks kept in `history` (the last
        `history_size`), the minimum over every check of the `fit`
        (`totals`).

        Args:
            print_to_stdout: Whether to also print it with Keras' `print_msg`.
                Defaults to `True`.

        Returns:
            The table as a string.
        """
        h = self.history
        if not h.get("step"):
            text = "GradientMonitor: no statistics recorded yet."
        else:
            status = {f.layer: f for f in self.findings}
            width = max(12, *(len(n) for n in self.layer_names))
            header = (
                f"{'layer':<{width}}  {'kind':<9} {'grad norm':>10} {'median':>10} "
                f"{'min':>10} {'upd/weight':>10}  status"
            )
            totals = self.totals or {}
            lines = [
                f"Gradient health after {h['step'][-1]} steps "
                f"({totals.get('checks') or len(h['step'])} checks)",
                header,
                "-" * len(header),
            ]
            for name, kind in zip(self.layer_names, self.layer_kinds, strict=True):
                norms = np.asarray(h["grad_norm"][name])
                ratios = h["update_ratio"][name]
                finding = status.get(name)
                running = totals.get("grad_norm", {}).get(name)
                low = running["min"] if running and running["count"] else np.min(norms)
                lines.append(
                    f"{name:<{width}}  {kind:<9} {norms[-1]:>10.3g} "
                    f"{np.median(norms):>10.3g} {low:>10.3g} "
                    f"{(ratios[-1] if ratios else math.nan):>10.3g}  "
                    f"{finding.status if finding else HEALTHY}"
                )
            advice = format_findings(self.findings)
            if advice:
                lines += ["", advice]
            text = "\n".join(lines)
        if print_to_stdout:
            _keras_internals.print_msg(text)
        return text

    def plot(self, path, title=None):
        """Saves a heatmap of log10 gradient norms (layers x checks).

        Args:
            path: Image file to write (format from the extension).
            title: Figure title. Defaults to `None` (a generic title).

        Returns:
            The matplotlib `Figure`, drawn without pyplot so the current
            backend is left alone (a notebook shows it as a cell's value).
        """
        # The object-oriented API draws without pyplot, so the caller's
        # backend (a notebook's inline one, say) is left alone.
        from matplotlib.figure import Figure

        h = self.history
        if not h.get("step"):
            raise ValueError(
                "GradientMonitor.plot needs recorded statistics; call it after `fit`."
            )
        data = np.asarray(
            [h["grad_norm"][n] for n in self.layer_names], dtype=np.float64
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            logged = np.log10(np.where(data > 0, data, np.nan))
        fig = Figure(figsize=(8, max(2.5, 0.3 * len(self.layer_names) + 1.5)))
        ax = fig.subplots()
        steps = h["step"]
        image = ax.imshow(
            logged,
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            extent=(steps[0] - 0.5, steps[-1] + 0.5, len(self.layer_names) - 0.5, -0.5),
        )
        ax.set_yticks(range(len(self.layer_names)))
        ax.set_yticklabels(self.layer_names, fontsize=7)
        ax.set_xlabel("step")
        ax.set_title(title or "log10 gradient norm per layer")
        fig.colorbar(image, ax=ax, label="log10 ||g||")
        fig.tight_layout()
        fig.savefig(chief_path(path))
        return fig


def _write_histogram(tag, counts, step):
    """Writes a precomputed histogram (bucket counts over HISTOGRAM_RANGE)."""
    import tensorflow as tf
    from tensorboard.plugins.histogram import metadata

    lo, hi = HISTOGRAM_RANGE
    edges = np.linspace(lo, hi, len(counts) + 1)
    buckets = np.stack([edges[:-1], edges[1:], np.asarray(counts)], axis=1)
    tf.summary.write(
        tag=tag,
        tensor=tf.constant(buckets, dtype=tf.float64),
        step=step,
        metadata=metadata.create_summary_metadata(
            display_name=tag, description="log10 |gradient| per layer"
        ),
    )
