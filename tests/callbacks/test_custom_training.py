"""Custom training code from the keras.io guide "Customizing what happens in
`fit()`": a GAN with its own `d_optimizer` / `g_optimizer` (overriding
`compile`) and a lower-level `train_step` with its own `Mean` loss tracker.

The patterns are copied from the guide, with tiny models and a few steps.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_stability import clipping
from keras_stability.callbacks import AdaptiveClipping
from keras_stability.callbacks import GradientMonitor
from keras_stability.optimizers import GuardedOptimizer
from keras_stability.optimizers import ensure_guarded
from keras_stability.optimizers.attach import find_guard

LATENT_DIM = 4


class GAN(keras.Model):
    """The guide's GAN (`compile(d_optimizer, g_optimizer, loss_fn)`)."""

    def __init__(self, discriminator, generator, latent_dim):
        super().__init__()
        self.discriminator = discriminator
        self.generator = generator
        self.latent_dim = latent_dim
        self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
        self.g_loss_tracker = keras.metrics.Mean(name="g_loss")
        self.seed_generator = keras.random.SeedGenerator(1337)

    @property
    def metrics(self):
        return [self.d_loss_tracker, self.g_loss_tracker]

    def compile(self, d_optimizer, g_optimizer, loss_fn):
        super().compile()
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer
        self.loss_fn = loss_fn

    def train_step(self, real_images):
        if isinstance(real_images, tuple):
            real_images = real_images[0]
        batch_size = tf.shape(real_images)[0]
        random_latent_vectors = keras.random.normal(
            shape=(batch_size, self.latent_dim), seed=self.seed_generator
        )
        generated_images = self.generator(random_latent_vectors)
        combined_images = tf.concat([generated_images, real_images], axis=0)
        labels = tf.concat(
            [tf.ones((batch_size, 1)), tf.zeros((batch_size, 1))], axis=0
        )
        labels += 0.05 * keras.random.uniform(
            tf.shape(labels), seed=self.seed_generator
        )
        with tf.GradientTape() as tape:
            predictions = self.discriminator(combined_images)
            d_loss = self.loss_fn(labels, predictions)
        grads = tape.gradient(d_loss, self.discriminator.trainable_weights)
        self.d_optimizer.apply_gradients(
            zip(grads, self.discriminator.trainable_weights)  # noqa: B905 (as the guide)
        )
        random_latent_vectors = keras.random.normal(
            shape=(batch_size, self.latent_dim), seed=self.seed_generator
        )
        misleading_labels = tf.zeros((batch_size, 1))
        with tf.GradientTape() as tape:
            predictions = self.discriminator(self.generator(random_latent_vectors))
            g_loss = self.loss_fn(misleading_labels, predictions)
        grads = tape.gradient(g_loss, self.generator.trainable_weights)
        self.g_optimizer.apply_gradients(zip(grads, self.generator.trainable_weights))  # noqa: B905
        self.d_loss_tracker.update_state(d_loss)
        self.g_loss_tracker.update_state(g_loss)
        return {
            "d_loss": self.d_loss_tracker.result(),
            "g_loss": self.g_loss_tracker.result(),
        }


def _gan():
    keras.utils.set_random_seed(0)
    discriminator = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(4, activation="relu"),
            keras.layers.Dense(1),
        ],
        name="discriminator",
    )
    generator = keras.Sequential(
        [keras.Input((LATENT_DIM,)), keras.layers.Dense(6)], name="generator"
    )
    gan = GAN(discriminator, generator, LATENT_DIM)
    gan.compile(
        d_optimizer=keras.optimizers.Adam(1e-3),
        g_optimizer=keras.optimizers.Adam(1e-3),
        loss_fn=keras.losses.BinaryCrossentropy(from_logits=True),
    )
    data = np.random.default_rng(0).normal(size=(32, 6)).astype("float32")
    return gan, data


class CustomModel(keras.Model):
    """The guide's "Going lower-level" model: own loss, own `Mean` tracker."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.mae_metric = keras.metrics.MeanAbsoluteError(name="mae")
        self.loss_fn = keras.losses.MeanSquaredError()

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.loss_fn(y, y_pred)
        trainable_vars = self.trainable_variables
        gradients = tape.gradient(loss, trainable_vars)
        self.optimizer.apply(gradients, trainable_vars)
        self.loss_tracker.update_state(loss)
        self.mae_metric.update_state(y, y_pred)
        return {"loss": self.loss_tracker.result(), "mae": self.mae_metric.result()}

    @property
    def metrics(self):
        return [self.loss_tracker, self.mae_metric]


class ApplyGradientsModel(CustomModel):
    """The same with `self.optimizer.apply_gradients(zip(...))`."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.loss_fn(y, y_pred)
        gradients = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))  # noqa: B905
        self.loss_tracker.update_state(loss)
        self.mae_metric.update_state(y, y_pred)
        return {"loss": self.loss_tracker.result(), "mae": self.mae_metric.result()}


def _regression(cls, optimizer=None):
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape=(5,))
    hidden = keras.layers.Dense(8, activation="tanh", name="hidden")(inputs)
    outputs = keras.layers.Dense(1, name="out")(hidden)
    model = cls(inputs, outputs)
    model.compile(optimizer=optimizer or keras.optimizers.Adam(1e-2))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 5)).astype("float32")
    y = (x @ rng.normal(size=(5, 1))).astype("float32")
    return model, x, y


# --- several optimizers (GAN) ------------------------------------------------


def test_gan_without_optimizer_argument_fails_clearly_at_train_begin():
    # Before: AdaptiveClipping raised AttributeError 'grad_norm' and
    # GradientMonitor recorded nothing, silently.
    for callback in (AdaptiveClipping(1.0), GradientMonitor()):
        gan, data = _gan()
        with pytest.raises(ValueError) as info:
            gan.fit(data, batch_size=8, epochs=1, verbose=0, callbacks=[callback])
        message = str(info.value)
        assert "overrides `train_step`" in message
        assert "`d_optimizer`, `g_optimizer`" in message
        assert "optimizer='d_optimizer'" in message
        assert not isinstance(gan.d_optimizer, GuardedOptimizer)


def test_gan_adaptive_clipping_guards_the_named_optimizers():
    gan, data = _gan()
    d_clip = AdaptiveClipping(clipping.GlobalNorm(1e-3), optimizer="d_optimizer")
    g_clip = AdaptiveClipping(None, optimizer=gan.g_optimizer, log_statistics=False)
    history = gan.fit(
        data, batch_size=8, epochs=2, verbose=0, callbacks=[d_clip, g_clip]
    )
    assert isinstance(gan.d_optimizer, GuardedOptimizer)
    assert isinstance(gan.g_optimizer, GuardedOptimizer)
    assert d_clip.guard is gan.d_optimizer and g_clip.guard is gan.g_optimizer
    # 4 steps per epoch; the tiny threshold clips every discriminator step.
    assert int(gan.d_optimizer.step) == 8 and int(gan.g_optimizer.step) == 8
    assert int(gan.d_optimizer.steps_clipped) == 8
    assert int(gan.g_optimizer.steps_clipped) == 0
    # Each optimizer's values under its own keys (one callback per
    # optimizer): the discriminator's guard logs, the generator's does not.
    assert history.history["d_optimizer/steps_clipped"] == [4.0, 8.0]
    assert all(np.isfinite(history.history["d_optimizer/grad_norm"]))
    assert not any(key.startswith("g_optimizer/") for key in history.history)
    assert "grad_norm" not in history.history
    assert find_guard(gan, "d_optimizer") is gan.d_optimizer
    # The compiled (unused) optimizer was left alone.
    assert not isinstance(gan.optimizer, GuardedOptimizer)


def test_gan_gradient_monitor_records_the_named_optimizer_layers():
    gan, data = _gan()
    monitor = GradientMonitor(optimizer="d_optimizer", read_freq=1)
    gan.fit(data, batch_size=8, epochs=1, verbose=0, callbacks=[monitor])
    assert monitor.history["step"] == [1, 2, 3, 4]
    # The model's top-level layers the optimizer updates: the discriminator,
    # not the generator (the g_optimizer's).
    assert monitor.layer_names == ["discriminator"]
    assert len(monitor.history["grad_norm"]["discriminator"]) == 4
    assert all(np.isfinite(monitor.history["global_norm"]))
    assert monitor.history["global_norm"][0] > 0


def test_optimizer_argument_is_validated():
    for cls in (AdaptiveClipping, GradientMonitor):
        kwargs = {"clipping": None} if cls is AdaptiveClipping else {}
        for bad in (3, "", "not an identifier", ["d_optimizer"]):
            with pytest.raises(
                ValueError, match="Invalid value for argument `optimizer`"
            ):
                cls(optimizer=bad, **kwargs)
    gan, _ = _gan()
    with pytest.raises(
        ValueError, match="found: `optimizer`, `d_optimizer`, `g_optimizer`"
    ):
        ensure_guarded(gan, optimizer="e_optimizer")
    with pytest.raises(ValueError, match="an optimizer held by model"):
        ensure_guarded(gan, optimizer=keras.optimizers.SGD())


def test_uncompiled_optimizer_attribute_fails_clearly():
    # `model.optimizer` None, the optimizer kept elsewhere: name it.
    model, x, y = _regression(CustomModel)
    model.my_optimizer = keras.optimizers.SGD(0.1)
    model.optimizer = None
    with pytest.raises(
        ValueError, match="`model.optimizer` is None.*optimizer='my_optimizer'"
    ):
        model.fit(x, y, verbose=0, callbacks=[AdaptiveClipping(1.0)])


# --- a lower-level train_step (own Mean loss tracker, no compiled loss) ------


def _batch_losses(model, x, y, batch=8):
    pred = model.predict(x, verbose=0)
    return [
        float(np.mean((pred[i : i + batch] - y[i : i + batch]) ** 2))
        for i in range(0, len(x), batch)
    ]


@pytest.mark.parametrize("cls", [CustomModel, ApplyGradientsModel])
def test_lower_level_train_step_monitor_and_clipping_work(cls):
    # Before: the raw loss came from Keras' unused `_loss_tracker`: NaN every
    # step. SGD(0) keeps the weights, so each raw loss is the batch's loss.
    model, x, y = _regression(cls, keras.optimizers.SGD(0.0))
    expected = _batch_losses(model, x, y)
    monitor = GradientMonitor(read_freq=1)
    clip = AdaptiveClipping(clipping.GlobalNorm(1e-4))
    history = model.fit(
        x,
        y,
        batch_size=8,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[clip, monitor],
    )
    np.testing.assert_allclose(monitor.raw_losses, expected, rtol=1e-4)
    np.testing.assert_allclose(monitor.history["raw_loss"], expected, rtol=1e-4)
    assert monitor.history["step"] == list(range(1, 9))
    assert sorted(monitor.layer_names) == ["hidden", "out"]
    assert int(clip.guard.steps_clipped) == 8  # every step above 1e-4
    assert history.history["steps_clipped"] == [8.0]
    assert history.history["grad_norm"][0] > 1e-4
    # The guard saw no loss (scale_loss is not called in this train_step).
    assert int(clip.guard.loss_seen) == 0
    # The model's own `loss` is logged as it computes it.
    assert history.history["loss"][0] == pytest.approx(np.mean(expected), rel=1e-4)


def test_lower_level_train_step_calling_scale_loss_gives_the_guard_loss():
    # A train_step that calls `self.optimizer.scale_loss(loss)` as Keras' own
    # does: the raw loss is the guard's, with no loss tracker.
    class ScaledModel(CustomModel):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.loss_fn(y, y_pred)
                scaled = self.optimizer.scale_loss(loss)
            gradients = tape.gradient(scaled, self.trainable_variables)
            self.optimizer.apply(gradients, self.trainable_variables)
            return {"mae": self.mae_metric.result()}  # no loss logged

    model, x, y = _regression(ScaledModel, keras.optimizers.SGD(0.0))
    expected = _batch_losses(model, x, y)
    monitor = GradientMonitor(read_freq=1)
    model.fit(
        x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[monitor]
    )
    np.testing.assert_allclose(monitor.raw_losses, expected, rtol=1e-4)
    assert model.optimizer.loss_seen.numpy() == 1


def test_no_loss_anywhere_warns_once_and_keeps_the_gradient_norms():
    class SilentModel(CustomModel):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.loss_fn(y, y_pred)
            gradients = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply(gradients, self.trainable_variables)
            self.mae_metric.update_state(y, y_pred)
            return {"mae": self.mae_metric.result()}  # no loss

    model, x, y = _regression(SilentModel)
    monitor = GradientMonitor(read_freq=1)
    with pytest.warns(UserWarning, match="gives no per-step loss") as record:
        model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[monitor])
    assert sum("no per-step loss" in str(w.message) for w in record) == 1
    assert np.isnan(monitor.raw_losses).all()
    assert len(monitor.history["global_norm"]) == 16
    assert np.all(np.asarray(monitor.history["global_norm"]) > 0)


def test_gan_one_callback_per_optimizer_logs_each_under_its_own_keys():
    # Before, `AdaptiveClipping(optimizer="d_optimizer")` and
    # `GradientMonitor(optimizer="g_optimizer")` both logged `grad_norm`:
    # the history held the generator's norm next to the discriminator's
    # clipping threshold, and the discriminator's norm nowhere.
    gan, data = _gan()
    history = gan.fit(
        data,
        batch_size=8,
        epochs=2,
        verbose=0,
        callbacks=[
            AdaptiveClipping(clipping.GlobalNorm(10.0), optimizer="d_optimizer"),
            GradientMonitor(optimizer="g_optimizer"),
        ],
    )
    logged = history.history
    assert logged["d_optimizer/grad_norm"][-1] == pytest.approx(
        float(gan.d_optimizer.grad_norm)
    )
    assert logged["d_optimizer/clip_threshold"] == [10.0, 10.0]
    assert logged["g_optimizer/grad_norm"][-1] == pytest.approx(
        float(gan.g_optimizer.grad_norm)
    )
    assert "g_optimizer/min_layer_grad_ratio" in logged
    assert not {"grad_norm", "clip_threshold", "steps_clipped"} & set(logged)


def test_gan_prefixed_counts_print_as_integers(capsys):
    import re

    from keras_stability.callbacks import GradientExplosionDetector

    gan, data = _gan()
    gan.fit(
        data,
        batch_size=8,
        epochs=1,
        verbose=1,
        callbacks=[
            # Listed first: it prints before our callbacks see the logs.
            keras.callbacks.ProgbarLogger(),
            AdaptiveClipping(clipping.GlobalNorm(1e-3), optimizer="d_optimizer"),
            GradientExplosionDetector(optimizer="g_optimizer"),
        ],
    )
    final = capsys.readouterr().out.replace("\r", "\n").splitlines()[-1]
    assert re.search(r" - d_optimizer/steps_clipped: 4( |$)", final), final
    assert re.search(r" - g_optimizer/rollbacks: 0( |$)", final), final
    assert re.search(r" - g_optimizer/skipped_batches: 0( |$)", final), final
    assert re.search(r" - d_optimizer/grad_norm: \d+\.\d{4}", final), final
