"""`BackupAndRestore` that is safe with several workers and with a killed process."""

import json
import os

import keras

from keras_stability._keras_internals import file_utils
from keras_stability.distribute.strategy import chief_path


@keras.saving.register_keras_serializable(package="keras_stability")
class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` for multi-worker runs and crashes.

    Same arguments and behaviour as Keras' callback, with two differences:

    - Chief-only writing: under `MultiWorkerMirroredStrategy` every worker
      restores from `backup_dir`, but only the chief writes there; the other
      workers write to a throw-away folder (`chief_path`). Keras 3's own
      callback makes every worker write the same file, which fails
      (`BlockingIOError: unable to lock file`) or races.
    - Atomic files: weights and metadata are written next to their final
      name and moved into place, so a process killed while saving leaves the
      previous backup intact.

    Args:
        backup_dir: Folder of the backup, shared by all workers (a network
            file system or a bucket on several machines).
        save_freq: `"epoch"` or a number of batches. Defaults to `"epoch"`.
        double_checkpoint: Keep the previous backup too. Defaults to `False`.
        delete_checkpoint: Delete the backup when training ends normally.
            Defaults to `True`.

    Example:

    ```python
    strategy = keras_stability.distribute.get_strategy()
    with strategy.scope():
        model = build_and_compile()
    model.fit(dataset, epochs=10, callbacks=[
        keras_stability.distribute.BackupAndRestore("/shared/backup")])
    ```
    """

    def __init__(
        self,
        backup_dir,
        save_freq="epoch",
        double_checkpoint=False,
        delete_checkpoint=True,
    ):
        super().__init__(
            backup_dir,
            save_freq=save_freq,
            double_checkpoint=double_checkpoint,
            delete_checkpoint=delete_checkpoint,
        )
        self._shared_backup_dir = backup_dir

    def _use_dir(self, backup_dir):
        self.backup_dir = backup_dir
        self._weights_path = file_utils.join(backup_dir, "latest.weights.h5")
        self._training_metadata_path = file_utils.join(
            backup_dir, "training_metadata.json"
        )
        self._prev_weights_path = f"{self._weights_path}.bkp"
        self._prev_training_metadata_path = f"{self._training_metadata_path}.bkp"

    def on_train_begin(self, logs=None):
        # Every worker restores the chief's backup, then writes to its own place.
        self._use_dir(self._shared_backup_dir)
        super().on_train_begin(logs)
        self._use_dir(chief_path(self._shared_backup_dir, self.model.distribute_strategy))

    def _save_model(self):
        if not file_utils.exists(self.backup_dir):
            file_utils.makedirs(self.backup_dir)
        if self.double_checkpoint and file_utils.exists(self._weights_path):
            file_utils.copy(self._weights_path, self._prev_weights_path)
        if self.double_checkpoint and file_utils.exists(self._training_metadata_path):
            file_utils.copy(
                self._training_metadata_path, self._prev_training_metadata_path
            )
        partial_weights = file_utils.join(self.backup_dir, "partial.weights.h5")
        partial_metadata = f"{self._training_metadata_path}.partial"
        self.model.save_weights(filepath=partial_weights, overwrite=True)
        with file_utils.File(partial_metadata, "w") as f:
            f.write(
                json.dumps({"epoch": self._current_epoch, "batch": self._last_batch_seen})
            )
        # Weights first: a crash between the two moves leaves new weights
        # with the previous epoch count, which only repeats work.
        _replace(partial_weights, self._weights_path)
        _replace(partial_metadata, self._training_metadata_path)

    def get_config(self):
        return {
            "backup_dir": self._shared_backup_dir,
            "save_freq": self.save_freq,
            "double_checkpoint": self.double_checkpoint,
            "delete_checkpoint": self.delete_checkpoint,
        }


def _replace(src, dst):
    if file_utils.is_remote_path(dst):
        # Buckets have no atomic rename; a copy is the best they offer.
        file_utils.copy(src, dst)
        file_utils.remove(src)
    else:
        os.replace(src, dst)
