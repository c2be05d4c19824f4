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


class _CrashAtStep(keras.callbacks.Callback):
    """Raises after the given optimizer step (as Keras' BackupAndRestore tests do)."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.step:
            raise RuntimeError(f"crash at step {self.step}")


def _assert_ends_as_the_uninterrupted_run(resumed, reference):
    assert int(resumed.optimizer.iterations.numpy()) == EPOCHS * STEPS_PER_EPOCH
    assert int(find_pruner(resumed).step.numpy()) == EPOCHS * STEPS_PER_EPOCH
    assert list(pruning.sparsity_report(resumed).values()) == list(
        pruning.sparsity_report(reference).values()
    )
    for layer in resumed.layers:
        assert np.mean(layer.kernel.numpy() == 0) == pytest.approx(0.8, abs=0.01)
    for a, b in zip(resumed.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "backup, update_step, crash",
    [
        (keras.callbacks.BackupAndRestore, True, _Crash),
        (keras.callbacks.BackupAndRestore, False, _Crash),
        (keras.callbacks.BackupAndRestore, False, lambda: _CrashAtStep(70)),
        (BackupAndRestore, False, _Crash),
    ],
    ids=[
        "keras-backup+UpdatePruningStep",
        "keras-backup",
        "keras-backup-crash-mid-epoch",
        "our-backup",
    ],
)
def test_resumed_pruning_run_equals_the_uninterrupted_one(
    tmp_path, backup, update_step, crash
):
    # Before, the backup brought back the weights and the optimizer but not
    # the pruning step: the schedule started over (step 60 of 120 at the
    # end) and the masks, made from the fresh model, let pruned weights grow
    # back; the run ended below 0.8. Then only `UpdatePruningStep` (documented
    # as a no-op) or our backup resumed it; now the pruner resumes itself.
    reference = _model()
    _fit(reference, [])
    extra = [pruning.UpdatePruningStep()] if update_step else []
    crashed = _model()
    with pytest.raises(RuntimeError, match="crash"):
        _fit(crashed, [backup(str(tmp_path)), crash(), *extra])
    resumed = _model()  # a new process: the model built and pruned afresh
    _fit(resumed, [backup(str(tmp_path)), *extra])
    _assert_ends_as_the_uninterrupted_run(resumed, reference)


def _fit_epochs(model, epochs):
    x, y = _data()
    model.fit(x, y, batch_size=32, epochs=epochs, shuffle=False, verbose=0)


def test_load_weights_into_a_built_optimizer_resumes_the_pruning_run(tmp_path):
    # A weights-only checkpoint (ModelCheckpoint(save_weights_only=True))
    # loaded into the model pruned and compiled afresh: once its optimizer
    # is built, `load_weights` restores `iterations`, and pruning continues.
    reference = _model()
    _fit(reference, [])
    first = _model()
    _fit_epochs(first, 3)
    path = str(tmp_path / "checkpoint.weights.h5")
    first.save_weights(path)
    resumed = _model()
    resumed.optimizer.build(resumed.trainable_variables)
    resumed.load_weights(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and without a warning
        _fit_epochs(resumed, EPOCHS - 3)
    _assert_ends_as_the_uninterrupted_run(resumed, reference)


def test_weights_loaded_without_the_optimizer_step_warn_at_the_start_of_fit(
    tmp_path,
):
    # Keras skips the optimizer's state when it is not built yet: the step
    # count is lost, and the schedule starts over. Say so, once.
    first = _model()
    _fit_epochs(first, 3)
    path = str(tmp_path / "checkpoint.weights.h5")
    first.save_weights(path)
    resumed = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras: "Skipping variable loading"
        resumed.load_weights(path)
    x, y = _data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.fit(x[:64], y[:64], batch_size=32, verbose=0)
        resumed.fit(x[:64], y[:64], batch_size=32, verbose=0)
    messages = [str(w.message) for w in caught if "pruning masks" in str(w.message)]
    zeros = pruning.sparsity_report(first)["total"]  # 0.76 at step 60 of 120
    assert messages == [
        f"The pruned weights are {zeros:.0%} zeros that the pruning masks do not hold: "
        "weights loaded after `prune_low_magnitude` (e.g. `model.load_weights` of "
        "a checkpoint of a pruning run), without the optimizer's step count (it "
        "has taken 0 updates). The pruning step starts at 0, so the schedule "
        "starts over and those zeros can grow back. To continue the run, build "
        "the optimizer before loading the weights "
        "(`model.optimizer.build(model.trainable_variables)`): `load_weights` "
        "then restores its `iterations`, from which pruning continues. Or load "
        "the weights first and prune with `prune_low_magnitude(model, schedule, "
        "initial_step=...)`."
    ]


def test_a_new_optimizer_does_not_move_the_pruning_step():
    # The step follows a *restored* optimizer only: compiling again with a
    # fresh one (iterations back at 0) continues the pruning run.
    model = _model()
    _fit_epochs(model, 2)
    model.compile(
        keras.optimizers.Adam(1e-4),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    _fit_epochs(model, 1)
    assert int(find_pruner(model).step.numpy()) == 3 * STEPS_PER_EPOCH
    assert int(model.optimizer.iterations.numpy()) == STEPS_PER_EPOCH


def test_a_restored_run_trained_eagerly_continues_its_step_and_says_why_not_more(
    tmp_path,
):
    # Run eagerly, the pruner first sees the step after its first update,
    # when the restored zeros have moved: it continues the step and warns;
    # UpdatePruningStep, at the first batch, resumes exactly.
    first = _model()
    _fit_epochs(first, 3)
    path = str(tmp_path / "checkpoint.weights.h5")
    first.save_weights(path)
    x, y = _data()
    for with_callback in (False, True):
        resumed = _model()
        resumed.compile(
            keras.optimizers.Adam(1e-3),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            run_eagerly=True,
        )
        resumed.optimizer.build(resumed.trainable_variables)
        resumed.load_weights(path)
        callbacks = [pruning.UpdatePruningStep()] if with_callback else []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            resumed.fit(x[:64], y[:64], batch_size=32, verbose=0, callbacks=callbacks)
        messages = [str(w.message) for w in caught if "runs eagerly" in str(w.message)]
        assert int(find_pruner(resumed).step.numpy()) == 3 * STEPS_PER_EPOCH + 2
        if with_callback:
            assert messages == []
            assert pruning.sparsity_report(resumed)["total"] == pytest.approx(
                pruning.sparsity_report(first)["total"]
            )
        else:
            assert len(messages) == 1
            assert "the pruning step continues from 60" in messages[0]


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
