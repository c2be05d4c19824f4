"""A step the guard skips leaves Keras' epoch loss exactly once.

Whichever of `AdaptiveClipping`, `GradientMonitor` and
`GradientExplosionDetector` are in the `fit`, in whatever order, History's
`loss` is the mean over the applied steps: finite, and neither the skipped
step's loss nor a healthy one's taken out twice. Also: the counters print
as integers in a `keras.callbacks.ProgbarLogger` listed before them.
"""

import contextlib
import io
import itertools
import re

import keras
import numpy as np
import pytest

from keras_stability.callbacks import AdaptiveClipping
from keras_stability.callbacks import GradientExplosionDetector
from keras_stability.callbacks import GradientMonitor
from keras_stability.clipping import ZClip

BATCH = 16
BAD = 2  # the batch with a NaN input: NaN loss and gradients, skipped


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10 * BATCH, 10)).astype("float32")
    y = np.argmax(x @ rng.normal(size=(10, 5)), axis=1).astype("int32")
    x_nan = x.copy()
    x_nan[BAD * BATCH + 1] = np.nan
    good = np.ones(len(x), bool)
    good[BAD * BATCH : (BAD + 1) * BATCH] = False
    return x, x_nan, y, good


def _model(learning_rate, **compile_kwargs):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dense(5),
        ]
    )
    model.compile(
        keras.optimizers.SGD(learning_rate),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **compile_kwargs,
    )
    return model


def _fit(model, x, y, callbacks=()):
    return model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=list(callbacks),
    ).history


_MAKE = {
    "clipping": lambda: AdaptiveClipping(None),
    "monitor": lambda: GradientMonitor(),
    "detector": lambda: GradientExplosionDetector(),
}
_ORDERS = [
    order
    for n in (1, 2, 3)
    for order in itertools.permutations(("clipping", "monitor", "detector"), n)
]


@pytest.fixture(scope="module")
def plain_loss():
    """Plain `fit` on the same data without the NaN batch (SGD: a skipped
    step leaves the weights exactly as if the batch were not there)."""
    _, _, _, good = _data()
    x, _, y, _ = _data()
    return _fit(_model(0.05), x[good], y[good])["loss"]


@pytest.mark.parametrize("order", _ORDERS, ids="-".join)
def test_epoch_loss_is_the_mean_of_the_applied_steps(order, plain_loss):
    # Before: NaN with the monitor alone and with clipping before the
    # detector; the last batch dropped too with clipping, monitor, detector.
    _, x_nan, y, _ = _data()
    model = _model(0.05)
    history = _fit(model, x_nan, y, [_MAKE[name]() for name in order])
    guard = model.optimizer
    assert int(guard.steps_skipped_nonfinite.numpy()) == 2  # one per epoch
    assert int(guard.steps_skipped_requested.numpy()) == 0
    assert np.all(np.isfinite(history["loss"]))
    np.testing.assert_allclose(history["loss"], plain_loss, rtol=1e-6)


@pytest.mark.parametrize(
    "compile_kwargs", [{"steps_per_execution": 2}, {"jit_compile": True}], ids=str
)
@pytest.mark.parametrize(
    "order",
    [
        ("detector",),
        ("monitor",),
        ("clipping", "detector"),
        ("clipping", "monitor", "detector"),
    ],
    ids="-".join,
)
def test_epoch_loss_with_several_steps_per_call_and_under_xla(
    order, compile_kwargs, plain_loss
):
    # With two steps per call the detector used to take the whole call out
    # (the applied step with the skipped one).
    _, x_nan, y, _ = _data()
    model = _model(0.05, **compile_kwargs)
    history = _fit(model, x_nan, y, [_MAKE[name]() for name in order])
    assert int(model.optimizer.steps_skipped_nonfinite.numpy()) == 2
    np.testing.assert_allclose(history["loss"], plain_loss, rtol=1e-5)


def _batch_losses(model, x, y):
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return [
        float(loss(y[i : i + BATCH], model(x[i : i + BATCH])))
        for i in range(0, len(x), BATCH)
    ]


@pytest.mark.parametrize("reverse", [False, True], ids=["readme_order", "reversed"])
def test_readme_callbacks_in_either_order_leave_out_the_skipped_step_only(reverse):
    # The README's list. SGD(0): every step's loss is its batch's loss at the
    # initial weights, whatever ZClip does to the gradients.
    _, x_nan, y, good = _data()
    model = _model(0.0)
    applied = [
        loss for i, loss in enumerate(_batch_losses(model, x_nan, y)) if good[i * BATCH]
    ]
    callbacks = [
        AdaptiveClipping(ZClip()),
        GradientMonitor(check_freq=10),
        GradientExplosionDetector(action="rollback"),
    ]
    history = _fit(model, x_nan, y, callbacks[::-1] if reverse else callbacks)
    assert history["steps_skipped"] == [1.0, 2.0]
    assert history["rollbacks"] == [0.0, 0.0]
    np.testing.assert_allclose(history["loss"], [np.mean(applied)] * 2, rtol=1e-5)


def test_monitor_raw_losses_after_a_skipped_step_are_each_steps_own():
    # The host rebuilds the raw loss from the logged mean between reads of
    # Keras' tracker; a step taken out of the tracker adds no batch.
    _, x_nan, y, good = _data()
    model = _model(0.0)
    losses = _batch_losses(model, x_nan, y)
    monitor = GradientMonitor()
    _fit(model, x_nan, y, [monitor])
    expected = np.array(losses * 2)
    ok = np.tile(good[::BATCH], 2)
    np.testing.assert_allclose(
        np.array(monitor.raw_losses)[ok], expected[ok], rtol=1e-4
    )
    assert np.isnan(np.array(monitor.raw_losses)[~ok]).all()  # the guard's: NaN


def _printed(model, x, y, callbacks, verbose):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        model.fit(
            x, y, batch_size=BATCH, epochs=1, verbose=verbose, callbacks=callbacks
        )
    return out.getvalue()


@pytest.mark.parametrize("verbose", [1, 2])
def test_counters_print_as_integers_in_a_progbar_logger_listed_first(verbose):
    x, x_nan, y, _ = _data()
    model = _model(0.05)
    callbacks = [
        keras.callbacks.ProgbarLogger(),
        GradientExplosionDetector(),
        AdaptiveClipping(None),
    ]
    out = _printed(model, x_nan, y, callbacks, verbose)
    last = [line for line in re.split(r"[\r\n]", out) if "rollbacks" in line][-1]
    for name, value in (
        ("rollbacks", 0),
        ("skipped_batches", 1),
        ("steps_clipped", 0),
        ("steps_skipped", 1),
    ):
        assert re.search(rf" - {name}: {value}( |$)", last), (name, last)
    assert "e+00" not in last
    assert re.search(r" - loss: \d\.\d{4}", last)  # other values as Keras prints them


def test_a_model_without_our_callbacks_prints_as_keras_does():
    x, _, y, _ = _data()

    class Count(keras.callbacks.Callback):
        # A user's own value of the same name, before the logger.
        def on_epoch_end(self, epoch, logs=None):
            logs["rollbacks"] = 0.0

    model = _model(0.05)
    out = _printed(model, x, y, [Count(), keras.callbacks.ProgbarLogger()], 2)
    assert "rollbacks: 0.0000e+00" in out


def _loss_under_mirrored_strategy(order):
    """Runs in a subprocess with 2 logical CPU devices."""
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    x, x_nan, y, good = _data()
    with strategy.scope():
        plain = _fit(_model(0.05), x[good], y[good])["loss"]
    with strategy.scope():
        model = _model(0.05)
    # The NaN row is in one replica's shard: each replica's share of Keras'
    # loss tracker goes back to its own value.
    history = _fit(model, x_nan, y, [_MAKE[name]() for name in order])
    return {
        "replicas": strategy.num_replicas_in_sync,
        "plain": plain,
        "loss": history["loss"],
        "skipped": int(model.optimizer.steps_skipped_nonfinite.numpy()),
    }


@pytest.mark.distributed
def test_epoch_loss_under_mirrored_strategy(two_cpu_devices):
    for order in (("monitor",), ("clipping", "monitor", "detector")):
        result = two_cpu_devices(_loss_under_mirrored_strategy, order)
        assert result["replicas"] == 2 and result["skipped"] == 2
        assert np.all(np.isfinite(result["loss"]))
        np.testing.assert_allclose(result["loss"], result["plain"], rtol=1e-5)
