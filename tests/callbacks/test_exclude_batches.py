"""`GradientExplosionDetector(exclude_batches_path=...)`: bad batches recorded, skipped on resume."""

import json
import math
import warnings

import keras
import numpy as np
import pytest

from keras_stability.callbacks import GradientExplosionDetector
from keras_stability.callbacks.exclude_batches import FORMAT
from keras_stability.callbacks.exclude_batches import ExcludeList
from keras_stability.datasets import make_classification

BATCH = 16
NAN_BATCH = 4  # rows 64..79 of 160: 10 batches of 16


def _data():
    x, y = make_classification(n_samples=160, seed=0)
    return x.copy(), y


def _model(steps_per_execution=1):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        keras.optimizers.SGD(0.05),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=steps_per_execution,
    )
    return model


def _fit(model, x, y, callbacks, epochs=2):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=epochs,
            shuffle=False,
            verbose=0,
            callbacks=callbacks,
        )


def _nan_data():
    x, y = _data()
    x[NAN_BATCH * BATCH + 6] = np.nan
    return x, y


def test_nan_batches_are_recorded_in_the_file(tmp_path):
    path = str(tmp_path / "exclude.json")
    x, y = _nan_data()
    detector = GradientExplosionDetector(exclude_batches_path=path)
    _fit(_model(), x, y, [detector])
    assert detector.skipped_batches == 2
    assert detector.offending_batches == [(0, NAN_BATCH), (1, NAN_BATCH)]
    with open(path) as f:
        content = json.load(f)
    assert content == {"format": FORMAT, "batches": [[0, 4], [1, 4]]}


def test_resumed_run_draws_the_listed_batches_without_training(tmp_path):
    path = str(tmp_path / "exclude.json")
    x, y = _nan_data()
    _fit(_model(), x, y, [GradientExplosionDetector(exclude_batches_path=path)])
    # The run again on the same data order, from the same initial weights:
    # the NaN batch is never trained on (the guard sees no non-finite step).
    model = _model()
    detector = GradientExplosionDetector(exclude_batches_path=path)
    history = _fit(model, x, y, [detector])
    assert detector.excluded_batches == 2
    assert detector.skipped_batches == 0
    assert int(model.optimizer.steps_skipped_nonfinite.numpy()) == 0
    assert int(model.optimizer.step.numpy()) == 18  # 20 batches, 2 drawn only
    assert [
        (e["epoch"], e["kind"]) for e in detector.events if e["kind"] != "spike"
    ] == [(0, "excluded_batch"), (1, "excluded_batch")]
    assert all(math.isfinite(v) for v in history.history["loss"])
    # The same weights as plain SGD on the data without those 16 rows (the
    # other batches keep their contents and order).
    keep = np.r_[0 : NAN_BATCH * BATCH, (NAN_BATCH + 1) * BATCH : len(x)]
    plain = _model()
    _fit(plain, x[keep], y[keep], [])
    for a, b in zip(model.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_with_several_steps_per_execution_the_whole_execution_is_drawn(tmp_path):
    path = str(tmp_path / "exclude.json")
    x, y = _nan_data()
    first = GradientExplosionDetector(exclude_batches_path=path)
    _fit(_model(steps_per_execution=4), x, y, [first])
    # The skipped step is one of the call's 4 batches: all 4 are listed.
    assert first.offending_batches == [(e, b) for e in (0, 1) for b in range(4, 8)]
    model = _model(steps_per_execution=4)
    detector = GradientExplosionDetector(exclude_batches_path=path)
    _fit(model, x, y, [detector])
    assert detector.excluded_batches == 8
    assert int(model.optimizer.steps_skipped_nonfinite.numpy()) == 0
    assert int(model.optimizer.step.numpy()) == 12


def test_healthy_run_writes_nothing_and_trains_as_without_the_file(tmp_path):
    path = tmp_path / "exclude.json"
    x, y = _data()
    model = _model()
    detector = GradientExplosionDetector(exclude_batches_path=path)
    _fit(model, x, y, [detector])
    reference = _model()
    _fit(reference, x, y, [GradientExplosionDetector()])
    assert detector.offending_batches == [] and detector.excluded_batches == 0
    assert not path.exists()
    for a, b in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_file_that_is_not_an_exclude_list_fails_when_training_starts(tmp_path):
    path = tmp_path / "exclude.json"
    path.write_text(json.dumps({"batches": [[0, 1]]}))  # no format
    x, y = _data()
    detector = GradientExplosionDetector(exclude_batches_path=str(path))
    with pytest.raises(ValueError, match="Invalid exclude_batches_path=.*format"):
        _fit(_model(), x, y, [detector], epochs=1)


def test_exclude_list_round_trip_and_hits(tmp_path):
    path = str(tmp_path / "sub" / "list.json")
    listed = ExcludeList(path)
    assert listed.load() == 0 and not listed.unsaved
    assert listed.add(2, range(3, 5)) == [(2, 3), (2, 4)]
    assert listed.add(2, [4]) == []
    assert listed.unsaved
    assert listed.save() is None and not listed.unsaved
    again = ExcludeList(path)
    assert again.load() == 2
    assert again.batches == {(2, 3), (2, 4)}
    assert again.hits(2, 4) and again.hits(2, 1, count=3)
    assert not again.hits(2, 0, count=3) and not again.hits(1, 3)


class _KilledAtEpochEnd(keras.callbacks.Callback):
    """Stands for a killed process: raises at the end of epoch `epoch`."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("killed")


def test_run_resumed_by_keras_backup_and_restore_skips_the_bad_batch(tmp_path):
    # The run dies in epoch 1 before its backup is written; resumed by
    # Keras' BackupAndRestore from the end of epoch 0, it replays epoch 1
    # and draws its bad batch, found before the crash, without training.
    path = str(tmp_path / "exclude.json")
    backup = str(tmp_path / "backup")
    x, y = _nan_data()
    first = GradientExplosionDetector(exclude_batches_path=path)
    with pytest.raises(RuntimeError, match="killed"):
        _fit(
            _model(),
            x,
            y,
            [first, _KilledAtEpochEnd(1), keras.callbacks.BackupAndRestore(backup)],
        )
    assert first.offending_batches == [(0, NAN_BATCH), (1, NAN_BATCH)]
    model = _model()
    detector = GradientExplosionDetector(exclude_batches_path=path)
    history = _fit(model, x, y, [detector, keras.callbacks.BackupAndRestore(backup)])
    assert len(history.epoch) == 1  # epoch 1 only, resumed
    assert detector.excluded_batches == 1 and detector.skipped_batches == 0
    assert [(e["epoch"], e["kind"]) for e in detector.events] == [(1, "excluded_batch")]
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


def test_healthy_run_with_gradient_accumulation_is_left_as_plain_fit():
    # The guard measures micro-batch norms on accumulating steps and the
    # accumulated mean's on update steps: no spike, no action, same weights.
    x, y = _data()

    def accumulating():
        keras.utils.set_random_seed(0)
        model = _model()
        model.compile(
            keras.optimizers.Adam(1e-3, gradient_accumulation_steps=4),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    model = accumulating()
    detector = GradientExplosionDetector()
    _fit(model, x, y, [detector], epochs=4)
    plain = accumulating()
    _fit(plain, x, y, [], epochs=4)
    assert detector.events == [] and detector.rollbacks == 0
    for a, b in zip(model.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _heavy_tailed_regression():
    # A linear target plus Student-t noise (2 degrees of freedom): a few
    # batches' squared errors are 10-25x the median, loss spikes to the
    # detector, which records them and trains on them (a healthy run).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 5)).astype("float32")
    w = rng.normal(size=(5, 1))
    y = (x @ w + rng.standard_t(2, size=(2000, 1))).astype("float32")
    return x, y


def _regression_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    return model


def test_spikes_trained_on_and_kept_are_not_excluded_on_resume(tmp_path):
    # Before, every recorded spike went on the list: a resumed run then left
    # out batches the first run had trained on, and ended elsewhere.
    path = str(tmp_path / "exclude.json")
    x, y = _heavy_tailed_regression()

    def fit(model):
        detector = GradientExplosionDetector(exclude_batches_path=path, verbose=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(
                x,
                y,
                batch_size=32,
                epochs=2,
                shuffle=False,
                verbose=0,
                callbacks=[detector],
            )
        return detector

    first_model = _regression_model()
    first = fit(first_model)
    assert first.spikes >= 2 and first.rollbacks == 0
    assert first.offending_batches == []
    resumed_model = _regression_model()
    resumed = fit(resumed_model)
    assert resumed.excluded_batches == 0
    for a, b in zip(
        first_model.get_weights(), resumed_model.get_weights(), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
