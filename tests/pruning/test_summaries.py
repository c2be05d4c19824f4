import glob

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_stability import pruning
from keras_stability.pruning import PruningSummaries


def _read_scalars(log_dir):
    found = {}
    for path in glob.glob(f"{log_dir}/events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                found.setdefault(value.tag, []).append(
                    (event.step, float(tf.make_ndarray(value.tensor)))
                )
    return found


def _pruned_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(10, activation="relu"),
            keras.layers.Dense(4),
        ]
    )
    schedule = pruning.PolynomialDecay(0.0, 0.6, begin_step=0, end_step=4, frequency=2)
    pruning.prune_low_magnitude(model, schedule)
    model.compile("adam", "mse")
    return model


def test_writes_sparsity_per_weight_at_the_pruning_step(tmp_path):
    model = _pruned_model()
    x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
    y = np.zeros((32, 4), "float32")
    log_dir = str(tmp_path / "logs")
    callback = PruningSummaries(log_dir)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[callback])
    scalars = _read_scalars(log_dir)
    report = pruning.sparsity_report(model)
    kernels = [k for k in report if k != "total"]
    assert set(scalars) == {
        "pruning/target_sparsity",
        "pruning/total_sparsity",
        *(f"pruning/{k}/sparsity" for k in kernels),
    }
    # Two epochs of 4 steps: written at steps 4 and 8.
    assert [s for s, _ in scalars["pruning/total_sparsity"]] == [4, 8]
    assert scalars["pruning/target_sparsity"][-1][1] == pytest.approx(0.6)
    for k in kernels:
        assert scalars[f"pruning/{k}/sparsity"][-1][1] == pytest.approx(report[k])
    assert scalars["pruning/total_sparsity"][-1][1] == pytest.approx(report["total"])


def test_batch_frequency_config_and_errors(tmp_path):
    model = _pruned_model()
    x = np.zeros((32, 8), "float32")
    callback = PruningSummaries(str(tmp_path / "b"), update_freq=3)
    model.fit(
        x, np.zeros((32, 4)), batch_size=8, epochs=2, verbose=0, callbacks=[callback]
    )
    steps = [s for s, _ in _read_scalars(str(tmp_path / "b"))["pruning/total_sparsity"]]
    assert steps == [3, 6]
    config = callback.get_config()
    assert config == {"log_dir": str(tmp_path / "b"), "update_freq": 3}
    assert PruningSummaries.from_config(config).get_config() == config
    with pytest.raises(ValueError, match="Received: update_freq=0"):
        PruningSummaries("logs", update_freq=0)
    with pytest.raises(ValueError, match="Received: log_dir=''"):
        PruningSummaries("")
    plain = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    plain.compile("adam", "mse")
    with pytest.raises(ValueError, match="Expected a model pruned with"):
        plain.fit(
            x, np.zeros((32, 4)), verbose=0, callbacks=[PruningSummaries(str(tmp_path))]
        )


def test_a_log_dir_that_cannot_be_created_is_named_at_fit_start(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    model = _pruned_model()
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `log_dir`. Expected a directory that can be created",
    ):
        model.fit(
            np.zeros((8, 8), "float32"),
            np.zeros((8, 4)),
            verbose=0,
            callbacks=[PruningSummaries(str(blocker / "logs"))],
        )
    assert PruningSummaries(tmp_path / "logs").log_dir == str(
        tmp_path / "logs"
    )  # PathLike


def test_the_tfmot_guide_custom_training_loop_runs_and_writes(tmp_path):
    """TF-MOT's comprehensive guide, "Custom training loop", import changed only.

    It calls `UpdatePruningStep.on_epoch_end(batch=...)` (TF-MOT's argument
    name) and only `on_epoch_begin` of `PruningSummaries`.
    """
    keras.utils.set_random_seed(0)
    model_for_pruning = pruning.prune_low_magnitude(
        keras.Sequential([keras.Input((20,)), keras.layers.Dense(20)]),
        pruning.ConstantSparsity(0.5, begin_step=0, frequency=1),
    )
    x_train = np.random.default_rng(0).normal(size=(4, 20)).astype("float32")
    y_train = keras.utils.to_categorical(np.arange(4), num_classes=20)
    loss = keras.losses.categorical_crossentropy
    optimizer = keras.optimizers.Adam()
    log_dir = str(tmp_path)
    unused_arg = -1
    epochs, batches = 2, 2
    # --- the guide ---
    step_callback = pruning.UpdatePruningStep()
    step_callback.set_model(model_for_pruning)
    log_callback = pruning.PruningSummaries(log_dir=log_dir)
    log_callback.set_model(model_for_pruning)
    step_callback.on_train_begin()
    for _ in range(epochs):
        log_callback.on_epoch_begin(epoch=unused_arg)
        for _ in range(batches):
            step_callback.on_train_batch_begin(batch=unused_arg)
            with tf.GradientTape() as tape:
                logits = model_for_pruning(x_train, training=True)
                loss_value = loss(y_train, logits)
                grads = tape.gradient(loss_value, model_for_pruning.trainable_variables)
                optimizer.apply_gradients(
                    zip(grads, model_for_pruning.trainable_variables, strict=True)
                )
        step_callback.on_epoch_end(batch=unused_arg)
    # --- end of the guide ---
    assert int(pruning.find_pruner(model_for_pruning).step.numpy()) == 4
    assert pruning.sparsity_report(model_for_pruning)["total"] == 0.5
    scalars = _read_scalars(log_dir)
    # Written at the start of each epoch: before any step, then after two.
    assert scalars["pruning/total_sparsity"] == [(0, 0.0), (2, 0.5)]


def test_layers_pruned_separately_are_all_logged_and_checked(tmp_path):
    # TF-MOT's comprehensive guide: prune some layers, each on its own, with
    # `clone_model(..., clone_function=...)`: one pruner per layer.
    keras.utils.set_random_seed(0)
    base_model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(10, activation="relu"),
            keras.layers.Dense(4),
        ]
    )
    schedules = iter(
        [
            pruning.ConstantSparsity(0.5, begin_step=0, frequency=1),
            pruning.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=50, frequency=1),
        ]
    )

    def apply_pruning_to_dense(layer):
        if isinstance(layer, keras.layers.Dense):
            return pruning.prune_low_magnitude(layer, next(schedules))
        return layer

    model = keras.models.clone_model(base_model, clone_function=apply_pruning_to_dense)
    first, second = pruning.find_pruners(model)
    model.compile("adam", "mse")
    x = np.random.default_rng(0).normal(size=(8, 8)).astype("float32")
    callbacks = [pruning.UpdatePruningStep(), PruningSummaries(str(tmp_path))]
    with pytest.warns(UserWarning) as caught:
        model.fit(x, x[:, :4], batch_size=4, epochs=1, verbose=0, callbacks=callbacks)
    # The second layer's schedule cannot finish in this 2-step fit: said once.
    messages = [str(w.message) for w in caught if "pruning schedule" in str(w.message)]
    assert len(messages) == 1 and "at step 50" in messages[0]
    scalars = _read_scalars(str(tmp_path))
    paths = [first.variables[0].path, second.variables[0].path]
    assert scalars[f"pruning/{paths[0]}/sparsity"] == [(2, 0.5)]
    assert scalars[f"pruning/{paths[0]}/target_sparsity"] == [(2, 0.5)]
    expected = pytest.approx(0.8 + (0.0 - 0.8) * (1 - 2 / 50) ** 3, abs=1e-6)
    assert scalars[f"pruning/{paths[1]}/target_sparsity"] == [(2, expected)]
    assert f"pruning/{paths[1]}/sparsity" in scalars
    assert "pruning/target_sparsity" not in scalars
