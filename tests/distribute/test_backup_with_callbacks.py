"""`BackupAndRestore` resuming mid-epoch beside our step-logging callbacks.

The backup skips the batches already done by replacing the model's train
function; our callbacks wrap the same function to write their values into
the logs. In either order of the callback list, a resumed run must equal an
uninterrupted one, skipped batches must not reach the callbacks' rules, and
our values must be in the logs of the steps that did train.
"""

import math

import keras
import numpy as np
import pytest

from keras_stability.callbacks import GradientExplosionDetector
from keras_stability.callbacks import GradientMonitor
from keras_stability.distribute import BackupAndRestore
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
    assert len(trained) == TOTAL_STEPS - 5
    assert all(math.isfinite(v) for v in trained)
