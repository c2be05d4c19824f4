"""`BackupAndRestore` resuming mid-epoch beside our step-logging callbacks.

The backup skips the batches already done by replacing the model's train
function; our callbacks wrap the same function to write their values into
the logs. In either order of the callback list, a resumed run must equal an
uninterrupted one, skipped batches must not reach the callbacks' rules, and
our values must be in the logs of the steps that did train.
"""

import json
import math
import os

import keras
import numpy as np
import pytest

from keras_stability.callbacks import GradientExplosionDetector
from keras_stability.callbacks import GradientMonitor
from keras_stability.distribute import BackupAndRestore
from keras_stability.distribute.backup_files import METADATA
from tests.distribute.test_backup_faults import STEPS_PER_EPOCH
from tests.distribute.test_backup_faults import TOTAL_STEPS
from tests.distribute.test_backup_faults import _CrashAfterStep
from tests.distribute.test_backup_faults import _fit
from tests.distribute.test_backup_faults import _model


class _Logs(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.raw = []

    def on_train_batch_end(self, batch, logs=None):
        self.raw.append((logs or {}).get("raw_loss"))


def _ours():
    return [GradientMonitor(), GradientExplosionDetector()]


@pytest.mark.parametrize("backup_first", [True, False])
def test_resume_mid_epoch_with_monitor_and_detector(tmp_path, backup_first):
    reference = _model()
    _fit(reference, _ours())
    folder = str(tmp_path / "backup")

    def callbacks(extra=()):
        backup = BackupAndRestore(folder, save_freq=1)
        ours = _ours()
        listed = [backup, *ours] if backup_first else [*ours, backup]
        return listed + list(extra), ours

    crashed, _ = callbacks([_CrashAfterStep(5)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(_model(), crashed)
    # With the detector, a backup waits for its next look (at an epoch end
    # here, before its 10th step): the last one before the crash.
    with open(os.path.join(folder, METADATA)) as f:
        metadata = json.load(f)
    done = metadata["epoch"] * STEPS_PER_EPOCH + metadata["batches_done"]
    assert done == STEPS_PER_EPOCH

    model = _model()
    logs = _Logs()
    listed, (monitor, detector) = callbacks([logs])
    _fit(model, listed)

    assert int(model.optimizer.iterations) == TOTAL_STEPS
    for a, b in zip(reference.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert detector.rollbacks == 0
    # Steps that trained carry our raw loss; the drawn-without-training ones
    # (Keras still calls the batch hooks for them) carry none.
    trained = [v for v in logs.raw if v is not None]
    assert len(trained) == TOTAL_STEPS - done
    assert all(math.isfinite(v) for v in trained)


def test_a_fit_that_raised_leaves_no_hook_or_skip_for_the_next_fit(tmp_path):
    # Keras runs no on_train_end when fit raises: our train-function hooks
    # and a pending batch skip must not act on a later fit without them.
    folder = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(_model(), [BackupAndRestore(folder, save_freq=1), _CrashAfterStep(6)])

    model = _model()
    detector = GradientExplosionDetector()
    with pytest.raises(RuntimeError, match="simulated crash"):
        # Resumes at step 6 (two batches of epoch 1 to skip) and crashes at
        # the end of the first skipped batch (the restored step count is 6),
        # with one batch still to skip and the detector attached.
        _fit(
            model, [BackupAndRestore(folder, save_freq=1), detector, _CrashAfterStep(6)]
        )
    steps_seen = detector.step
    guard = detector.optimizer
    # The detector's in-graph trip (hold every step after a failure until
    # the host looks) is still on: no on_train_end ran.
    assert int(guard._loss_record.trip_limit.numpy()) >= 0
    logs = _Logs()
    start = int(model.optimizer.iterations)
    _fit(model, [logs])  # plain fit: every batch trains, nothing of ours runs
    assert int(model.optimizer.iterations) == start + TOTAL_STEPS
    assert detector.step == steps_seen
    # No host hook of ours ran (the detector saw no step) and the trip is off,
    # so no step of this fit can be held back with no host to release it.
    # The raw loss the detector's record computes in-graph stays in the step
    # (as the monitor's values do): a later fit needs no new trace.
    assert int(guard._loss_record.trip_limit.numpy()) == -1
    assert len(logs.raw) == TOTAL_STEPS
