"""`PruningSummaries`: sparsity of each pruned weight, written to TensorBoard."""

import keras
import numpy as np

from keras_stability import _keras_internals
from keras_stability._checks import check_int
from keras_stability._checks import check_path
from keras_stability._checks import check_writable_dir
from keras_stability.distribute.strategy import chief_path
from keras_stability.pruning.callbacks import check_fit_begin
from keras_stability.pruning.callbacks import check_fit_end
from keras_stability.pruning.pruner import find_pruners

__all__ = ["PruningSummaries"]


@keras.saving.register_keras_serializable(package="keras_stability")
class PruningSummaries(keras.callbacks.Callback):
    """Writes the sparsity of every pruned weight to TensorBoard.

    The counterpart of TF-MOT's `PruningSummaries`, for models pruned with
    `keras_stability.pruning.prune_low_magnitude`. Scalars, at the pruning
    step: `pruning/target_sparsity` (the schedule's value),
    `pruning/total_sparsity`, and `pruning/<weight path>/sparsity` for each
    pruned weight (the zero fraction of its mask). For a model whose layers
    were pruned separately (each with its own schedule, as with TF-MOT's
    `clone_model(..., clone_function=...)`), every pruned weight is written
    and the targets are `pruning/<weight path>/target_sparsity`. Values are read on the host
    once per epoch (or every `update_freq` batches), never inside the step.
    In a custom training loop that calls only `on_epoch_begin` by hand (as
    TF-MOT's guide does), it writes there, at the start of each epoch.

    Like `UpdatePruningStep` it also warns at the start of `fit` if the
    `fit` is too short for the schedule to reach its target sparsity, and
    reports a schedule that returned a sparsity outside [0, 1).

    Args:
        log_dir: Directory for the TensorBoard event files (a path; created
            at the start of `fit`).
        update_freq: `"epoch"` or a positive number of batches between
            writes. Defaults to `"epoch"`.

    Raises:
        ValueError: For a bad argument; at `fit` start if the model is not
            pruned or `log_dir` cannot be created or written.

    Example:

    ```python
    model.fit(x, y, callbacks=[PruningSummaries("logs/pruning")])
    ```
    """

    def __init__(self, log_dir, update_freq="epoch"):
        super().__init__()
        log_dir = check_path("log_dir", log_dir)
        if update_freq != "epoch":
            update_freq = check_int(
                "update_freq", update_freq, low=1, what="'epoch' or a positive integer"
            )
        self.log_dir = log_dir
        self.update_freq = update_freq
        self._writer = None
        self._pruners = []
        self._batches = 0
        self._by_hand = False

    def on_train_begin(self, logs=None):
        self._by_hand = False
        self._start()
        for pruner in self._pruners:
            check_fit_begin(self, pruner)

    def on_epoch_begin(self, epoch=None, logs=None):
        # TF-MOT's guide drives this callback by hand in a custom training
        # loop, calling only `on_epoch_begin` (where TF-MOT's writes): there,
        # without a `fit` to call `on_train_begin`, start and write here.
        if self._writer is None:
            self._start()
            self._by_hand = True
        if self._by_hand:
            self._write()

    def _start(self):
        # One pruner per separately pruned layer (TF-MOT's clone_function).
        self._pruners = find_pruners(self.model)
        if not self._pruners:
            raise ValueError(
                "Invalid value for argument `model`. Expected a model pruned with "
                "`keras_stability.pruning.prune_low_magnitude` for "
                f"PruningSummaries. Received: model={self.model.name!r}, not pruned"
            )
        import tensorflow as tf

        log_dir = check_writable_dir(
            "log_dir", chief_path(self.log_dir, self.model.distribute_strategy)
        )
        self._writer = tf.summary.create_file_writer(log_dir)
        self._batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        if self.update_freq != "epoch" and self._batches % self.update_freq == 0:
            self._write()

    def on_epoch_end(self, epoch, logs=None):
        if self.update_freq == "epoch":
            self._write()
        for pruner in self._pruners:
            pruner.check_schedule_output()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
        for pruner in self._pruners:
            check_fit_end(self, pruner)

    def sparsities(self):
        """`{name: value}` of everything this callback writes, read now."""
        pruners = self._pruners or find_pruners(self.model)
        values = {}
        zeros = size = 0
        for pruner in pruners:
            target = float(_keras_internals.to_numpy(pruner.target_sparsity()))
            if len(pruners) == 1:
                values["pruning/target_sparsity"] = target
            for variable, mask in zip(pruner.variables, pruner.masks, strict=True):
                m = _keras_internals.to_numpy(mask)
                if len(pruners) > 1:
                    values[f"pruning/{variable.path}/target_sparsity"] = target
                values[f"pruning/{variable.path}/sparsity"] = float(1.0 - m.mean())
                zeros += int(np.sum(m == 0))
                size += m.size
        values["pruning/total_sparsity"] = zeros / size
        return values

    def _write(self):
        import tensorflow as tf

        # Every pruner advances on every optimizer update: the same step.
        step = int(_keras_internals.to_numpy(self._pruners[0].step))
        with self._writer.as_default(step=step):
            for name, value in self.sparsities().items():
                tf.summary.scalar(name, value)
        self._writer.flush()

    def get_config(self):
        return {"log_dir": self.log_dir, "update_freq": self.update_freq}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
