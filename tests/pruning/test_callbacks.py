"""UpdatePruningStep (TF-MOT's callback; training is the same without it),
fit-length warnings, and schedules whose sparsity leaves [0, 1) during training."""

import tempfile
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from keras_stability import pruning


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(10, activation="relu"),
            keras.layers.Dense(4),
        ]
    )


def _fit(model, steps, callbacks=(), batch_size=4):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps * batch_size, 8)).astype("float32")
    y = rng.normal(size=(steps * batch_size, 4)).astype("float32")
    model.compile(optimizer="adam", loss="mse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(
            x, y, batch_size=batch_size, epochs=1, verbose=0, callbacks=list(callbacks)
        )
    return [str(w.message) for w in caught if "pruning schedule" in str(w.message)]


@pytest.mark.parametrize(
    "make_callback",
    [pruning.UpdatePruningStep, lambda: pruning.PruningSummaries(tempfile.mkdtemp())],
)
def test_warns_when_the_fit_ends_before_end_step(make_callback):
    # The case: end_step=1000 in a 50-step fit ended at 0% sparsity, silently.
    model = pruning.prune_low_magnitude(
        _model(), pruning.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=1000)
    )
    messages = _fit(model, steps=50, callbacks=[make_callback()])
    # TF-MOT's default frequency=100: the first pruning step is after the fit.
    assert messages == [
        "The pruning schedule has no pruning step within this `fit`: the `fit` "
        "runs 50 steps, to step 50, and the schedule's next pruning step is step "
        "100 (pruning steps are `begin_step + k * frequency`, counting optimizer "
        "updates from 1), so the masks are not updated in this `fit` and the "
        "model ends it unpruned. The schedule reaches its target sparsity 0.8 at "
        "step 1000 (its `end_step`). Use a smaller `frequency` or train for more "
        "steps."
    ]
    assert pruning.sparsity_report(model)["total"] == 0.0  # frequency 100: never pruned
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruning.strip_pruning(model)  # already said once for this fit
    assert not [w for w in caught if "pruning schedule" in str(w.message)]


@pytest.mark.parametrize(
    "make_callback",
    [pruning.UpdatePruningStep, lambda: pruning.PruningSummaries(tempfile.mkdtemp())],
)
def test_no_warning_when_the_schedule_ends_within_the_fit(make_callback):
    model = pruning.prune_low_magnitude(
        _model(),
        pruning.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=40, frequency=10),
    )
    assert _fit(model, steps=50, callbacks=[make_callback()]) == []
    assert pruning.find_pruner(model).step.numpy() == 50
    assert pruning.sparsity_report(model)["total"] == pytest.approx(0.8, abs=0.01)


def test_both_callbacks_warn_once_and_strip_warns_without_callbacks():
    model = pruning.prune_low_magnitude(
        _model(), pruning.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=1000)
    )
    callbacks = [
        pruning.UpdatePruningStep(),
        pruning.PruningSummaries(tempfile.mkdtemp()),
    ]
    assert len(_fit(model, steps=20, callbacks=callbacks)) == 1
    # Without any callback, strip_pruning says it.
    model = pruning.prune_low_magnitude(
        _model(), pruning.ConstantSparsity(0.5, begin_step=0, frequency=100)
    )
    assert _fit(model, steps=20) == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruning.strip_pruning(model)
    messages = [str(w.message) for w in caught if "pruning schedule" in str(w.message)]
    assert messages == [
        "The pruning schedule reaches its target sparsity 0.5 at step 100 (its first "
        "pruning step, from `begin_step` and `frequency`), but at pruning step 20 "
        "no mask was computed yet. Make the schedule reach its target within "
        "the training steps or train for more steps."
    ]


def test_constant_sparsity_with_tfmot_default_frequency_in_a_short_fit():
    # bug_3: the warning said the sparsity "is only 0.5" (the target) while
    # no pruning step (the first is 100) fell in the 6-step fit.
    model = pruning.prune_low_magnitude(_model(), pruning.ConstantSparsity(0.5, 0))
    messages = _fit(model, steps=6, callbacks=[pruning.UpdatePruningStep()])
    assert messages == [
        "The pruning schedule has no pruning step within this `fit`: the `fit` "
        "runs 6 steps, to step 6, and the schedule's next pruning step is step "
        "100 (pruning steps are `begin_step + k * frequency`, counting optimizer "
        "updates from 1), so the masks are not updated in this `fit` and the "
        "model ends it unpruned. The schedule reaches its target sparsity 0.5 at "
        "step 100 (its first pruning step, from `begin_step` and `frequency`). "
        "Use a smaller `frequency` or train for more steps."
    ]
    assert pruning.sparsity_report(model)["total"] == 0.0


def test_a_fit_too_short_names_its_last_pruning_step_and_its_sparsity():
    # Pruning steps 20 and 40 fall in the 50-step fit; the masks end at the
    # schedule's sparsity of step 40, not of step 50.
    schedule = pruning.PolynomialDecay(
        0.0, 0.8, begin_step=0, end_step=100, frequency=20
    )
    model = pruning.prune_low_magnitude(_model(), schedule)
    messages = _fit(model, steps=50, callbacks=[pruning.UpdatePruningStep()])
    at_40 = 0.8 * (1 - (1 - 40 / 100) ** 3)
    assert messages == [
        "The pruning schedule reaches its target sparsity 0.8 at step 100 (its "
        "`end_step`), but this `fit` runs 50 steps, to step 50, whose last pruning "
        f"step, 40, prunes to only {at_40:.4g}. Make the schedule reach its target "
        "by step 50 or train for more steps."
    ]
    assert pruning.sparsity_report(model)["total"] == pytest.approx(at_40, abs=0.01)


def test_update_pruning_step_is_a_no_op_for_the_step_and_masks():
    results = []
    for callbacks in ([], [pruning.UpdatePruningStep()]):
        model = pruning.prune_low_magnitude(
            _model(), pruning.ConstantSparsity(0.5, begin_step=0, frequency=5)
        )
        _fit(model, steps=12, callbacks=callbacks)
        pruner = pruning.find_pruner(model)
        results.append((int(pruner.step.numpy()), [m.numpy() for m in pruner.masks]))
    assert results[0][0] == results[1][0] == 12
    for a, b in zip(results[0][1], results[1][1], strict=True):
        np.testing.assert_array_equal(a, b)
    # On a model that is not pruned (TF-MOT's guide reloads a pruned model
    # and trains on; here it comes back plain) it says so.
    model = _model()
    model.compile(optimizer="adam", loss="mse")
    x = np.ones((8, 8), "float32")
    with pytest.warns(UserWarning, match="'.*' is not pruned, so this training"):
        model.fit(x, x[:, :4], verbose=0, callbacks=[pruning.UpdatePruningStep()])
    assert model.get_weights()[0].all()  # trained dense, nothing else done
    assert pruning.UpdatePruningStep.from_config(
        pruning.UpdatePruningStep().get_config()
    )


def test_tfmot_pruning_guide_runs_with_only_its_import_changed():
    """The TF-MOT guide ("Pruning in Keras example"), small; `tfmot.sparsity.keras` -> `pruning`."""
    rng = np.random.default_rng(0)
    train_images = rng.uniform(size=(1000, 8, 8)).astype("float32")
    train_labels = (train_images.mean(axis=(1, 2)) * 10).astype("int32") % 10
    keras.utils.set_random_seed(0)
    model = tf.keras.Sequential(
        [
            tf.keras.layers.InputLayer(input_shape=(8, 8)),
            tf.keras.layers.Reshape(target_shape=(8, 8, 1)),
            tf.keras.layers.Conv2D(filters=4, kernel_size=(3, 3), activation="relu"),
            tf.keras.layers.MaxPooling2D(pool_size=(2, 2)),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(10),
        ]
    )
    # --- the guide, from "Fine-tune pre-trained model with pruning" ---
    prune_low_magnitude = pruning.prune_low_magnitude
    batch_size = 8  # the guide: 128 on 60,000 MNIST images
    epochs = 2
    validation_split = 0.1
    num_images = train_images.shape[0] * (1 - validation_split)
    end_step = np.ceil(num_images / batch_size).astype(np.int32) * epochs
    pruning_params = {
        "pruning_schedule": pruning.PolynomialDecay(
            initial_sparsity=0.50, final_sparsity=0.80, begin_step=0, end_step=end_step
        )
    }
    model_for_pruning = prune_low_magnitude(model, **pruning_params)
    model_for_pruning.compile(
        optimizer="adam",
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    logdir = tempfile.mkdtemp()
    callbacks = [
        pruning.UpdatePruningStep(),
        pruning.PruningSummaries(log_dir=logdir),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model_for_pruning.fit(
            train_images,
            train_labels,
            batch_size=batch_size,
            epochs=epochs,
            validation_split=validation_split,
            callbacks=callbacks,
            verbose=0,
        )
        model_for_export = pruning.strip_pruning(model_for_pruning)
    # --- end of the guide ---
    assert end_step == 226
    assert not [w for w in caught if "pruning schedule" in str(w.message)]
    # Pruned at steps 100 and 200 (frequency 100); the last at the schedule's 200.
    expected = 0.8 + (0.5 - 0.8) * (1 - 200 / 226) ** 3
    pruner_free = pruning.find_pruner(model_for_export)
    assert pruner_free is None
    report = pruning.sparsity_report(model_for_export)
    kernels = pruning.prunable_weights(model_for_export)
    assert len(kernels) == 2  # the Conv2D and Dense kernels
    for kernel in kernels:
        size = int(np.prod(kernel.shape))
        kept = max(round(size * (1 - expected)), 1)
        assert report[kernel.path] == pytest.approx(1 - kept / size)
    assert report["total"] == pytest.approx(0.8, abs=0.01)


def test_schedule_at_one_after_step_one_is_rejected_when_pruning():
    # The audit's schedule: 1.0 after step 1 passed the old probe (steps 0, 1)
    # and pruned 96% of the model. Now a spread of steps is probed.
    schedule = lambda step: (True, ops.where(step > 1, 1.0, 0.5))  # noqa: E731
    with pytest.raises(ValueError) as info:
        pruning.prune_low_magnitude(_model(), schedule)
    assert str(info.value).startswith(
        "Invalid value for argument `pruning_schedule`. Expected a sparsity in "
        "[0, 1) at every step."
    )
    assert str(info.value).endswith("giving sparsity=1.0 at step=2")


def test_sparsity_out_of_range_in_training_is_refused_and_reported():
    # Bad only at step 21, which the eager probe does not visit.
    schedule = lambda step: (True, ops.where(ops.equal(step, 21), 1.0, 0.5))  # noqa: E731
    model = pruning.prune_low_magnitude(_model(), schedule)
    _fit(model, steps=25)
    assert pruning.sparsity_report(model)["total"] == pytest.approx(0.5, abs=0.02)
    pruner = pruning.find_pruner(model)
    with pytest.raises(
        ValueError,
        match=r"giving sparsity=1.0 at step=21 \(refused: the masks were left unchanged",
    ):
        pruner.check_schedule_output()
    model2 = pruning.prune_low_magnitude(_model(), schedule)
    with pytest.raises(
        ValueError, match=r"Invalid value for argument `pruning_schedule`.*at step=21"
    ):
        _fit(model2, steps=25, callbacks=[pruning.UpdatePruningStep()])
    with pytest.raises(ValueError, match=r"at step=21"):
        pruning.strip_pruning(model)


def test_a_target_missed_between_pruning_steps_names_frequency():
    # end_step=30 with frequency=20: the last pruning step is 20, so training
    # longer never reaches the target (TF-MOT's schedules, the same).
    model = pruning.prune_low_magnitude(
        _model(),
        pruning.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=30, frequency=20),
    )
    messages = _fit(model, steps=40, callbacks=[pruning.UpdatePruningStep()])
    expected = 0.8 * (1 - (1 - 20 / 30) ** 3)
    assert len(messages) == 1
    assert (
        f"Its last pruning step is 20, where its sparsity is {expected:.4g}"
        in (messages[0])
    )
    assert "make `end_step - begin_step` a multiple of `frequency`" in messages[0]
    assert "train for more steps" not in messages[0]
