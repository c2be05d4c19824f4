import json
import os

import keras
import numpy as np
import pytest

from keras_stability.distribute import BackupAndRestore


def _model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.05), "mse")
    return model


def _data():
    x = np.linspace(-1, 1, 24, dtype="float32").reshape(8, 3)
    return x, x.sum(1, keepdims=True)


class _Crash(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("simulated crash")


def test_resume_after_crash_equals_uninterrupted(tmp_path):
    x, y = _data()
    reference = _model()
    reference.fit(x, y, epochs=4, batch_size=4, verbose=0)

    backup = str(tmp_path / "backup")
    model = _model()
    with pytest.raises(RuntimeError, match="simulated crash"):
        model.fit(
            x,
            y,
            epochs=4,
            batch_size=4,
            verbose=0,
            callbacks=[BackupAndRestore(backup), _Crash(2)],
        )
    with open(os.path.join(backup, "training_metadata.json")) as f:
        assert json.load(f)["epoch"] == 2
    resumed = _model()
    history = resumed.fit(
        x, y, epochs=4, batch_size=4, verbose=0, callbacks=[BackupAndRestore(backup)]
    )
    assert len(history.history["loss"]) == 2
    for a, b in zip(resumed.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert not os.path.exists(backup)  # deleted after a normal end


def test_a_crash_while_saving_keeps_the_previous_backup(tmp_path):
    x, y = _data()
    backup = str(tmp_path / "backup")
    callback = BackupAndRestore(backup, delete_checkpoint=False)
    model = _model()
    model.fit(x, y, epochs=1, batch_size=4, verbose=0, callbacks=[callback])
    saved = [w.copy() for w in model.get_weights()]

    def dying_save(filepath, overwrite=True):
        with open(filepath, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt("killed while saving")

    model.fit(x, y, epochs=1, batch_size=4, verbose=0)  # weights move on
    model.save_weights = dying_save
    with pytest.raises(KeyboardInterrupt):
        callback._save(epoch=2, batches_done=0)
    restored = _model()
    restored.fit(
        x,
        y,
        epochs=1,
        batch_size=4,
        verbose=0,
        callbacks=[BackupAndRestore(backup, delete_checkpoint=False)],
    )
    # The intact backup said epoch 1 was done: nothing left to run, weights restored.
    for a, b in zip(restored.get_weights(), saved, strict=True):
        np.testing.assert_array_equal(a, b)


def test_config_round_trip():
    callback = BackupAndRestore("/tmp/b", save_freq=3, double_checkpoint=True)
    config = callback.get_config()
    assert config == {
        "backup_dir": "/tmp/b",
        "save_freq": 3,
        "double_checkpoint": True,
        "delete_checkpoint": True,
        "on_corrupt": "raise",
    }
    assert BackupAndRestore(**config).get_config() == config
