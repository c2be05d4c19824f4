"""`GradientMonitor`: per-layer gradient health inside `fit`.

The statistics are computed in the compiled step by a `LayerGradientStats`
observer on the (automatically added) `GuardedOptimizer`, every
`every_n_steps`, into an in-graph ring buffer that the host reads only every
`read_every` steps (and at the end of each epoch). They reach fit's logs (so `History`, the
progress bar and `CSVLogger` see them), TensorBoard, an in-memory history,
a text table (`summary`) and a heatmap (`plot`). The pure diagnosis lives in
`keras_stability.diagnostics.gradient_health`.
"""

import math
import os
import warnings

import keras
import numpy as np
from keras.src.utils import io_utils  # Keras' print_msg (no public alias)

from keras_stability._checks import check_nonnegative_int
from keras_stability._checks import check_positive_int
from keras_stability.callbacks.layer_gradient_stats import HISTOGRAM_RANGE
from keras_stability.callbacks.layer_gradient_stats import LayerGradientStats
from keras_stability.callbacks.layer_gradient_stats import group_variables_by_layer
from keras_stability.callbacks.raw_loss import RawLossTracker
from keras_stability.diagnostics.gradient_health import EXPLODING
from keras_stability.diagnostics.gradient_health import HEALTHY
from keras_stability.diagnostics.gradient_health import VANISHING
from keras_stability.diagnostics.gradient_health import diagnose_layers
from keras_stability.diagnostics.gradient_health import format_findings
from keras_stability.distribute.strategy import chief_path
from keras_stability.optimizers.guarded_optimizer import optimizer_chain

__all__ = ["GradientMonitor", "attach_observer", "detach_observer"]

# Checks the diagnosis looks at (the exploding rule's baseline is their median).
DIAGNOSIS_WINDOW = 64


def attach_observer(model, observer, **guard_kwargs):
    """Adds `observer` to the model's (guarded) optimizer before training.

    Wraps the compiled optimizer in a `GuardedOptimizer` if needed (with
    `guard_kwargs`; an existing guard is used as it is) and makes the train
    function be traced again if it already was, so the observer is part of
    the compiled step.

    Returns:
        The `GuardedOptimizer`.
    """
    from keras_stability.optimizers import GuardedOptimizer
    from keras_stability.optimizers import ensure_guarded

    if any(isinstance(o, GuardedOptimizer) for o in optimizer_chain(model.optimizer)):
        guard_kwargs = {}
    optimizer = ensure_guarded(model, **guard_kwargs)
    if observer not in list(getattr(optimizer, "observers", None) or []):
        with model.distribute_strategy.scope():
            optimizer.add_observer(observer)
        model.make_train_function(force=True)
    return optimizer


def detach_observer(model, observer):
    """Removes `observer` from the model's guarded optimizer, if it is there.

    The train function is traced again, so the observer's statistics are no
    longer computed. The `GuardedOptimizer` itself stays.

    Returns:
        Whether the observer was attached.
    """
    for opt in optimizer_chain(getattr(model, "optimizer", None)):
        remove = getattr(opt, "remove_observer", None)
        if remove is not None and remove(observer):
            model.make_train_function(force=True)
            return True
    return False


class GradientMonitor(keras.callbacks.Callback):
    """Monitors per-layer gradient norms and diagnoses vanishing / exploding.

    Each layer's variables form a group (an `Embedding` is a group of its
    own, reported but never called vanishing). Every `every_n_steps` (a
    "check") the compiled step computes the group gradient norms, weight
    norms and update-to-weight ratios and writes them into a ring buffer.
    The host reads the buffer, all checks at once, every `read_every` steps
    (rounded up to a multiple of `every_n_steps`), at the end of each epoch
    and of training, and on `flush()`; the monitor also keeps the raw loss of
    every step (Keras' logged `loss` is the running epoch mean). On each
    read it:

    - adds `raw_loss`, `grad_norm` (global, pre-clip), `min_layer_grad_ratio`
      (smallest layer norm over the largest) and, if `logs_per_layer`,
      `grad_norm/<layer>` and `update_ratio/<layer>` to the batch and epoch
      logs, so `History`, the progress bar and `CSVLogger` show them (batch
      logs carry the values of the last read, up to `read_every - 1` steps
      old; `raw_loss` is always the current step's; epoch logs are exact);
    - appends every check to `history` (a dict of lists);
    - writes TensorBoard scalars and `log10|g|` histograms if `log_dir`
      (one point per check);
    - runs the diagnosis (`diagnose_layers`) on the last checks and warns
      once per layer and status, naming the layers and the standard
      remedies.

    Args:
        every_n_steps: Steps between checks (the resolution of the
            statistics). Defaults to `1`.
        per_layer: Whether to group by layer; otherwise only the global norm
            is kept. Defaults to `True`.
        log_dir: TensorBoard log directory, or `None`. Defaults to `None`.
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
        verbose: 1 to warn about unhealthy layers. Defaults to `1`.
        read_every: Steps between host reads of the buffered checks, rounded
            up to a multiple of `every_n_steps`; each read is one host
            transfer however many checks it holds. `1` reads after every
            step (fresh batch logs, slower). Defaults to `32`.

    Example:

    ```python
    monitor = GradientMonitor(every_n_steps=10)
    model.fit(x, y, callbacks=[monitor])
    report = monitor.summary(print_to_stdout=False)
    monitor.plot("gradients.png")
    ```
    """

    def __init__(
        self,
        every_n_steps=1,
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
        verbose=1,
        read_every=32,
    ):
        super().__init__()
        every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        patience = check_positive_int("patience", patience)
        read_every = check_positive_int("read_every", read_every)
        histogram_bins = check_nonnegative_int("histogram_bins", histogram_bins)
        # Validates the thresholds once, with the pure core's messages.
        diagnose_layers(
            {},
            vanish_floor=vanish_floor,
            vanish_ratio=vanish_ratio,
            explode_norm=explode_norm,
            explode_factor=explode_factor,
            patience=patience,
        )
        self.every_n_steps = every_n_steps
        self.per_layer = bool(per_layer)
        self.log_dir = log_dir
        self.logs_per_layer = bool(logs_per_layer)
        self.track_updates = bool(track_updates)
        self.histogram_bins = histogram_bins
        self.vanish_floor = vanish_floor
        self.vanish_ratio = vanish_ratio
        self.explode_norm = explode_norm
        self.explode_factor = explode_factor
        self.patience = patience
        self.verbose = verbose
        self.read_every = read_every
        self.observer = None
        self._model_id = None
        self.history = {}
        self.findings = []

    def get_config(self):
        return {
            "every_n_steps": self.every_n_steps,
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
            "read_every": self.read_every,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    # -- fit hooks --------------------------------------------------------
    def on_train_begin(self, logs=None):
        if self.observer is None or self._model_id != id(self.model):
            groups = group_variables_by_layer(self.model) if self.per_layer else [
                ("model", "layer", [v.path for v in self.model.trainable_variables])
            ]
            self.observer = LayerGradientStats(
                groups=groups,
                every_n_steps=self.every_n_steps,
                track_updates=self.track_updates,
                histogram_bins=self.histogram_bins if self.log_dir else 0,
                buffer_size=self.buffer_size,
            )
            self._model_id = id(self.model)
            self.layer_names = [name for name, _, _ in groups]
            self.layer_kinds = [kind for _, kind, _ in groups]
        attach_observer(self.model, self.observer)
        self.observer.reset()
        self.history = {
            "step": [],
            "raw_loss": [],
            "global_norm": [],
            "grad_norm": {n: [] for n in self.layer_names},
            "weight_norm": {n: [] for n in self.layer_names},
            "update_ratio": {n: [] for n in self.layer_names},
        }
        self.raw_losses = []
        self.findings = []
        self._warned = set()
        self._step = 0
        self._read_step = 0  # observer step of the last row read
        self._last = {}
        # Batches per read: the buffer (`buffer_size` checks) must not wrap
        # around between two reads, whatever `steps_per_execution` is.
        per_call = max(1, int(getattr(self.model, "steps_per_execution", 1) or 1))
        self._read_calls = max(1, (self.buffer_size * self.every_n_steps) // per_call)
        self._loss = RawLossTracker.shared(self.model, (self.params or {}).get("steps"))
        self._loss.start_fit()
        self._writer = None
        if self.log_dir:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(
                os.path.join(chief_path(self.log_dir, self.model.distribute_strategy), "gradients")
            )

    def on_epoch_begin(self, epoch, logs=None):
        self._loss.start_epoch(epoch)

    def on_train_batch_end(self, batch, logs=None):
        logs = logs if logs is not None else {}
        self._step += 1
        raw = self._loss.update_once(batch, logs)
        self.raw_losses.append(raw)
        logs["raw_loss"] = raw
        if self._step % self._read_calls == 0:
            self.flush()
        self._last["raw_loss"] = raw
        logs.update(self._last)

    def on_epoch_end(self, epoch, logs=None):
        self.flush()
        if logs is not None:
            logs.update(self._last)

    def on_train_end(self, logs=None):
        self.flush()
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    def detach(self):
        """Stops computing the statistics in later `fit` calls without this callback.

        The monitor's observer stays on the optimizer after `fit` (so a loop
        of short `fit` calls does not retrace each time); `detach` removes it
        and retraces the train function. `history` is kept, and the next
        `fit` with this monitor attaches it again.

        Returns:
            Whether it was attached.
        """
        if self.observer is None or self.model is None:
            return False
        self.flush()
        return detach_observer(self.model, self.observer)

    # -- reading and diagnosis ---------------------------------------------
    @property
    def buffer_size(self):
        """Checks the ring buffer holds: `ceil(read_every / every_n_steps)`."""
        return -(-self.read_every // self.every_n_steps)

    def flush(self):
        """Reads the checks buffered since the last read, now.

        Called every `read_every` steps, at the end of each epoch and of
        training; call it from another callback that needs `history` (or the
        logged values) up to the current step. Appends the checks to
        `history`, refreshes the logged values, writes TensorBoard and runs
        the diagnosis.

        Returns:
            The number of checks read.
        """
        if self.observer is None or not self.observer.built:
            return 0
        rows = self.observer.read_rows(after_step=self._read_step)
        steps = rows["step"]
        if not len(steps):
            return 0
        self._read_step = int(steps[-1])
        # The raw loss of each check's step (per batch: with
        # steps_per_execution > 1, the mean over its execution).
        per_call = max(1, int(getattr(self.model, "steps_per_execution", 1) or 1))
        losses = self.raw_losses
        raw = np.asarray(
            [losses[i] if 0 <= i < len(losses) else math.nan for i in ((steps - 1) // per_call).tolist()],
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
            "raw_loss": float(self.raw_losses[-1]) if self.raw_losses else float(raw[-1]),
            "grad_norm": float(rows["global_norm"][-1]),
            "min_layer_grad_ratio": float(np.min(norms[dense]) / largest)
            if largest > 0
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
        return len(steps)

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
            [self.history["grad_norm"][n][start:] for n in self.layer_names], dtype=np.float64
        )
        if table.shape[1] < p:
            return []

        def open_rows(status):
            return np.asarray(
                [[(n, status) not in self._warned] for n in self.layer_names], dtype=bool
            )

        dense = np.asarray([[k != "embedding"] for k in self.layer_kinds], dtype=bool)
        with np.errstate(invalid="ignore"):
            finite = np.isfinite(table)
            smallest = np.min(np.where(finite & (table > 0), table, np.inf), axis=1, keepdims=True)
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
            return np.lib.stride_tricks.sliding_window_view(flags, p, axis=1).all(axis=2)

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
            exclude=[n for n, k in zip(self.layer_names, self.layer_kinds, strict=True) if k == "embedding"],
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
            lines = [
                f"Gradient health after {h['step'][-1]} steps "
                f"({len(h['step'])} checks)",
                header,
                "-" * len(header),
            ]
            for name, kind in zip(self.layer_names, self.layer_kinds, strict=True):
                norms = np.asarray(h["grad_norm"][name])
                ratios = h["update_ratio"][name]
                finding = status.get(name)
                lines.append(
                    f"{name:<{width}}  {kind:<9} {norms[-1]:>10.3g} "
                    f"{np.median(norms):>10.3g} {np.min(norms):>10.3g} "
                    f"{(ratios[-1] if ratios else math.nan):>10.3g}  "
                    f"{finding.status if finding else HEALTHY}"
                )
            advice = format_findings(self.findings)
            if advice:
                lines += ["", advice]
            text = "\n".join(lines)
        if print_to_stdout:
            io_utils.print_msg(text)
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
        data = np.asarray([h["grad_norm"][n] for n in self.layer_names], dtype=np.float64)
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
