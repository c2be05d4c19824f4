"""The gradient-health callbacks at their defaults on patterns users write
with Keras' own parts (optimizer options, Keras callbacks, fit arguments).

A healthy run with the callbacks must end where plain `fit` ends, bit for bit.
"""

import re
import warnings

import keras
import numpy as np
import pytest

from keras_stability.callbacks import AdaptiveClipping
from keras_stability.callbacks import GradientExplosionDetector
from keras_stability.callbacks import GradientMonitor
from keras_stability.clipping import GlobalNorm


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 10)).astype("float32")
    y = (x[:, :3].sum(1) > 0).astype("int32") + (x[:, 3] > 0).astype("int32")
    return x, y


def _model(optimizer):
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(3),
        ]
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _fit(model, callbacks, epochs=2, **kwargs):
    x, y = _data()
    return model.fit(
        x,
        y,
        batch_size=16,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
        **kwargs,
    )


@pytest.mark.parametrize(
    "clip", [{"global_clipnorm": 0.05}, {"clipnorm": 0.05}, {"clipvalue": 0.01}]
)
def test_monitor_and_detector_keep_the_optimizers_own_clipping(clip):
    # Adam(global_clipnorm=1.0) is the usual transformer recipe: adding the
    # monitoring callbacks must not refuse it, nor change what it does.
    plain = _model(keras.optimizers.Adam(1e-2, **clip))
    _fit(plain, [])
    model = _model(keras.optimizers.Adam(1e-2, **clip))
    monitor = GradientMonitor()
    history = _fit(model, [monitor, GradientExplosionDetector()])
    assert model.optimizer.clipping is None
    for ours, theirs in zip(model.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    # The logged norm is the pre-clip one, well above what the optimizer clips to.
    assert min(history.history["grad_norm"]) > 0.1


def test_adaptive_clipping_after_the_monitor_refuses_an_optimizer_that_clips():
    model = _model(keras.optimizers.Adam(1e-2, global_clipnorm=1.0))
    with pytest.raises(
        ValueError,
        match=r"Invalid value for argument `clipping`. Expected no clipping policy "
        r"for this GuardedOptimizer: its inner optimizer clips by itself "
        r"\(global_clipnorm=1.0\)",
    ):
        _fit(model, [GradientMonitor(), AdaptiveClipping(GlobalNorm(1.0))])


def _exploding_fit(callbacks):
    from keras_stability.datasets import load_dataset

    (x, y), _ = load_dataset("synthetic")
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(20.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    detector = GradientExplosionDetector()
    rates = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: rates.append(
            float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
        )
    )
    model.fit(
        x,
        y,
        batch_size=32,
        epochs=3,
        verbose=0,
        callbacks=[*callbacks, detector, record],
    )
    return model, detector, rates


def test_learning_rate_scheduler_does_not_undo_the_detectors_lowering():
    # LearningRateScheduler(lambda epoch: ...) sets its rate at each epoch
    # start: without the detector's lowering kept on it, SGD(20) exploded
    # again every epoch, used up max_rollbacks and stopped on step 0's weights.
    alone, alone_detector, alone_rates = _exploding_fit([])
    assert alone_detector.rollbacks == 1 and alone_rates[0] < 1.0
    scheduler = keras.callbacks.LearningRateScheduler(lambda epoch: 20.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, detector, rates = _exploding_fit([scheduler])
    assert detector.rollbacks == 1 and not model.stop_training
    assert rates == alone_rates
    for ours, theirs in zip(model.get_weights(), alone.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    messages = [str(w.message) for w in caught if "another callback" in str(w.message)]
    assert messages == [
        "GradientExplosionDetector: another callback set the learning rate to 20 "
        "(a LearningRateScheduler?), above the rate the detector had lowered it "
        "to; the detector's lowering (x0.0215) is applied to it: 0.4309."
    ]


def test_lowered_rate_reapplies_the_scale_to_a_rate_raised_from_outside():
    from keras_stability.callbacks.lr_scaling import LoweredRate

    rate = LoweredRate(1.0)
    assert rate.seen(1.0) is None and rate.scale == 1.0
    assert rate.seen(2.0) is None and rate.base == 2.0  # not lowered: taken as is
    rate.wrote(0.2)  # the detector lowered it 10x
    assert rate.scale == pytest.approx(0.1)
    assert rate.seen(0.2) is None
    assert rate.seen(3.0) == pytest.approx(0.3)  # a scheduler set 3.0: kept 10x lower
    assert rate.base == 3.0
    # Lowered from outside (ReduceLROnPlateau halves what it reads): taken as
    # already lowered, and the scale stays for a later raise.
    assert rate.seen(0.15) is None and rate.scale == pytest.approx(0.1)
    assert rate.seen(1.0) == pytest.approx(0.1)


class _Crash(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("with_clipping", [False, True])
def test_keras_backup_listed_first_resumes_with_the_guards_optimizer_state(
    tmp_path, with_clipping
):
    # The Keras docs' `callbacks=[BackupAndRestore(...)]` with ours appended:
    # the backup restores in its on_train_begin, before ours wrap the
    # optimizer, and Keras skipped the saved guard's optimizer state (Adam's
    # moments and iterations) with a warning: the resumed run restarted Adam.
    # With AdaptiveClipping after the monitor, the guard gets its policy (and
    # the saved layout) only at the second callback.
    from keras_stability.clipping import ZClip

    def callbacks(folder, extra=()):
        ours = [GradientMonitor(), GradientExplosionDetector()]
        if with_clipping:
            ours.append(AdaptiveClipping(ZClip(warmup_steps=3)))
        return [keras.callbacks.BackupAndRestore(str(folder)), *ours, *extra]

    reference = _model(keras.optimizers.Adam(1e-2))
    _fit(reference, callbacks(tmp_path / "reference"), epochs=4)

    crashed = _model(keras.optimizers.Adam(1e-2))
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(crashed, callbacks(tmp_path / "backup", [_Crash()]), epochs=4)
    resumed = _model(keras.optimizers.Adam(1e-2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras' "Skipping variable loading"
        _fit(resumed, callbacks(tmp_path / "backup"), epochs=4)

    assert int(resumed.optimizer.iterations) == int(reference.optimizer.iterations)
    for ours, theirs in zip(
        resumed.get_weights(), reference.get_weights(), strict=True
    ):
        np.testing.assert_array_equal(ours, theirs)

    # In the saved layout: a part added to the built guard of the resumed
    # run (the detector's spike skipping, then the clipping policy) is
    # created in another order than at the reference's build, and listed in
    # build's order (`GuardedOptimizer._own_core_variables`).
    def layout(optimizer):
        return optimizer._own_core_variables() + optimizer.inner_optimizer.variables

    for ours, theirs in zip(
        layout(resumed.optimizer), layout(reference.optimizer), strict=True
    ):
        assert re.sub(r"_\d+", "", ours.name) == re.sub(r"_\d+", "", theirs.name)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def _loss_scaled_example_fit(callbacks=(), guard=False):
    """The Keras example (Dense 128/64/10 on 10 features) with Adam's own
    static loss scaling (`loss_scale_factor=128`), two epochs in order.

    Returns the model, its history, the data and the weights before the last
    batch."""
    from keras_stability.models import build_example_model
    from keras_stability.models import compile_example_model
    from keras_stability.optimizers import GuardedOptimizer

    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 10)).astype("float32")
    y = rng.integers(0, 10, 96)
    keras.utils.set_random_seed(1)
    optimizer = keras.optimizers.Adam(learning_rate=1e-3, loss_scale_factor=128.0)
    if guard:
        optimizer = GuardedOptimizer(optimizer)
    model = compile_example_model(build_example_model(10, 10), optimizer)
    before_last = []
    keep = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: before_last.append(model.get_weights())
    )
    history = model.fit(
        x,
        y,
        batch_size=32,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[*callbacks, keep],
    )
    return model, history, (x, y), before_last[-1]


@pytest.mark.parametrize(
    "make",
    [
        lambda: [GradientMonitor()],
        lambda: [GradientExplosionDetector()],
        lambda: [AdaptiveClipping(GlobalNorm(1e6))],
        None,  # GuardedOptimizer(Adam(loss_scale_factor=...)) directly
    ],
    ids=["monitor", "detector", "adaptive_clipping", "guard"],
)
def test_optimizers_loss_scale_factor_trains_as_plain_fit(make):
    # Keras' static loss scaling: `scale_loss` multiplies the loss by the
    # factor and the optimizer's `apply` divides the gradients by it. Before,
    # the guard refused such an optimizer ("Expected an optimizer without
    # `loss_scale_factor`"); now it unscales first, so it measures (and the
    # callbacks report) the true gradient norm and loss, and trains as plain
    # fit does with the same optimizer.
    plain, plain_history, (x, y), before_last = _loss_scaled_example_fit()
    model, history, _, _ = _loss_scaled_example_fit(
        [] if make is None else make(), guard=make is None
    )
    for w, wp in zip(model.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_array_equal(w, wp)
    np.testing.assert_allclose(history.history["loss"], plain_history.history["loss"])
    # The last step's gradient norm and loss, as the guard measured them: the
    # unscaled ones, at the weights before the last batch.
    import tensorflow as tf

    guard = model.optimizer
    assert guard.inner_optimizer.loss_scale_factor == 128.0
    plain.set_weights(before_last)
    with tf.GradientTape() as tape:
        loss = plain.loss(y[-32:], plain(x[-32:]))
    grads = tape.gradient(loss, plain.trainable_variables)
    norm = float(tf.linalg.global_norm(grads))
    np.testing.assert_allclose(float(guard.grad_norm), norm, rtol=1e-5)
    np.testing.assert_allclose(float(guard.step_loss), float(loss), rtol=1e-5)
