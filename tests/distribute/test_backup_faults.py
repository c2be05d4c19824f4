"""Fault table of `BackupAndRestore`: every fault ends with no user file lost and,
where training resumes, the optimizer step count and weights of an
uninterrupted run.

| fault                                            | expected                              |
|--------------------------------------------------|---------------------------------------|
| a user's file in `backup_dir`                    | kept; only our files deleted          |
| crash after any step, `save_freq=1` (and 3)      | resume equals uninterrupted           |
| SIGKILL while writing weights / before / after   | resume equals uninterrupted           |
|   the metadata commit                            |                                       |
| corrupt metadata (JSON)                          | one CorruptBackupError, or a warned   |
| metadata deleted while weights remain            |   fresh start equal to uninterrupted  |
| truncated weights / weights of the right size    |   with `on_corrupt="restart"`         |
|   but garbage                                    |                                       |
| corrupt latest, `double_checkpoint=True`         | warned resume from the previous       |

Before this module, Keras' `on_train_end` removed the whole folder, a resume
with `save_freq=1` replayed the partial epoch (more optimizer steps, other
weights), a corrupt backup raised raw h5py / JSON errors and deleted metadata
retrained every epoch silently.
"""

import json
import os
import shutil
import signal

import keras
import numpy as np
import pytest

from keras_stability.distribute import BackupAndRestore
from keras_stability.distribute import CorruptBackupError
from keras_stability.distribute import backup_files
from tests.helpers import run_in_subprocess

EPOCHS = 3
BATCH = 4
STEPS_PER_EPOCH = 4
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH
USER_FILE = "my_results.csv"
USER_TEXT = "epoch,accuracy\n0,0.5\n"


def _model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.Adam(0.05), "mse")
    return model


def _data():
    x = np.linspace(-1, 1, STEPS_PER_EPOCH * BATCH * 3, dtype="float32").reshape(-1, 3)
    return x, np.sin(3 * x.sum(1, keepdims=True))


def _fit(model, callbacks=()):
    x, y = _data()
    return model.fit(
        x,
        y,
        epochs=EPOCHS,
        batch_size=BATCH,
        shuffle=False,
        verbose=0,
        callbacks=list(callbacks),
    )


class _CrashAfterStep(keras.callbacks.Callback):
    """Raises after the `step`-th optimizer step (1-based), like a crash."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations) == self.step:
            raise RuntimeError("simulated crash")


@pytest.fixture(scope="module")
def reference():
    model = _model()
    _fit(model)
    assert int(model.optimizer.iterations) == TOTAL_STEPS
    return model.get_weights()


def _assert_uninterrupted(model, reference):
    assert int(model.optimizer.iterations) == TOTAL_STEPS
    for a, b in zip(model.get_weights(), reference, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.fixture
def shared(tmp_path):
    """A backup folder that already holds a user's file."""
    folder = tmp_path / "backup"
    folder.mkdir()
    (folder / USER_FILE).write_text(USER_TEXT)
    return str(folder)


def _user_file_intact(folder):
    with open(os.path.join(folder, USER_FILE)) as f:
        return f.read() == USER_TEXT


def _crash_then_backup(folder, step=6, **kwargs):
    """Trains until a crash after `step` steps; returns the files left in `folder`."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(_model(), [BackupAndRestore(folder, **kwargs), _CrashAfterStep(step)])
    return sorted(os.listdir(folder))


# -- only our files ----------------------------------------------------------


def test_a_users_file_in_the_folder_survives_the_end_of_training(shared, reference):
    model = _model()
    _fit(model, [BackupAndRestore(shared, save_freq=1)])
    _assert_uninterrupted(model, reference)
    assert sorted(os.listdir(shared)) == [USER_FILE]
    assert _user_file_intact(shared)


def test_a_file_added_during_training_survives_and_keeps_the_folder(tmp_path):
    folder = str(tmp_path / "made_by_the_callback")

    class AddFile(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            with open(os.path.join(folder, f"epoch{epoch}.txt"), "w") as f:
                f.write("mine")

    _fit(_model(), [BackupAndRestore(folder), AddFile()])
    assert sorted(os.listdir(folder)) == ["epoch0.txt", "epoch1.txt", "epoch2.txt"]


def test_a_folder_the_callback_created_is_removed_when_empty(tmp_path):
    folder = str(tmp_path / "made_by_the_callback")
    _crash_then_backup(folder, step=5)  # created by the first run (epoch 0 saved)
    _fit(_model(), [BackupAndRestore(folder)])  # resumed by the second
    assert not os.path.exists(folder)
    empty = tmp_path / "the_users_empty_folder"
    empty.mkdir()
    _fit(_model(), [BackupAndRestore(str(empty))])
    assert empty.is_dir() and not os.listdir(empty)


# -- exact resume --------------------------------------------------------------


@pytest.mark.parametrize("step", range(1, TOTAL_STEPS))
def test_resume_after_a_crash_at_any_step_equals_uninterrupted(shared, reference, step):
    # Before: the partial epoch was replayed (more optimizer steps, other weights).
    _crash_then_backup(shared, step=step, save_freq=1)
    with open(os.path.join(shared, backup_files.METADATA)) as f:
        metadata = json.load(f)
    epoch, batches_done = divmod(step, STEPS_PER_EPOCH)
    if batches_done == 0:  # crashed after an epoch's last batch, before its end
        epoch, batches_done = epoch - 1, STEPS_PER_EPOCH
    assert (metadata["epoch"], metadata["batches_done"]) == (epoch, batches_done)
    model = _model()
    history = _fit(model, [BackupAndRestore(shared, save_freq=1)])
    assert len(history.history["loss"]) == EPOCHS - step // STEPS_PER_EPOCH
    _assert_uninterrupted(model, reference)
    assert sorted(os.listdir(shared)) == [USER_FILE]


@pytest.mark.parametrize("step", [2, 4, 7])
def test_resume_between_saves_redoes_the_steps_since_the_last_one(
    shared, reference, step
):
    _crash_then_backup(shared, step=step, save_freq=3)
    model = _model()
    _fit(model, [BackupAndRestore(shared, save_freq=3)])
    _assert_uninterrupted(model, reference)


class _CrashAtEpochBegin(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize(("save_freq", "position"), [(2, (1, 0)), (3, (0, 3))])
def test_resume_at_an_epoch_boundary(shared, reference, save_freq, position):
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(
            _model(),
            [BackupAndRestore(shared, save_freq=save_freq), _CrashAtEpochBegin(1)],
        )
    with open(os.path.join(shared, backup_files.METADATA)) as f:
        metadata = json.load(f)
    # Saved after the epoch's last batch: the epoch is recorded as done.
    assert (metadata["epoch"], metadata["batches_done"]) == position
    model = _model()
    history = _fit(model, [BackupAndRestore(shared, save_freq=save_freq)])
    assert len(history.history["loss"]) == EPOCHS - position[0]
    _assert_uninterrupted(model, reference)


def test_resume_with_double_checkpoint_and_epoch_saves(shared, reference):
    _crash_then_backup(shared, step=9, double_checkpoint=True)
    model = _model()
    history = _fit(model, [BackupAndRestore(shared, double_checkpoint=True)])
    assert len(history.history["loss"]) == 1
    _assert_uninterrupted(model, reference)
    assert sorted(os.listdir(shared)) == [USER_FILE]


# -- killed while saving (SIGKILL of a subprocess) ----------------------------

KILL_AT_SAVE = 6  # the 6th per-batch save: epoch 1, batch 2


def fit_killed_during_a_save(folder, kill_point):
    """Trains with `save_freq=1` and SIGKILLs itself inside the 6th save."""

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    model = _model()
    saves = [0]
    real_save_weights = model.save_weights

    def save_weights(filepath, overwrite=True):
        saves[0] += 1
        real_save_weights(filepath, overwrite=overwrite)
        if kill_point == "writing weights" and saves[0] == KILL_AT_SAVE:
            with open(filepath, "r+b") as f:  # half the file is on disk
                f.truncate(os.path.getsize(filepath) // 2)
            die()

    model.save_weights = save_weights
    real_replace = backup_files._replace

    def replace(src, dst):
        if saves[0] == KILL_AT_SAVE:
            if kill_point == "before commit" and dst.endswith(backup_files.METADATA):
                die()
            if kill_point == "after commit" and dst.endswith(".weights.h5"):
                die()
        real_replace(src, dst)

    backup_files._replace = replace
    _fit(model, [BackupAndRestore(folder, save_freq=1)])


@pytest.mark.parametrize(
    "kill_point", ["writing weights", "before commit", "after commit"]
)
def test_sigkill_during_a_per_batch_save_then_resume(shared, reference, kill_point):
    with pytest.raises(AssertionError, match="died with exit code -9"):
        run_in_subprocess(
            fit_killed_during_a_save, shared, kill_point, n_cpu_devices=1, timeout=300
        )
    with open(os.path.join(shared, backup_files.METADATA)) as f:
        metadata = json.load(f)
    # The save under way is lost (or, once committed, kept); never half of it.
    done = KILL_AT_SAVE if kill_point == "after commit" else KILL_AT_SAVE - 1
    assert (metadata["epoch"], metadata["batches_done"]) == divmod(
        done, STEPS_PER_EPOCH
    )
    model = _model()
    _fit(model, [BackupAndRestore(shared, save_freq=1)])
    _assert_uninterrupted(model, reference)
    assert sorted(os.listdir(shared)) == [USER_FILE]
    assert _user_file_intact(shared)


# -- corrupt or partial backups ----------------------------------------------


def _corrupt_metadata(folder):
    with open(os.path.join(folder, backup_files.METADATA), "w") as f:
        f.write('{"epoch": 1, "batches_')


def _delete_metadata(folder):
    os.remove(os.path.join(folder, backup_files.METADATA))


def _weights_file(folder):
    (name,) = [f for f in os.listdir(folder) if f.endswith(".weights.h5")]
    return os.path.join(folder, name)


def _truncate_weights(folder):
    path = _weights_file(folder)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _scramble_weights(folder):
    path = _weights_file(folder)
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).bytes(size))


FAULTS = {
    "corrupt metadata": (
        _corrupt_metadata,
        r"training_metadata.json is not valid JSON \(Unterminated string",
    ),
    "deleted metadata": (
        _delete_metadata,
        r"training_metadata.json is missing but the weights file "
        r"backup-00000005.weights.h5 remains",
    ),
    "truncated weights": (
        _truncate_weights,
        r"the weights file backup-00000005.weights.h5 is truncated or altered "
        r"\(\d+ bytes, \d+ written\)",
    ),
    "garbage weights": (
        _scramble_weights,
        r"the weights file backup-00000005.weights.h5 cannot be loaded into this "
        r"model \(\w+",
    ),
}


@pytest.fixture(scope="module")
def crashed_at_6(tmp_path_factory):
    """A folder with a user's file and the backup a crash after step 6 leaves.

    Made once; each corrupt-backup test damages its own copy (the backup's
    files name each other relative to the folder, so a copy is the same
    backup).
    """
    folder = tmp_path_factory.mktemp("crashed") / "backup"
    folder.mkdir()
    (folder / USER_FILE).write_text(USER_TEXT)
    files = _crash_then_backup(str(folder), step=6, save_freq=1)
    assert USER_FILE in files and backup_files.METADATA in files, files
    return folder


@pytest.fixture
def crashed(crashed_at_6, tmp_path):
    """This test's copy of `crashed_at_6`."""
    return shutil.copytree(crashed_at_6, tmp_path / "backup")


@pytest.mark.parametrize("fault", FAULTS)
def test_a_corrupt_backup_gets_one_clear_error(crashed, fault):
    shared = str(crashed)
    damage, problem = FAULTS[fault]
    damage(shared)
    before = {f: os.path.getsize(os.path.join(shared, f)) for f in os.listdir(shared)}
    model = _model()
    initial = model.get_weights()
    with pytest.raises(CorruptBackupError) as info:
        _fit(model, [BackupAndRestore(shared, save_freq=1)])
    message = str(info.value)
    assert message.startswith(
        f"BackupAndRestore cannot resume from the backup in {shared!r}: "
    ), message
    assert len(message.splitlines()) == 1
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert __import__("re").search(problem, message), message
    assert 'on_corrupt="restart"' in message
    # Nothing was touched: not the folder, not the model.
    assert {
        f: os.path.getsize(os.path.join(shared, f)) for f in os.listdir(shared)
    } == before
    assert _user_file_intact(shared)
    for a, b in zip(model.get_weights(), initial, strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(model.optimizer.iterations) == 0


@pytest.mark.parametrize("fault", FAULTS)
def test_a_corrupt_backup_with_restart_warns_and_trains_afresh(
    crashed, reference, fault
):
    shared = str(crashed)
    damage, problem = FAULTS[fault]
    damage(shared)
    model = _model()
    callback = BackupAndRestore(shared, save_freq=1, on_corrupt="restart")
    with pytest.warns(UserWarning, match=problem) as record:
        history = _fit(model, [callback])
    assert any("training starts afresh" in str(w.message) for w in record)
    assert len(history.history["loss"]) == EPOCHS
    _assert_uninterrupted(model, reference)
    assert sorted(os.listdir(shared)) == [USER_FILE]


def test_double_checkpoint_falls_back_to_the_previous_backup(shared, reference):
    _crash_then_backup(shared, step=6, save_freq=1, double_checkpoint=True)
    _corrupt_metadata(shared)
    model = _model()
    with pytest.warns(UserWarning, match=r"resumed from the previous one"):
        _fit(model, [BackupAndRestore(shared, save_freq=1, double_checkpoint=True)])
    _assert_uninterrupted(model, reference)
    assert sorted(os.listdir(shared)) == [USER_FILE]


def test_on_corrupt_is_validated():
    with pytest.raises(
        ValueError, match=r"`on_corrupt`. Expected one of 'raise', 'restart'"
    ):
        BackupAndRestore("/tmp/b", on_corrupt="ignore")
