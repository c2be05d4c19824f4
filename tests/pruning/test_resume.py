"""A pruning run interrupted and resumed from a backup ends as an uninterrupted one."""

import warnings

import keras
import numpy as np
import pytest

from keras_stability import pruning
from keras_stability.distribute import BackupAndRestore
from keras_stability.pruning import find_pruner

STEPS_PER_EPOCH = 20  # 640 rows, batch 32
EPOCHS = 6


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(640, 16)).astype("float32")
    y = (x[:, :4].sum(1) > 0).astype("int32") + 2 * (x[:, 4] > 0)
    return x, y


def _model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(4),
        ]
    )
    pruning.prune_low_magnitude(
        model,
        pruning.PolynomialDecay(
            initial_sparsity=0.5,
            final_sparsity=0.8,
            begin_step=0,
            end_step=EPOCHS * STEPS_PER_EPOCH,
            frequency=10,
        ),
    )
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


class _Crash(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 2:
            raise RuntimeError("crash after epoch 3")


def _fit(model, callbacks):
    x, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(
            x,
            y,
            batch_size=32,
            epochs=EPOCHS,
            shuffle=False,
            verbose=0,
            callbacks=callbacks,
        )


@pytest.mark.parametrize(
    "backup, update_step",
    [
        (keras.callbacks.BackupAndRestore, True),
        (BackupAndRestore, False),
    ],
    ids=["keras-backup+UpdatePruningStep", "our-backup"],
)
def test_resumed_pruning_run_equals_the_uninterrupted_one(
    tmp_path, backup, update_step
):
    # Before, the backup brought back the weights and the optimizer but not
    # the pruning step: the schedule started over (step 60 of 120 at the
    # end) and the masks, made from the fresh model, let pruned weights grow
    # back; the run ended below 0.8.
    reference = _model()
    _fit(reference, [])
    extra = [pruning.UpdatePruningStep()] if update_step else []
    crashed = _model()
    with pytest.raises(RuntimeError, match="crash"):
        _fit(crashed, [backup(str(tmp_path)), _Crash(), *extra])
    resumed = _model()  # a new process: the model built and pruned afresh
    _fit(resumed, [backup(str(tmp_path)), *extra])
    assert int(resumed.optimizer.iterations.numpy()) == EPOCHS * STEPS_PER_EPOCH
    assert int(find_pruner(resumed).step.numpy()) == EPOCHS * STEPS_PER_EPOCH
    for layer in resumed.layers:
        assert np.mean(layer.kernel.numpy() == 0) == pytest.approx(0.8, abs=0.01)
    for a, b in zip(resumed.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_resume_changes_nothing_in_a_run_that_was_not_restored():
    model = _model()
    pruner = find_pruner(model)
    assert pruner.resume(0) is None  # a fresh optimizer: nothing restored
    _fit(model, [pruning.UpdatePruningStep()])
    step = int(pruner.step.numpy())
    assert step == EPOCHS * STEPS_PER_EPOCH
    # It has stepped: an optimizer ahead of it is not a restore.
    assert pruner.resume(10_000) is None
    assert int(pruner.step.numpy()) == step
