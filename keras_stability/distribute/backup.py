"""`BackupAndRestore` that is safe with several workers, a killed process and a
shared folder. The folder's files and their atomic commit: `backup_files`."""

import json
import warnings

import keras

from keras_stability import _checks
from keras_stability import _keras_internals
from keras_stability._keras_internals import file_utils
from keras_stability.distribute import backup_files as files
from keras_stability.distribute.backup_files import METADATA
from keras_stability.distribute.backup_files import PREVIOUS_METADATA
from keras_stability.distribute.backup_files import CorruptBackupError
from keras_stability.distribute.strategy import chief_path

# The most batches a due backup waits for a detector's decision.
MAX_WAIT = 256


@keras.saving.register_keras_serializable(package="keras_stability")
class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` for multi-worker runs, kills and shared folders.

    Same arguments and purpose as Keras' callback: after an interruption,
    `fit` with this callback restores the last backup (weights, optimizer
    state, position in training) and goes on. The differences:

    - Exact resume inside an epoch: with `save_freq=N`, training resumes at
      the batch after the last backup, not at the start of its epoch, so the
      resumed run makes the same optimizer steps on the same batches as an
      uninterrupted one (with data that is not shuffled, or shuffled the
      same way; not with `steps_per_epoch` over a dataset that carries on
      across epochs). The skipped batches are drawn from the data without
      training; other callbacks see them with empty logs, and the resumed
      epoch's logged loss averages its remaining batches only.
    - Only weights a `GradientExplosionDetector` has judged: with a
      detector in the `fit`, a backup that falls due waits for its next
      look (at most `check_every - 1` batches), then for weights it could
      take as a snapshot (no rollback being compared or checked, no loss
      spike applied in its recent window, the recent losses within 2x
      the best snapshot's; at most 256 batches, `MAX_WAIT`). The
      detector's state is saved with the backup (its counters and the
      windows its rules judge in the metadata, its snapshots' values in
      `backup-NNNNNNNN.snapshots.npz`), and the resumed detector goes on
      from it: it rolls back, if it must, to the weights the killed run's
      would have. Keras' own callback saves whatever the weights are:
      killed during an explosion, a run resumes from the exploded weights
      with a detector that never saw the ones before.
    - Deletes only what it wrote: at the end of training (with
      `delete_checkpoint=True`) it removes its own files, and the folder only
      if that leaves it empty and this callback created it. Keras' callback
      removes the whole folder, whatever else it holds.
    - Atomic backups: the weights go to a new file, then the metadata that
      names them is written to a temporary file and renamed over the old
      one, so a process killed at any moment of a save leaves the previous
      backup intact and usable.
    - A corrupt or partial backup (unreadable or truncated files, metadata
      missing while weights remain) raises one `CorruptBackupError` naming
      the folder and the problem, or, with `on_corrupt="restart"`, warns and
      starts afresh. It never retrains from scratch silently.
    - Chief-only writing: under `MultiWorkerMirroredStrategy` every worker
      restores from `backup_dir`, but only the chief writes there; the other
      workers write to a throw-away folder (`chief_path`). Keras 3's own
      callback makes every worker write the same file, which fails
      (`BlockingIOError: unable to lock file`) or races.

    Files in `backup_dir`: `training_metadata.json` (and
    `training_metadata.json.bkp` with `double_checkpoint`),
    `backup-NNNNNNNN.weights.h5` and, with a detector,
    `backup-NNNNNNNN.snapshots.npz`, plus temporary `.partial` and `.tmp`
    files while a save is under way.

    Args:
        backup_dir: Folder of the backup, shared by all workers (a network
            file system or a bucket on several machines). It may hold other
            files; they are left alone.
        save_freq: `"epoch"`, or a positive integer: back up every that many
            batches. Defaults to `"epoch"`.
        double_checkpoint: Keep the previous backup too, and fall back to it
            if the latest cannot be read. Defaults to `False`.
        delete_checkpoint: Delete the backup when training ends normally.
            Defaults to `True`.
        on_corrupt: What to do when the backup in `backup_dir` cannot be
            resumed from: `"raise"` a `CorruptBackupError`, or `"restart"`:
            warn, delete the unusable backup files and train from the start.
            Defaults to `"raise"`.

    After `fit`, `longest_wait` holds the most batches a due backup waited
    for a detector.

    Raises:
        ValueError: If an argument is invalid.

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
        on_corrupt="raise",
    ):
        backup_dir = _checks.check_path("backup_dir", backup_dir)
        if not (isinstance(save_freq, str) and save_freq == "epoch"):
            save_freq = _checks.check_int(
                "save_freq", save_freq, low=1, what='"epoch" or a positive integer'
            )
        super().__init__(
            backup_dir,
            save_freq=save_freq,
            double_checkpoint=_checks.check_bool(
                "double_checkpoint", double_checkpoint
            ),
            delete_checkpoint=_checks.check_bool(
                "delete_checkpoint", delete_checkpoint
            ),
        )
        self.on_corrupt = _checks.check_choice(
            "on_corrupt", on_corrupt, ("raise", "restart")
        )
        self._shared_backup_dir = backup_dir
        self._reset_state()

    def _reset_state(self):
        self._epoch = 0
        self._batches_done = 0
        self._batches_since_save = 0
        self._resume = None  # (epoch, batches done) restored, until that epoch begins
        self._save_index = 0
        self._weights_file = None  # of the latest backup this run knows of
        self._weights_bytes = None
        self._last_saved = None  # (epoch, batches done) of the latest backup
        self._previous_weights_file = None
        self._created_dir = None  # unknown until the first save or restore
        self._restored = None  # (weights path, metadata, optimizer layout) loaded
        self._waiting = None  # batches a due backup has waited (`_may_save`)
        # The arrays file (a detector's snapshots) the latest backup names,
        # the one the previous names, and what they hold (`_save_arrays`).
        self._arrays_file = None
        self._previous_arrays_file = None
        self._arrays_held = None
        # The most batches a due backup waited for a detector in this fit.
        self.longest_wait = 0

    # -- restoring ---------------------------------------------------------

    def on_train_begin(self, logs=None):
        self._reset_state()
        _keras_internals.cancel_skip_train_batches(self.model)
        if not self.model.built:
            raise ValueError(
                "To use the BackupAndRestore callback, the model must be built "
                f"before `fit()`. Model {self.model.name!r} is unbuilt: build it by "
                "calling it on a batch of data or with an `Input`."
            )
        write_dir = chief_path(self._shared_backup_dir, self.model.distribute_strategy)
        writes_shared = write_dir == self._shared_backup_dir
        restored = self._restore(writes_shared)
        self.backup_dir = write_dir
        if restored is None:
            _keras_internals.set_initial_epoch(self.model, None)
        else:
            epoch, batches_done = restored
            steps = (self.params or {}).get("steps")
            if steps and batches_done >= steps:
                epoch, batches_done = epoch + 1, 0  # saved after the epoch's last batch
            _keras_internals.set_initial_epoch(self.model, epoch)
            if batches_done:
                self._resume = (epoch, batches_done)
                _keras_internals.skip_train_batches(self.model, batches_done)
        if writes_shared:
            self._remove_unreferenced()
        else:
            # A worker's throw-away folder: its own files only, never the chief's.
            self._created_dir = None
            self._weights_file = self._previous_weights_file = None
            self._arrays_file = self._previous_arrays_file = None

    def _restore(self, writes_shared):
        """Loads the newest usable backup; returns `(epoch, batches_done)` or `None`."""
        directory = self._shared_backup_dir
        if not file_utils.exists(directory):
            return None
        problems = []
        for name in (METADATA, PREVIOUS_METADATA):
            if not file_utils.exists(file_utils.join(directory, name)):
                continue
            try:
                metadata = files.read_metadata(directory, name)
                self._load_weights(files.weights_path(directory, metadata), metadata)
            except CorruptBackupError as e:
                problems.append(str(e))
                continue
            if problems:
                warnings.warn(
                    f"BackupAndRestore: the latest backup in {directory!r} cannot be "
                    f"used ({problems[0]}); resumed from the previous one "
                    f"({PREVIOUS_METADATA}) instead.",
                    stacklevel=3,
                )
            self._adopt(metadata)
            _resume_pruning(self.model)
            self._tell_resumed(metadata)
            self._restored = (
                files.weights_path(directory, metadata),
                metadata,
                self._optimizer_layout(),
            )
            return metadata["epoch"], metadata["batches_done"]
        if not problems:
            left = files.committed_weights(directory)
            if not left:
                return None  # nothing committed yet: a fresh start
            problems.append(
                f"{METADATA} is missing but the weights file {left[-1]} remains "
                "(a partial backup: without the metadata the position in "
                "training is unknown)"
            )
        problem = "; the previous backup too: ".join(problems)
        if self.on_corrupt == "raise":
            raise CorruptBackupError(
                f"BackupAndRestore cannot resume from the backup in {directory!r}: "
                f"{problem}. Delete the backup files ({METADATA}*, "
                "backup-*.weights.h5) to start afresh, or pass "
                'on_corrupt="restart" to do so automatically.'
            )
        warnings.warn(
            f"BackupAndRestore: the backup in {directory!r} cannot be resumed from "
            f"({problem}); training starts afresh"
            + (" and its backup files are deleted." if writes_shared else "."),
            stacklevel=3,
        )
        if writes_shared:
            for name in files.own_files(directory):
                files.remove(directory, name)
        return None

    def _load_weights(self, path, metadata):
        """Loads weights and optimizer state; on failure leaves the model as it was."""
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            # Make sure optimizer variables exist before loading.
            optimizer.build(self.model.trainable_variables)
        variables = list(self.model.variables)
        if optimizer is not None:
            variables += list(optimizer.variables)
        before = [v.numpy() for v in variables]
        try:
            self.model.load_weights(path)
        except Exception as e:  # any failure to read our file means an unusable backup
            for v, value in zip(variables, before, strict=True):
                v.assign(value)
            first_line = (str(e).strip().splitlines() or [""])[0][:200]
            raise CorruptBackupError(
                f"the weights file {metadata['weights']} cannot be loaded into this "
                f"model ({type(e).__name__}: {first_line})"
            ) from None

    def _optimizer_layout(self):
        optimizer = self.model.optimizer
        if optimizer is None:
            return None
        return id(optimizer), len(optimizer.variables)

    def _reload_if_optimizer_changed(self):
        """Loads the restored backup again if the optimizer changed since.

        A callback after this one in the list may wrap the optimizer in its
        `on_train_begin` (e.g. a `GuardedOptimizer` for the detector or the
        monitor), after our restore: Keras then finds another number of
        optimizer variables in the file and skips the optimizer state with a
        warning. The weights file was read once already, so it is known good.
        """
        restored, self._restored = self._restored, None
        if restored is not None and self._optimizer_layout() != restored[2]:
            self._load_weights(restored[0], restored[1])
            self._tell_resumed(restored[1])

    def _step_logs(self, create=False):
        from keras_stability.callbacks.step_logs import StepLogs

        if create:
            return StepLogs.of(self.model)
        return self.model.__dict__.get(StepLogs._ATTRIBUTE)

    def _tell_resumed(self, metadata):
        """Gives our callbacks in this `fit` the state and arrays they kept in
        the backup (`StepLogs.resume`: a detector's state and snapshots)."""
        arrays = files.read_arrays(self._shared_backup_dir, metadata.get("arrays"))
        self._step_logs(create=True).resume(
            self.params, metadata.get("callbacks") or {}, arrays
        )

    def _adopt(self, metadata):
        """Carries on the numbering and file bookkeeping of the restored backup."""
        self._created_dir = metadata.get("created_backup_dir", False)
        self._save_index = metadata.get("save_index", 0) + 1
        self._weights_file = metadata["weights"]
        self._weights_bytes = metadata.get("weights_bytes")
        self._previous_weights_file = None
        self._arrays_file = metadata.get("arrays")
        self._previous_arrays_file = None
        if self.double_checkpoint and file_utils.exists(
            file_utils.join(self._shared_backup_dir, PREVIOUS_METADATA)
        ):
            try:
                previous = files.read_metadata(
                    self._shared_backup_dir, PREVIOUS_METADATA
                )
                self._previous_weights_file = previous["weights"]
                self._previous_arrays_file = previous.get("arrays")
            except CorruptBackupError:
                pass

    # -- saving ------------------------------------------------------------

    def on_epoch_begin(self, epoch, logs=None):
        self._reload_if_optimizer_changed()
        # `fit` has read the resume epoch by now (once, before its first
        # epoch); clear it so a later `fit` of this model without the
        # callback, or after this one raised, starts where it is asked to.
        _keras_internals.set_initial_epoch(self.model, None)
        self._epoch = epoch
        self._batches_done = 0
        if self._resume is not None and self._resume[0] == epoch:
            self._batches_done = self._resume[1]
        self._resume = None

    def on_train_batch_end(self, batch, logs=None):
        done = batch + 1
        if done <= self._batches_done:
            return  # a batch done before the interruption, skipped on resume
        self._batches_since_save += done - self._batches_done
        self._batches_done = done
        due = self._waiting is not None or (
            self.save_freq != "epoch" and self._batches_since_save >= self.save_freq
        )
        if due and self._may_save():
            self._batches_since_save = 0
            self._save(self._epoch, done)

    def on_epoch_end(self, epoch, logs=None):
        if self.save_freq == "epoch":
            if self._may_save():
                self._save(epoch + 1, 0)
        elif self._last_saved == (epoch, self._batches_done):
            # Saved after the epoch's last batch: say the epoch is done, so a
            # resume starts the next one rather than an epoch with nothing left.
            self._commit(epoch + 1, 0, keep_previous=False)
        self._batches_done = 0

    def _may_save(self):
        """Whether the backup that is due may be taken now.

        Not while a `GradientExplosionDetector` in this `fit` is deciding
        about the current weights (`ready_for_backup`): the backup waits for
        the first batch after it has decided, at most `MAX_WAIT` batches.
        """
        step_logs = self._step_logs()
        if step_logs is None or step_logs.ready_for_backup(self.params):
            self._waiting = None
            return True
        self._waiting = (self._waiting or 0) + 1
        self.longest_wait = max(self.longest_wait, self._waiting)
        if self._waiting <= MAX_WAIT:
            return False
        warnings.warn(
            f"BackupAndRestore: the backup has waited {MAX_WAIT} batches for the "
            "GradientExplosionDetector to decide about the weights; it is taken now.",
            stacklevel=2,
        )
        self._waiting = None
        return True

    def _save_model(self):
        """Keras' hook (e.g. preemption); saves the current position."""
        self._save(self._epoch, self._batches_done)

    def _save(self, epoch, batches_done):
        """One backup: a new weights file, then the metadata naming it, atomically."""
        directory = self.backup_dir
        if not file_utils.exists(directory):
            file_utils.makedirs(directory)
            if self._created_dir is None:
                self._created_dir = True
        elif self._created_dir is None:
            self._created_dir = False
        weights = files.weights_name(self._save_index)
        temporary = files.partial(file_utils.join(directory, weights))
        self.model.save_weights(filepath=temporary, overwrite=True)
        stale = (
            self._previous_weights_file
            if self.double_checkpoint
            else self._weights_file
        )
        if self.double_checkpoint:
            self._previous_weights_file = self._weights_file
        self._weights_file = weights
        self._weights_bytes = files.size(temporary)
        previous_arrays = self._arrays_file
        states = self._callback_states()
        self._save_arrays(directory, states)
        self._commit(
            epoch, batches_done, keep_previous=self.double_checkpoint, states=states
        )
        files.finish_weights(directory, weights)
        if stale and stale not in (weights, self._previous_weights_file):
            files.remove(directory, stale)
        self._previous_arrays_file = previous_arrays if self.double_checkpoint else None
        for name in files.arrays_files(directory):
            if name not in (self._arrays_file, self._previous_arrays_file):
                files.remove(directory, name)
        self._save_index += 1

    def _callback_states(self):
        """Our callbacks' state for the metadata (`StepLogs.backup_states`)."""
        step_logs = self._step_logs()
        return {} if step_logs is None else step_logs.backup_states(self.params)

    def _save_arrays(self, directory, states):
        """Writes our callbacks' arrays (a detector's snapshots) for this
        backup, unless those of the last backup are still the same (the
        snapshots `states` names)."""
        step_logs = self._step_logs()
        if step_logs is None:
            self._arrays_file = None
            return
        held = json.dumps(
            {key: state.get("snapshots") for key, state in states.items()},
            sort_keys=True,
            default=str,
        )
        if held == self._arrays_held and self._arrays_file is not None:
            return
        arrays = step_logs.backup_arrays(self.params)
        if not any(arrays.values()):
            self._arrays_file = self._arrays_held = None
            return
        name = files.arrays_name(self._save_index)
        files.write_arrays(directory, name, arrays)
        self._arrays_file, self._arrays_held = name, held

    def _commit(self, epoch, batches_done, keep_previous, states=None):
        if states is None:
            states = self._callback_states()
        files.commit(
            self.backup_dir,
            {
                **({"callbacks": states} if states else {}),
                **({"arrays": self._arrays_file} if self._arrays_file else {}),
                "epoch": epoch,
                "batches_done": batches_done,
                "weights": self._weights_file,
                "weights_bytes": self._weights_bytes,
                "save_index": files.weights_index(self._weights_file),
                "created_backup_dir": self._created_dir,
            },
            keep_previous=keep_previous,
        )
        self._last_saved = (epoch, batches_done)

    # -- cleaning up -------------------------------------------------------

    def _remove_unreferenced(self):
        """Finishes or removes what a killed save left (never a file a backup names)."""
        keep = {self._weights_file, self._previous_weights_file} - {None}
        for name in keep:
            if name != files.LEGACY_WEIGHTS:
                files.finish_weights(self.backup_dir, name)
        keep |= {self._arrays_file, self._previous_arrays_file} - {None}
        for name in files.own_files(self.backup_dir):
            if name in (METADATA, PREVIOUS_METADATA) or name in keep:
                continue
            files.remove(self.backup_dir, name)

    def on_train_end(self, logs=None):
        _keras_internals.cancel_skip_train_batches(self.model)
        _keras_internals.set_initial_epoch(self.model, None)
        if not self.delete_checkpoint or not file_utils.exists(self.backup_dir):
            return
        for name in files.own_files(self.backup_dir):
            files.remove(self.backup_dir, name)
        if self._created_dir:
            files.remove_dir_if_empty(self.backup_dir)

    def get_config(self):
        return {
            "backup_dir": self._shared_backup_dir,
            "save_freq": self.save_freq,
            "double_checkpoint": self.double_checkpoint,
            "delete_checkpoint": self.delete_checkpoint,
            "on_corrupt": self.on_corrupt,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _resume_pruning(model):
    """The pruning step and masks of a pruned model, from the restored state."""
    from keras_stability.pruning import find_pruners

    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return
    for pruner in find_pruners(model):
        pruner.resume(optimizer.iterations)
