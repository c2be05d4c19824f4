"""A run killed during a rescue resumes from `BackupAndRestore` as if never killed.

The Keras example at SGD(20) explodes in its first steps; the detector rolls
back at its first look and checks the recovery. A backup taken in between
held the exploded weights, and the run resumed from it (a fresh detector,
no snapshot from before the explosion) ended at a loss of 1e18, or stopped.
The backup now waits while the detector decides (`ready_for_backup`), and
keeps the detector's state (`backup_state`) for the resumed run.
"""

import json
import math
import os
import warnings

import keras
import numpy as np
import pytest

from keras_stability.callbacks import GradientExplosionDetector
from keras_stability.callbacks.lr_scaling import innermost_optimizer
from keras_stability.datasets import load_dataset
from keras_stability.distribute import BackupAndRestore
from keras_stability.distribute import backup as backup_module
from keras_stability.distribute import backup_files
from keras_stability.distribute.backup_files import METADATA
from keras_stability.models import build_example_model
from keras_stability.models import compile_example_model

EPOCHS = 2
SAVE_FREQ = 5


class _KillAtBatch(keras.callbacks.Callback):
    """Raises at the end of the `calls`-th batch of the fit, like a kill."""

    def __init__(self, calls):
        super().__init__()
        self.calls = calls
        self.seen = 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.calls:
            raise KeyboardInterrupt("killed")


@pytest.fixture(scope="module")
def data():
    (x, y), (xv, yv) = load_dataset("synthetic", seed=0)
    return x, y, xv, yv


def _fit(data, callbacks, lr=20.0, quiet=True):
    x, y, _, _ = data
    keras.utils.set_random_seed(0)
    model = compile_example_model(build_example_model(), keras.optimizers.SGD(lr))
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        try:
            model.fit(
                x,
                y,
                batch_size=32,
                epochs=EPOCHS,
                shuffle=False,
                verbose=0,
                callbacks=callbacks,
            )
        except KeyboardInterrupt:
            return None
    return model


def _loss(model, data):
    _, _, xv, yv = data
    return float(model.evaluate(xv, yv, verbose=0)[0])


def _learning_rate(model):
    return float(np.asarray(innermost_optimizer(model.optimizer).learning_rate))


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("uninterrupted") / "backup")
    detector = GradientExplosionDetector()
    model = _fit(data, [BackupAndRestore(folder, save_freq=SAVE_FREQ), detector])
    # Its files, the snapshots' too, are gone at the end, and so the folder.
    assert not os.path.exists(folder)
    return model, detector


def _killed_and_resumed(data, folder, kill_at, detector_first=False):
    def callbacks(detector, extra=()):
        backup = BackupAndRestore(folder, save_freq=SAVE_FREQ)
        listed = [detector, backup] if detector_first else [backup, detector]
        return listed + list(extra)

    killed = GradientExplosionDetector()
    assert _fit(data, callbacks(killed, [_KillAtBatch(kill_at)])) is None
    metadata = None
    if os.path.exists(os.path.join(folder, METADATA)):
        with open(os.path.join(folder, METADATA)) as f:
            metadata = json.load(f)
    detector = GradientExplosionDetector()
    model = _fit(data, callbacks(detector))
    return model, detector, killed, metadata


def test_the_backup_changes_nothing_in_the_run(uninterrupted, data):
    # The backup makes no look of its own: a run with it trains as one without.
    model, detector = uninterrupted
    alone = GradientExplosionDetector()
    reference = _fit(data, [alone])
    assert detector.rollbacks == alone.rollbacks == 1
    assert detector.stopped_reason is None
    for a, b in zip(reference.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert _loss(model, data) < 0.8  # chance: log(10) = 2.30


@pytest.mark.parametrize("detector_first", [False, True])
def test_killed_during_the_explosion_resumes_to_the_same_model(
    uninterrupted, data, tmp_path, detector_first
):
    # Killed at batch 7: a backup at batch 5 held the exploded weights (the
    # loss at 1e18) and the resumed run ended there.
    reference, reference_detector = uninterrupted
    model, detector, killed, metadata = _killed_and_resumed(
        data, str(tmp_path / "backup"), 7, detector_first
    )
    # The detector was deciding from batch 5 on: no backup was taken.
    assert metadata is None
    assert killed.rollbacks == 0
    assert detector.rollbacks == reference_detector.rollbacks == 1
    assert _loss(model, data) == pytest.approx(_loss(reference, data), rel=1e-4)


@pytest.mark.parametrize("detector_first", [False, True])
def test_killed_after_the_rollback_goes_on_with_the_detectors_state(
    uninterrupted, data, tmp_path, detector_first
):
    reference, reference_detector = uninterrupted
    model, detector, killed, metadata = _killed_and_resumed(
        data, str(tmp_path / "backup"), 60, detector_first
    )
    assert killed.rollbacks == 1
    # The backup was taken once the rollback was checked, with the
    # detector's state: the resumed one goes on from 1 rollback (its budget
    # and its lowering of the rate on plateaus after a rollback).
    state = metadata["callbacks"]["GradientExplosionDetector:"]
    assert state["rollbacks"] == 1
    assert (metadata["epoch"], metadata["batches_done"]) == (1, 10)
    assert detector.rollbacks == 1  # none in the resumed part
    assert detector.lr_probes == reference_detector.lr_probes
    assert _learning_rate(model) == pytest.approx(_learning_rate(reference))
    assert _loss(model, data) == pytest.approx(_loss(reference, data), rel=1e-4)


def test_a_healthy_run_is_backed_up_on_time_and_resumes_exactly(data, tmp_path):
    # Nothing to decide: each backup is taken at the detector's first look
    # after it falls due (every 10 batches), and the resumed run equals the
    # uninterrupted one.
    reference = _fit(data, [GradientExplosionDetector()], lr=0.1)
    folder = str(tmp_path / "backup")
    saved = []

    class Spy(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if os.path.exists(os.path.join(folder, METADATA)):
                with open(os.path.join(folder, METADATA)) as f:
                    saved.append(json.load(f)["batches_done"])

    detector = GradientExplosionDetector()
    killed = _fit(
        data,
        [
            BackupAndRestore(folder, save_freq=SAVE_FREQ),
            detector,
            Spy(),
            _KillAtBatch(23),
        ],
        lr=0.1,
    )
    assert killed is None
    assert sorted(set(saved)) == [10, 20]
    model = _fit(
        data,
        [BackupAndRestore(folder, save_freq=SAVE_FREQ), GradientExplosionDetector()],
        lr=0.1,
    )
    for a, b in zip(reference.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_backup_waits_at_most_max_wait_batches(data, tmp_path, monkeypatch):
    class Undecided(GradientExplosionDetector):
        def ready_for_backup(self):
            super().ready_for_backup()
            return False

    monkeypatch.setattr(backup_module, "MAX_WAIT", 3)
    folder = str(tmp_path / "backup")
    with pytest.warns(UserWarning, match="waited 3 batches"):
        _fit(
            data,
            [
                BackupAndRestore(folder, save_freq=SAVE_FREQ, delete_checkpoint=False),
                Undecided(),
                _KillAtBatch(12),
            ],
            lr=0.1,
            quiet=False,
        )
    with open(os.path.join(folder, METADATA)) as f:
        metadata = json.load(f)
    # Due at batch 5, taken 3 batches later.
    assert metadata["batches_done"] == 8
    assert math.isfinite(metadata["callbacks"]["Undecided:"]["rollbacks"])


def test_the_detectors_snapshots_are_kept_beside_the_backup(data, tmp_path):
    # Killed after the rollback: the backup names a file of the detector's
    # snapshots, and the resumed detector rolls back, if it must, to the same
    # weights as the killed one would have (its snapshot, not the backup's).
    folder = str(tmp_path / "backup")
    killed = GradientExplosionDetector()
    _fit(
        data,
        [
            BackupAndRestore(folder, save_freq=SAVE_FREQ),
            killed,
            _KillAtBatch(60),
        ],
    )
    with open(os.path.join(folder, METADATA)) as f:
        metadata = json.load(f)
    arrays = backup_files.read_arrays(folder, metadata["arrays"])
    names = [n for n in os.listdir(folder) if n.endswith(".snapshots.npz")]
    assert names == [metadata["arrays"]]  # older ones removed
    (state,) = metadata["callbacks"].values()
    saved = state["snapshots"]["snapshot"]
    detector = GradientExplosionDetector()
    model = _fit(data, [BackupAndRestore(folder, save_freq=SAVE_FREQ), detector])
    del model
    assert state["step"] > saved["step"]
    (values,) = arrays.values()
    assert len([k for k in values if k.startswith("snapshot/w")]) == 6
    # The resumed detector took it as its snapshot (it has not been
    # replaced since: the run ends before another is confirmed, or a later
    # one has a later step).
    assert detector.snapshot.step >= saved["step"]
    assert (
        detector.step
        == 2 * 50 - metadata["epoch"] * 50 - metadata["batches_done"] + state["step"]
    )


def test_an_unreadable_snapshots_file_resumes_without_it(data, tmp_path):
    folder = str(tmp_path / "backup")
    _fit(
        data,
        [
            BackupAndRestore(folder, save_freq=SAVE_FREQ),
            GradientExplosionDetector(),
            _KillAtBatch(60),
        ],
    )
    with open(os.path.join(folder, METADATA)) as f:
        name = json.load(f)["arrays"]
    with open(os.path.join(folder, name), "wb") as f:
        f.write(b"not an npz")
    assert backup_files.read_arrays(folder, name) is None
    detector = GradientExplosionDetector()
    model = _fit(data, [BackupAndRestore(folder, save_freq=SAVE_FREQ), detector])
    # Its snapshot is then the restored weights; the run goes on.
    assert np.isfinite(_loss(model, data))


class _WeightsAtFirstBatch(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        if not hasattr(self, "weights"):
            self.weights = [np.array(w) for w in self.model.get_weights()]


def test_keras_backup_listed_after_the_detector_restores_before_its_first_snapshot(
    tmp_path,
):
    # Keras' own BackupAndRestore restores in its `on_train_begin`; listed
    # after the detector, that runs after the detector's. The detector's
    # first snapshot (what a rollback in the first steps restores) must be
    # the restored weights, not the fresh model's.
    x, y = np.random.default_rng(0).normal(size=(64, 10)), np.arange(64) % 10
    backup_dir = str(tmp_path / "keras_backup")

    def fit(callbacks, epochs):
        keras.utils.set_random_seed(0)
        model = compile_example_model(build_example_model(), keras.optimizers.SGD(0.1))
        detector = GradientExplosionDetector()
        seen = _WeightsAtFirstBatch()
        backup = keras.callbacks.BackupAndRestore(backup_dir, save_freq="epoch")
        try:
            model.fit(
                x,
                y,
                batch_size=16,
                epochs=epochs,
                verbose=0,
                callbacks=[detector, backup, seen, *callbacks],
            )
        except KeyboardInterrupt:
            pass
        return model, detector, seen

    fresh = [np.array(w) for w in fit([], 0)[0].get_weights()]
    fit([_KillAtBatch(4 * 3)], 4)  # killed after 2 epochs saved
    _, detector, seen = fit([], 3)
    assert not np.allclose(seen.weights[0], fresh[0])  # Keras restored
    assert detector.snapshot.step == 0  # no later snapshot in 4 steps
    for kept, restored in zip(detector.snapshot.weights, seen.weights, strict=True):
        np.testing.assert_array_equal(kept, restored)
