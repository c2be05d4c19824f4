import csv
import os
import warnings

import keras
import numpy as np
import pytest

from keras_stability.callbacks import GradientMonitor
from keras_stability.datasets import make_classification
from keras_stability.optimizers import GuardedOptimizer


def _data(n=100):
    return make_classification(n_samples=n, seed=0)


def _small_model(lr=0.1):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(16, activation="relu", name="hidden"),
            keras.layers.Dense(10, name="head"),
        ]
    )
    model.compile(
        keras.optimizers.SGD(lr),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def deep_mlp(activation, initializer, residual, depth=20, width=32):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((10,))
    h = keras.layers.Dense(
        width, activation=activation, kernel_initializer=initializer
    )(inputs)
    for _ in range(depth - 2):
        y = keras.layers.Dense(
            width, activation=activation, kernel_initializer=initializer
        )(h)
        h = keras.layers.Add()([h, keras.layers.Rescaling(0.25)(y)]) if residual else y
    outputs = keras.layers.Dense(10)(h)
    model = keras.Model(inputs, outputs)
    model.compile(
        keras.optimizers.SGD(0.01),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


class _TrueBatchLoss(keras.callbacks.Callback):
    """Computes each batch's loss with the weights it is trained from."""

    def __init__(self, x, y, batch_size):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size
        self.losses = []

    def on_train_batch_begin(self, batch, logs=None):
        s = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
        pred = self.model(self.x[s], training=False)
        self.losses.append(float(self.model.loss(self.y[s], pred)))


def test_raw_loss_equals_true_per_batch_loss_and_reaches_logs(tmp_path):
    x, y = _data(100)  # batch 16: 6 full batches and one of 4
    model = _small_model(lr=0.5)
    truth = _TrueBatchLoss(x, y, 16)
    monitor = GradientMonitor(check_freq=1, logs_per_layer=True, verbose=0)
    csv_path = os.path.join(tmp_path, "log.csv")
    history = model.fit(
        x,
        y,
        batch_size=16,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[truth, monitor, keras.callbacks.CSVLogger(csv_path)],
    )
    assert isinstance(model.optimizer, GuardedOptimizer)
    assert len(monitor.raw_losses) == 14
    np.testing.assert_allclose(monitor.raw_losses, truth.losses, rtol=1e-4)
    # The logged "loss" is the running mean, which is not the raw loss.
    assert not np.allclose(history.history["loss"][0], truth.losses[6], rtol=1e-3)
    # Values reach History and CSVLogger (they come after user callbacks).
    for key in (
        "raw_loss",
        "grad_norm",
        "min_layer_grad_ratio",
        "grad_norm/hidden",
        "update_ratio/head",
    ):
        assert key in history.history and len(history.history[key]) == 2, key
    assert history.history["raw_loss"][1] == pytest.approx(truth.losses[-1], rel=1e-4)
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and float(rows[1]["grad_norm"]) == pytest.approx(
        history.history["grad_norm"][1], rel=1e-6
    )
    assert float(rows[0]["grad_norm/hidden"]) > 0
    # The global norm equals the optimizer's own pre-clip statistic.
    assert monitor.history["global_norm"][-1] == pytest.approx(
        float(model.optimizer.grad_norm.numpy()), rel=1e-5
    )


def test_check_freq_history_summary_plot_and_tensorboard(tmp_path):
    x, y = _data(96)
    model = _small_model()
    log_dir = os.path.join(tmp_path, "tb")
    monitor = GradientMonitor(
        check_freq=2, log_dir=log_dir, histogram_bins=10, verbose=0
    )
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    assert monitor.history["step"] == [2, 4, 6]
    assert list(monitor.history["grad_norm"]) == ["hidden", "head"]
    assert all(len(v) == 3 for v in monitor.history["grad_norm"].values())
    assert all(r > 0 for r in monitor.history["update_ratio"]["hidden"])
    text = monitor.summary(print_to_stdout=False)
    assert "Gradient health after 6 steps (3 checks)" in text
    assert "hidden" in text and "head" in text and "healthy" in text
    import matplotlib

    backend = matplotlib.get_backend()
    png = os.path.join(tmp_path, "heat.png")
    fig = monitor.plot(png)
    assert fig.axes[0].get_ylabel() == "" and len(fig.axes[0].get_yticklabels()) == 2
    assert matplotlib.get_backend() == backend  # the caller's backend is untouched
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        os.path.join(log_dir, "gradients"), size_guidance={"tensors": 0}
    )
    acc.Reload()
    tags = set(acc.Tags()["tensors"])
    assert {
        "raw_loss",
        "grad_norm/global",
        "grad_norm/hidden",
        "update_ratio/head",
    } <= tags
    assert {"log10_abs_grad/hidden", "log10_abs_grad/head"} <= tags
    hist = acc.Tensors("log10_abs_grad/hidden")[-1]
    import tensorflow as tf

    buckets = tf.make_ndarray(hist.tensor_proto)
    assert buckets.shape == (10, 3)
    assert buckets[:, 2].sum() == 10 * 16 + 16  # every gradient entry of "hidden"
    assert [e.step for e in acc.Tensors("grad_norm/hidden")] == [2, 4, 6]


def test_summary_prints_with_print_msg(capsys):
    monitor = GradientMonitor(verbose=0)
    text = monitor.summary()
    assert (
        capsys.readouterr().out.strip()
        == text
        == "GradientMonitor: no statistics recorded yet."
    )


@pytest.mark.slow
def test_deep_sigmoid_flagged_vanishing_but_relu_he_residual_not():
    x, y = _data(256)
    sigmoid = deep_mlp("sigmoid", "glorot_uniform", residual=False)
    monitor = GradientMonitor(verbose=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sigmoid.fit(x, y, batch_size=64, epochs=2, verbose=0, callbacks=[monitor])
    vanishing = monitor.unhealthy_layers("vanishing")
    assert vanishing[:5] == monitor.layer_names[:5]  # the first layers
    assert monitor.layer_names[-1] not in vanishing
    assert not monitor.unhealthy_layers("exploding")
    message = " ".join(str(w.message) for w in caught)
    assert "Vanishing gradients" in message and monitor.layer_names[0] in message
    assert "He initialisation" in message

    relu = deep_mlp("relu", "he_normal", residual=True)
    monitor = GradientMonitor(verbose=0)
    relu.fit(x, y, batch_size=64, epochs=2, verbose=0, callbacks=[monitor])
    assert len(monitor.layer_names) == 20
    assert monitor.unhealthy_layers() == []


def test_monitor_reused_across_fits_restarts_history():
    x, y = _data(64)
    model = _small_model()
    monitor = GradientMonitor(verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    assert monitor.history["step"] == [1, 2, 3, 4]
    assert len(model.optimizer.observers) == 1


def test_detach_stops_the_statistics_and_a_later_fit_attaches_again():
    from keras_stability.callbacks import GradientExplosionDetector

    x, y = _data(64)
    model = _small_model()
    monitor = GradientMonitor(verbose=0)
    detector = GradientExplosionDetector(verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor, detector])
    assert len(model.optimizer.observers) == 2
    steps = int(monitor.observer.step.numpy())
    assert monitor.detach() and detector.detach()
    assert not monitor.detach()  # already detached
    assert model.optimizer.observers == []
    before = [v.path for v in model.optimizer.variables]
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert int(monitor.observer.step.numpy()) == steps  # no longer computed
    assert [v.path for v in model.optimizer.variables] == before
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    assert model.optimizer.observers == [monitor.observer]
    assert monitor.history["step"] == [1, 2, 3, 4]


def test_get_config_round_trip_and_invalid_arguments():
    monitor = GradientMonitor(check_freq=5, log_dir="/tmp/x", patience=2)
    config = monitor.get_config()
    assert GradientMonitor.from_config(config).get_config() == config
    with pytest.raises(ValueError) as info:
        GradientMonitor(check_freq=0)
    assert str(info.value) == (
        "Invalid value for argument `check_freq`. Expected a positive integer. "
        "Received: check_freq=0"
    )
    with pytest.raises(ValueError, match="Received: vanish_ratio=-1"):
        GradientMonitor(vanish_ratio=-1)


class _PerStepRead(keras.callbacks.Callback):
    """Reads the guard's and the observer's latest values after every batch."""

    def __init__(self, monitor):
        super().__init__()
        self.monitor = monitor
        self.global_norms, self.layer_norms, self.batch_logs = [], [], []

    def on_train_batch_end(self, batch, logs=None):
        self.global_norms.append(float(self.model.optimizer.grad_norm.numpy()))
        self.layer_norms.append(self.monitor.observer.read()["grad_norms"].tolist())
        self.batch_logs.append(dict(logs))


def test_buffered_history_equals_per_step_reads_with_a_partial_last_chunk():
    x, y = _data(100)  # batch 16: 7 steps per epoch, 14 in all
    histories = {}
    for read_freq in (1, 5):
        model = _small_model(lr=0.5)
        monitor = GradientMonitor(check_freq=1, read_freq=read_freq, verbose=0)
        probe = _PerStepRead(monitor)
        history = model.fit(
            x,
            y,
            batch_size=16,
            epochs=2,
            shuffle=False,
            verbose=0,
            callbacks=[monitor, probe],
        )
        h = monitor.history
        assert h["step"] == list(range(1, 15))
        # Every step's values, exactly as a read after that step gave them.
        np.testing.assert_array_equal(h["global_norm"], probe.global_norms)
        np.testing.assert_array_equal(
            np.asarray([h["grad_norm"][n] for n in monitor.layer_names]).T,
            probe.layer_norms,
        )
        np.testing.assert_array_equal(h["raw_loss"], monitor.raw_losses)
        # Epoch logs (History) carry the last step of each epoch: the epoch
        # end reads the partial chunk (steps 6-7 and 11-14 with read_freq=5).
        assert history.history["grad_norm"] == [
            h["global_norm"][6],
            h["global_norm"][13],
        ]
        logged = [b.get("grad_norm") for b in probe.batch_logs]
        if read_freq == 1:
            assert logged == h["global_norm"]
        else:  # batch logs carry the last read: after steps 5, 7 (epoch end), 10
            assert logged[:4] == [None] * 4  # nothing read yet
            # The epoch's last step is read before any callback sees its logs.
            assert logged[4:10] == [h["global_norm"][i] for i in (4, 4, 6, 6, 6, 9)]
            assert [b["raw_loss"] for b in probe.batch_logs] == monitor.raw_losses
        histories[read_freq] = h
    assert histories[1] == histories[5]  # bitwise, whatever the read cadence


def test_flush_reads_up_to_the_current_step_and_steps_per_execution():
    x, y = _data(96)
    model = _small_model()
    model.compile(
        keras.optimizers.SGD(0.1),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=2,
    )
    monitor = GradientMonitor(check_freq=1, read_freq=64, verbose=0)
    seen = []

    class Reader(keras.callbacks.Callback):
        calls = 0

        def on_train_batch_end(self, batch, logs=None):
            self.calls += 1
            if self.calls == 2:  # after optimizer steps 1-4 (two executions)
                seen.append(monitor.flush())
                seen.append(list(monitor.history["step"]))

    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor, Reader()])
    assert seen == [4, [1, 2, 3, 4]]
    assert monitor.history["step"] == [1, 2, 3, 4, 5, 6]
    # One raw loss per execution (the mean of its two steps), per check.
    assert monitor.history["raw_loss"] == [monitor.raw_losses[i // 2] for i in range(6)]


def test_read_freq_validation_and_buffer_size():
    assert GradientMonitor(check_freq=10, read_freq=32).buffer_size == 4
    assert GradientMonitor(check_freq=1, read_freq=1).buffer_size == 1
    with pytest.raises(ValueError) as info:
        GradientMonitor(read_freq=0)
    assert str(info.value) == (
        "Invalid value for argument `read_freq`. Expected a positive integer. "
        "Received: read_freq=0"
    )


class _FixedRows:
    """Stands in for the observer: returns given per-layer norms as checks."""

    built = True

    def __init__(self, first_step, norms):
        self.norms = np.asarray(norms, dtype=np.float64)
        self.steps = np.arange(first_step, first_step + len(self.norms))

    def read_rows(self, after_step=0):
        keep = self.steps > after_step
        norms = self.norms[keep]
        return {
            "step": self.steps[keep],
            "global_norm": np.sqrt(np.sum(norms**2, axis=1)),
            "grad_norms": norms,
            "weight_norms": np.ones_like(norms),
            "update_ratios": np.zeros_like(norms),
        }


def test_a_run_inside_one_read_is_warned_about_at_its_step():
    x, y = _data(32)
    model = _small_model()
    monitor = GradientMonitor(patience=3, read_freq=32, verbose=1)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    assert monitor.history["step"] == [1, 2] and monitor.unhealthy_layers() == []
    # 32 more checks (steps 3-34): "hidden" vanishes at steps 12-14 only.
    norms = np.full((32, 2), 0.5)
    norms[9:12, 0] = 1e-9
    monitor.observer = _FixedRows(3, norms)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert monitor.flush() == 32
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and messages[0].startswith("GradientMonitor at step 14: ")
    assert "Vanishing gradients" in messages[0] and "hidden" in messages[0]
    # The last checks are healthy: so are the current findings.
    assert monitor.unhealthy_layers() == [] and monitor.history["step"][-1] == 34
    assert [f.status for f in monitor.diagnose(end=14)] == ["vanishing", "healthy"]
    assert monitor._suspect_ends(0) == []  # nothing new: no extra diagnosis


def test_epoch_logs_carry_the_last_steps_raw_loss_between_checks():
    x, y = _data(112)  # batch 16: 7 steps; checks at steps 3 and 6
    model = _small_model()
    monitor = GradientMonitor(check_freq=3, verbose=0)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    assert monitor.history["step"] == [3, 6]
    assert monitor.history["raw_loss"] == [monitor.raw_losses[2], monitor.raw_losses[5]]
    assert history.history["raw_loss"] == [monitor.raw_losses[6]]
    assert history.history["grad_norm"] == [monitor.history["global_norm"][-1]]


def test_a_monitor_and_detector_shared_by_two_models_keep_one_observer_each():
    """Audit finding: reused on two models they added observers every fit
    (2 -> 4 -> 6 -> 8 per optimizer). Each is now bound to its model."""
    from keras_stability.callbacks import GradientExplosionDetector

    x, y = _data(32)
    a, b = _small_model(), _small_model()
    monitor, detector = GradientMonitor(), GradientExplosionDetector()
    counts = []
    for _ in range(4):
        for model in (a, b):
            model.fit(
                x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor, detector]
            )
        counts.append((len(a.optimizer.observers), len(b.optimizer.observers)))
    assert counts == [(2, 2)] * 4
    variables = len(a.optimizer.variables)
    a.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor, detector])
    assert len(a.optimizer.variables) == variables  # nothing new built
    assert monitor.history["step"] == [1, 2]  # the last fit's checks, on `a`
    assert monitor.detach() and detector.detach()
    assert a.optimizer.observers == [] and b.optimizer.observers == []


class _Chunks:
    """Stands in for the observer: each read returns the next `size` checks."""

    built = True

    def __init__(self, layers, size):
        self.layers, self.size, self.step = layers, size, 0
        self.rng = np.random.default_rng(0)

    def read_rows(self, after_step=0):
        steps = np.arange(self.step + 1, self.step + self.size + 1)
        self.step += self.size
        norms = self.rng.uniform(0.1, 1.0, size=(self.size, self.layers))
        return {
            "step": steps,
            "global_norm": np.sqrt(np.sum(norms**2, axis=1)),
            "grad_norms": norms,
            "weight_norms": np.ones_like(norms),
            "update_ratios": np.full_like(norms, 1e-3),
        }


def test_history_memory_is_bounded_and_totals_cover_every_check():
    import gc
    import tracemalloc

    x, y = _data(32)
    model = _small_model()
    monitor = GradientMonitor(history_size=100, read_freq=32)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    chunks = _Chunks(layers=2, size=32)
    monitor.observer = chunks
    seen = {"min": np.inf, "max": -np.inf, "count": 0}  # scalars: no growth here

    def read(n):
        for _ in range(n):
            monitor.raw_losses.append(0.5)  # the step's raw loss, as fit adds it
            monitor.flush()
            new = np.asarray(monitor.history["grad_norm"]["hidden"][-32:])
            seen["min"] = min(seen["min"], new.min())
            seen["max"] = max(seen["max"], new.max())
            seen["count"] += 32

    read(10)  # 320 checks: the ring is full
    tracemalloc.start()
    read(30)  # the ring's contents are now all allocated while traced
    gc.collect()  # NumPy's strided views leave reference cycles behind
    first, _ = tracemalloc.get_traced_memory()
    read(160)  # 5,120 more checks (unbounded, they would hold ~1.5 MB)
    gc.collect()
    second, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert abs(second - first) < 64 * 1024, (first, second)  # unbounded: +1.5 MB
    h = monitor.history
    assert len(h["step"]) == 100 and h["step"][-1] == chunks.step
    assert all(
        len(v) == 100
        for key in ("grad_norm", "weight_norm", "update_ratio")
        for v in h[key].values()
    )
    assert len(monitor.raw_losses) <= 100
    totals = monitor.totals["grad_norm"]["hidden"]
    assert monitor.totals["checks"] == 2 + 200 * 32
    assert totals["count"] == 2 + seen["count"]
    assert totals["max"] >= seen["max"] and totals["min"] <= seen["min"]
    assert "(6402 checks)" in monitor.summary(print_to_stdout=False)


def test_bounded_history_matches_an_unbounded_one_on_its_last_checks():
    x, y = _data(256)  # 16 steps per epoch, 48 in all
    model = _small_model()
    bounded = GradientMonitor(history_size=64, read_freq=8)
    full = GradientMonitor(history_size=None, read_freq=8)
    model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[bounded, full])
    assert full.history["step"] == list(range(1, 49))
    assert bounded.history == full.history  # 48 < 64: nothing dropped yet
    for name in ("hidden", "head"):
        norms = np.asarray(full.history["grad_norm"][name])
        running = bounded.totals["grad_norm"][name]
        assert running["min"] == norms.min() and running["max"] == norms.max()
        assert running["mean"] == pytest.approx(norms.mean(), rel=1e-12)
    with pytest.raises(ValueError, match="Invalid value for argument `history_size`"):
        GradientMonitor(history_size=10)


def test_unwritable_log_dir_is_a_value_error_naming_it(tmp_path):
    x, y = _data(32)
    blocker = os.path.join(tmp_path, "a_file")
    with open(blocker, "w") as f:
        f.write("not a directory")
    model = _small_model()
    monitor = GradientMonitor(log_dir=os.path.join(blocker, "tb"))
    with pytest.raises(ValueError) as info:
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    assert str(info.value).startswith("Invalid value for argument `log_dir`.")
    assert "Received: log_dir=" in str(info.value)
    with pytest.raises(ValueError, match="Invalid value for argument `log_dir`"):
        GradientMonitor(log_dir=3)
