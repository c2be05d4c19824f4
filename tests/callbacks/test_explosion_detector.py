import gc
import json
import math
import os
import warnings
import weakref

import keras
import numpy as np
import pytest

from keras_stability.callbacks import GradientExplosionDetector
from keras_stability.callbacks import ScaledSchedule
from keras_stability.callbacks import snapshots
from keras_stability.callbacks.recovery import PROBLEM_KINDS
from keras_stability.callbacks.recovery import Problem
from keras_stability.callbacks.snapshots import Snapshot
from keras_stability.callbacks.snapshots import optimizer_state_variables
from keras_stability.datasets import make_classification
from keras_stability.datasets import make_seasonal_series


def _data(n=256):
    return make_classification(n_samples=n, seed=0)


def deep_mlp(optimizer, depth=6, seed=0, steps_per_execution=1):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((10,))]
        + [keras.layers.Dense(32, activation="relu") for _ in range(depth)]
        + [keras.layers.Dense(10)]
    )
    model.compile(
        optimizer,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=steps_per_execution,
    )
    return model


def _finite(model):
    return all(np.all(np.isfinite(w)) for w in model.get_weights())


def _actions(detector):
    """(step, kind) of the events that are not single spikes (no action) nor
    steps skipped at the detector's request (the consequence of one)."""
    return [
        (e["step"], e["kind"])
        for e in detector.events
        if e["kind"] not in ("spike", "skipped_requested")
    ]


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    return result, [str(w.message) for w in caught]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"action": "explode"},
            "Invalid value for argument `action`. Expected one of 'warn', 'skip', 'rollback', 'stop'. Received: action='explode'",
        ),
        (
            {"snapshot_freq": 0},
            "Invalid value for argument `snapshot_freq`. Expected a positive integer. Received: snapshot_freq=0",
        ),
        (
            {"lr_factor": 1.0},
            "Invalid value for argument `lr_factor`. Expected a number in (0, 1). Received: lr_factor=1.0",
        ),
        ({"lr_factor": 0}, "Received: lr_factor=0"),
        ({"max_rollbacks": -1}, "Received: max_rollbacks=-1"),
        ({"window": 10, "min_samples": 20}, "Received: min_samples=20"),
        (
            {"regress_factor": 1.0},
            "Invalid value for argument `regress_factor`. Expected a number > 1 or None. Received: regress_factor=1.0",
        ),
        (
            {"probe_lower_lr": 1},
            "Invalid value for argument `probe_lower_lr`. Expected a bool (True or False). Received: probe_lower_lr=1",
        ),
        # Audit findings: "False" read as True; the argument named `threshold`.
        (
            {"restore_best_weights": "False"},
            "Invalid value for argument `restore_best_weights`. Expected a bool (True or False). Received: restore_best_weights='False'",
        ),
        (
            {"loss_z_threshold": 0},
            "Invalid value for argument `loss_z_threshold`. Expected a positive number. Received: loss_z_threshold=0",
        ),
        ({"grad_z_threshold": -1.0}, "Invalid value for argument `grad_z_threshold`."),
        (
            {"loss_factor": 1.0},
            "Invalid value for argument `loss_factor`. Expected a number > 1 or None.",
        ),
        ({"verbose": 3}, "Invalid value for argument `verbose`."),
        ({"diagnostic_path": 3}, "Invalid value for argument `diagnostic_path`."),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError) as info:
        GradientExplosionDetector(**kwargs)
    assert message in str(info.value)


def test_get_config_round_trip():
    detector = GradientExplosionDetector(
        action="stop", snapshot_freq=7, lr_factor=0.3, probe_lower_lr=False
    )
    config = detector.get_config()
    assert config["probe_lower_lr"] is False
    assert GradientExplosionDetector.from_config(config).get_config() == config


def test_a_problem_is_acted_on_by_its_kind_not_its_message():
    rise = Problem("diverging", "loss diverging: median raw loss 9 ...")
    assert rise.undo_factor == 0.9 and str(rise) == rise.message
    assert Problem("stalled", "x").undo_factor == 1.5
    assert Problem("exploded", "x").undo_factor == 1.5
    # A run of skipped non-finite steps is compared like a rise (the data
    # may be at fault), a non-finite loss that was applied is not.
    assert Problem("nonfinite_in_a_row", "x").undo_factor == 0.9
    assert Problem("nonfinite_loss", "x").undo_factor is None
    # A message that reads like another kind changes nothing.
    assert Problem("bad_steps", "loss rising: reworded").undo_factor is None
    detailed = rise.detailed("; confirmed")
    assert detailed.kind == "diverging" and detailed.message.endswith("; confirmed")
    assert set(PROBLEM_KINDS) >= {"rising", "regressing", "recovery_failed"}
    with pytest.raises(ValueError, match="Invalid problem kind: 'loss rising'"):
        Problem("loss rising", "x")


def test_rollback_restores_weights_and_optimizer_state_bitwise():
    x, y = _data(128)
    model = deep_mlp(keras.optimizers.Adam(1e-3), depth=2)
    detector = GradientExplosionDetector(
        check_every=1,  # pins the steps of a look after every step
        snapshot_freq=2,
        skip_batches=3,
        lr_factor=0.5,
        verbose=0,
    )
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[detector])
    snap = detector.snapshot
    assert snap.step == 6  # taken at step 6, confirmed by 2 healthy steps
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # moves everything on
    opt_vars = optimizer_state_variables(model.optimizer)
    assert any(
        not np.array_equal(np.asarray(v), s)
        for v, s in zip(opt_vars, snap.optimizer_values, strict=True)
    )
    detector._rollback(Problem("diverging", "test"))
    for v, saved in zip(model.weights, snap.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(v), saved)
    paths = [v.path for v in opt_vars]
    assert any("momentum" in p for p in paths) and any("iteration" in p for p in paths)
    for v, saved in zip(opt_vars, snap.optimizer_values, strict=True):
        np.testing.assert_array_equal(np.asarray(v), saved)  # moments, iterations
    assert float(np.asarray(model.optimizer.learning_rate)) == pytest.approx(5e-4)
    assert int(model.optimizer.skip_remaining.numpy()) == 3
    assert detector.rollbacks == 1


@pytest.mark.parametrize("steps_per_execution, check_every", [(1, 1), (2, 1), (1, 10)])
def test_high_learning_rate_diverges_plainly_but_is_rescued(
    steps_per_execution, check_every
):
    x, y = _data(512)
    plain = deep_mlp(
        keras.optimizers.SGD(10.0), steps_per_execution=steps_per_execution
    )
    plain.fit(x, y, batch_size=32, epochs=2, verbose=0)
    assert not _finite(plain)  # plain fit ends with NaN weights

    model = deep_mlp(
        keras.optimizers.SGD(10.0), steps_per_execution=steps_per_execution
    )
    initial = model.evaluate(x, y, verbose=0)
    detector = GradientExplosionDetector(
        # With 10: looks every 5 steps (snapshot_freq), then after every step
        # once one has seen the first bad step: the same rollback step.
        check_every=check_every,
        snapshot_freq=5,
        lr_factor=0.05,
        skip_batches=2,
        verbose=0,
    )
    history = model.fit(x, y, batch_size=32, epochs=3, verbose=0, callbacks=[detector])
    assert _finite(model)
    assert detector.rollbacks >= 1 and detector.stopped_reason is None
    final = model.evaluate(x, y, verbose=0)
    assert math.isfinite(final) and final < initial - 0.05, (initial, final)
    # The spike's loss left the epoch's running mean at the rollback, so the
    # raw losses recovered from it afterwards are plain batch losses (a huge
    # loss left in Keras' float32 total turned them into multiples of 2^13).
    last_rollback = max(
        e["step"] for e in detector.events if e.get("action") == "rollback"
    )
    calls_after = (detector.step - last_rollback) // steps_per_execution  # full calls
    assert 0 < max(detector.raw_losses[-calls_after:]) < 5.0
    assert history.history["rollbacks"][-1] == detector.rollbacks
    # Rolled back at 10 * 0.05 = 0.5; after 5 steps at 0.5, the probe 5
    # steps at 0.5 * 0.05 ** (1/3) from the restored weights is not lower:
    # the state reached at 0.5 is restored and training goes on at the
    # probe's rate (short-horizon bias).
    rates = [
        (e["action"], e["learning_rate"]) for e in detector.events if "action" in e
    ]
    assert rates == [
        ("rollback", pytest.approx(0.5)),
        ("lower_lr", pytest.approx(0.5 * 0.05 ** (1 / 3))),
    ]
    assert detector.lr_probes == 0
    assert detector.events[-1]["detail"].startswith("went on at 0.1842 from the state")
    assert float(np.asarray(model.optimizer.learning_rate)) == pytest.approx(
        0.5 * 0.05 ** (1 / 3)
    )


def _quadratic_problem(n_batches=8, batch=8, dim=4, seed=0):
    """Batches with `x_b^T x_b / batch == I`: every batch's MSE is `|w - w*|^2`.

    With SGD at learning rate `lr` the error is multiplied by `1 - 2 lr` each
    step, so the raw losses are known exactly: `L0 * (1 - 2 lr)^(2 t)`.
    """
    rng = np.random.default_rng(seed)
    xs = [
        np.sqrt(batch) * np.linalg.qr(rng.normal(size=(batch, dim)))[0]
        for _ in range(n_batches)
    ]
    x = np.concatenate(xs).astype("float32")
    w = rng.normal(size=(dim, 1)).astype("float32")
    return x, x @ w, float(np.sum(w**2))


def _linear(lr):
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros"),
        ]
    )
    model.compile(keras.optimizers.SGD(lr), "mse")
    return model


def test_slow_regression_is_rolled_back_before_any_spike():
    # lr 1.05: the loss grows 1.21x per step, never a 10x jump. Plain fit
    # ends 2000x above where it started.
    x, y, start = _quadratic_problem()
    plain = _linear(1.05)
    plain.fit(x, y, batch_size=8, epochs=5, shuffle=False, verbose=0)
    assert plain.evaluate(x, y, verbose=0) > 1000 * start

    model = _linear(1.05)
    detector = GradientExplosionDetector(
        check_every=1, lr_factor=0.5, skip_batches=3, verbose=0
    )
    model.fit(
        x, y, batch_size=8, epochs=5, shuffle=False, verbose=0, callbacks=[detector]
    )
    np.testing.assert_allclose(
        np.asarray(detector.raw_losses[:5]) / start, 1.21 ** np.arange(5), rtol=1e-4
    )
    # A geometric climb spreads as fast as it rises: the start is never 2
    # standard deviations below the last 20 losses, so it is no regression.
    # It is a slow divergence: the median of steps 6-25 (106.2) is 10x the
    # step-0 snapshot's score (10.12, the mean of steps 1-5).
    # Seen at step 25; steps 26-28 compare the step-0 snapshot with the
    # current weights on the same batches (0.007x: it is the weights), so
    # it rolls back at step 28, to step 0, with nothing to skip: steps
    # 29-33 at 0.525 (x0.0025 per step) pass the recovery check; the probe at
    # 0.525 * 0.5 ** (1/3) = 0.4167 (x0.0278 per step, steps 34-38, from
    # step 0 again) is slower, so the state of step 33 is restored and
    # training goes on from it at 0.4167 (short-horizon bias).
    assert [(e["step"], e["kind"], e["action"]) for e in detector.events] == [
        (25, "problem", "compare"),
        (28, "problem", "rollback"),
        (38, "lr_probe", "lower_lr"),
    ]
    assert detector.skipped_batches == detector.skipped_requested == 0
    assert detector.events[0]["detail"].startswith(
        "loss diverging: median raw loss 106.2 over the last 20 steps"
    )
    assert detector.events[1]["restored_step"] == 0
    assert detector.events[1]["paired_ratio"] < 0.01
    assert detector.events[2]["detail"].startswith(
        "went on at 0.4167 from the state at 0.525: 5 steps at 0.4167"
    )
    assert detector.rollbacks == 1
    assert float(np.asarray(model.optimizer.learning_rate)) == pytest.approx(
        0.4167, rel=1e-3
    )
    assert model.evaluate(x, y, verbose=0) < 1e-6 * start


@pytest.mark.parametrize("check_recovery", [True, False])
def test_failed_recovery_escalates_to_a_second_rollback(check_recovery):
    # lr 1.5: x4 per step, spikes from step 4 (10x the median of the first
    # steps); a single spike is only an event, the fourth in a row (step 7)
    # is a rollback. x0.7 gives 1.05, still too high (x1.21 per step, no
    # spike); the recovery check sees the 5 steps after the 3 skipped ones
    # rise above the restored loss and lowers it again, by the probes' finer
    # step 0.7 ** (1/3), to 0.932 (x0.75 per step). (The probe of a lower
    # learning rate after a passed check is tested below.)
    x, y, start = _quadratic_problem()
    model = _linear(1.5)
    detector = GradientExplosionDetector(
        check_every=1,  # pins the steps of a look after every step
        lr_factor=0.7,
        skip_batches=3,
        regress_factor=None,
        check_recovery=check_recovery,
        probe_lower_lr=False,
        verbose=0,
    )
    model.fit(
        x, y, batch_size=8, epochs=6, shuffle=False, verbose=0, callbacks=[detector]
    )
    steps = [step for step, _ in _actions(detector)]
    spikes = [e["step"] for e in detector.events if e["kind"] == "spike"]
    assert spikes[:4] == [4, 5, 6, 7]
    assert detector.events[0]["detail"].startswith("loss spike")
    problems = [e for e in detector.events if e["kind"] == "problem"]
    assert problems[0]["detail"].startswith("loss rising: 4 of the last 7 steps bad")
    assert problems[0]["problem"] == "rising"
    if check_recovery:
        # Seen at step 7, steps 8-10 compare (the climb goes on: spikes),
        # rollback at step 10, steps 11-15 judged against the snapshot's
        # losses on steps 8-10; seen at 15, compared on 16-18, rolled back.
        assert spikes == [4, 5, 6, 7, 8, 9, 10]
        assert steps == [7, 10, 15, 18]
        assert [e["action"] for e in problems] == ["compare", "rollback"] * 2
        detail = problems[2]["detail"]
        assert detail.startswith("recovery failed: after rollback 1")
        assert [e["problem"] for e in problems] == ["rising"] * 2 + [
            "recovery_failed"
        ] * 2
        assert f"restored weights' loss {start:.4g}" in detail
        assert detector.rollbacks == 2
        assert float(np.asarray(model.optimizer.learning_rate)) == pytest.approx(
            1.5 * 0.7 * 0.7 ** (1 / 3)
        )
        # 30 steps at x0.7475: 0.7475 ** 30 = 1.6e-4 of the start.
        assert model.evaluate(x, y, verbose=0) < 2e-3 * start
    else:
        # Without the check (and the regression rule) the slow climb at lr
        # 1.05 is no spike (1.21x per step); the median of the last 32 steps
        # (256 samples) reaches 2x the start at step 47, with the median of
        # the last 20 above 0.9x it and the losses moving smoothly (1.21x a
        # step): no progress after an explosion, a second rollback to the
        # weights of step 0 (step 48, the last of the fit, is skipped).
        assert steps == [7, 47]
        problem = problems[1]["detail"]
        assert problem.startswith("no progress after an explosion")
        assert float(np.asarray(model.optimizer.learning_rate)) == pytest.approx(
            1.5 * 0.7**2
        )
        assert model.evaluate(x, y, verbose=0) == pytest.approx(start, rel=1e-4)


@pytest.mark.parametrize("probe_lower_lr", [True, False])
def test_stable_but_too_high_learning_rate_after_a_rollback_is_probed_lower(
    probe_lower_lr,
):
    # lr 1.95: x8.41 per step, spikes from step 3, the fourth in a row (step
    # 6) rolls back. x0.5 gives 0.975: stable
    # (x0.9025 per step, the recovery check passes) but 160x slower than
    # 0.4875 (x0.000625 per step). The probe runs 5 steps from the restored
    # weights at each learning rate and keeps the lower one only if its loss
    # falls further.
    x, y, start = _quadratic_problem()
    model = _linear(1.95)
    detector = GradientExplosionDetector(
        check_every=1,  # pins the steps of a look after every step
        lr_factor=0.5,
        skip_batches=3,
        probe_lower_lr=probe_lower_lr,
        verbose=0,
    )
    model.fit(
        x, y, batch_size=8, epochs=5, shuffle=False, verbose=0, callbacks=[detector]
    )
    lr = float(np.asarray(model.optimizer.learning_rate))
    final = model.evaluate(x, y, verbose=0)
    steps = _actions(detector)
    events = [
        e for e in detector.events if e["kind"] not in ("spike", "skipped_requested")
    ]
    assert detector.skipped_requested == 0
    assert detector.events[0]["detail"].startswith("loss spike")
    raw = np.asarray(detector.raw_losses) / start
    # Seen at step 6; steps 7-9 compare (the climb goes on, x8.41 a step,
    # the step-0 snapshot's loss is the start's); rollback at step 9;
    # 10-14 at 0.975.
    np.testing.assert_allclose(raw[6:9] / raw[5:8], 8.41, rtol=1e-3)
    np.testing.assert_allclose(
        raw[9:14], [1, 0.9025, 0.9025**2, 0.9025**3, 0.9025**4], rtol=1e-3
    )
    if probe_lower_lr:
        # Probes go down by 0.5 ** (1/3), 5 steps each from step 0, each
        # kept while its mean loss falls further (a lower rate, not a second
        # rollback): 0.7739 (x0.300 per step, steps 15-19), 0.6142 (x0.0522,
        # 20-24), 0.4875 (x0.000625, 25-29); each probe restarts at the start.
        assert steps == [
            (6, "problem"),
            (9, "problem"),
            (19, "lr_probe"),
            (24, "lr_probe"),
            (29, "lr_probe"),
        ]
        for event, rate in zip(events[2:], (0.7739, 0.6142, 0.4875), strict=True):
            assert event["detail"].startswith("lower learning rate kept")
            assert event["learning_rate"] == pytest.approx(rate, rel=1e-4)
            assert event["action"] == "lower_lr"
        np.testing.assert_allclose(raw[14:16], [1, 0.3003], rtol=1e-2)
        np.testing.assert_allclose(raw[19:21], [1, 0.05218], rtol=1e-3)
        np.testing.assert_allclose(raw[24:26], [1, 0.000625], rtol=1e-2)
        assert raw[29] < 1e-8  # step 30 goes on from step 29's state
        assert detector.rollbacks == 1 and detector.lr_probes == 3
        assert lr == pytest.approx(0.4875)
        assert final < 1e-10 * start
    else:
        # Without the probe, 0.975 stays: 31 steps at x0.9025.
        assert steps == [(6, "problem"), (9, "problem")]
        assert detector.rollbacks == 1 and detector.lr_probes == 0
        assert lr == pytest.approx(0.975)
        assert final > 0.02 * start


def test_lower_rates_kept_by_probes_do_not_use_up_max_rollbacks():
    # As above with max_rollbacks=1: the probe's lower rate is kept although
    # the one rollback allowed is used, and the run goes on (the probe is
    # bounded by max_rollbacks per rollback, not by the rollbacks left).
    x, y, start = _quadratic_problem()
    model = _linear(1.95)
    detector = GradientExplosionDetector(
        check_every=1,  # pins the steps of a look after every step
        lr_factor=0.5,
        skip_batches=3,
        max_rollbacks=1,
        verbose=0,
    )
    model.fit(
        x, y, batch_size=8, epochs=5, shuffle=False, verbose=0, callbacks=[detector]
    )
    assert _actions(detector) == [(6, "problem"), (9, "problem"), (19, "lr_probe")]
    assert detector.rollbacks == 1 and detector.lr_probes == 1
    assert detector.stopped_reason is None
    # One lower rate per rollback at most: 0.975 * 0.5 ** (1/3) is kept and
    # 0.6142 is not probed.
    assert float(np.asarray(model.optimizer.learning_rate)) == pytest.approx(
        0.975 * 0.5 ** (1 / 3), rel=1e-5
    )
    assert model.evaluate(x, y, verbose=0) < 1e-10 * start


def test_probe_unfinished_when_fit_ends_is_undone():
    # As above, but fit ends at step 16, during the probe of 0.4875 (steps
    # 15-19, from step 0 again): the state of step 14 (the end of the trial
    # at 0.975) and its learning rate 0.975 are restored.
    x, y, start = _quadratic_problem()
    model = _linear(1.95)
    detector = GradientExplosionDetector(
        check_every=1, lr_factor=0.5, skip_batches=3, verbose=0
    )
    model.fit(
        x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[detector]
    )
    assert _actions(detector) == [(6, "problem"), (9, "problem"), (16, "lr_probe")]
    assert detector.events[-1]["detail"].startswith(
        "probe unfinished at the end of training: learning rate 0.975 kept; "
        "restored the state of step 14"
    )
    assert float(np.asarray(model.optimizer.learning_rate)) == pytest.approx(0.975)
    assert detector.rollbacks == 1 and detector.lr_probes == 0
    # Step 14's state: step 0's, then 5 steps at 0.975, x0.9025 each.
    assert model.evaluate(x, y, verbose=0) == pytest.approx(0.9025**5 * start, rel=1e-3)


def test_no_probe_without_a_rollback():
    # The probe only chooses the learning rate after a rollback: healthy
    # training, even slow (lr 0.975, x0.9025 per step), is left alone.
    x, y, start = _quadratic_problem()
    for lr in (0.975, 0.05):
        model = _linear(lr)
        detector = GradientExplosionDetector(lr_factor=0.5, snapshot_freq=5, verbose=0)
        model.fit(
            x, y, batch_size=8, epochs=5, shuffle=False, verbose=0, callbacks=[detector]
        )
        assert detector.events == [] and detector.rollbacks == 0
        assert float(np.asarray(model.optimizer.learning_rate)) == pytest.approx(lr)
        assert model.evaluate(x, y, verbose=0) < 0.04 * start


def test_fast_healthy_convergence_is_not_a_slow_divergence():
    # lr 0.1: the loss falls 0.64x per step, 10x in about 5 steps. The mean
    # of the last `min_samples` losses is then far above the loss of a
    # snapshot taken inside that window, but the loss is falling: only
    # losses after the best snapshot may judge a divergence from it.
    x, y, start = _quadratic_problem()
    model = _linear(0.1)
    detector = GradientExplosionDetector(snapshot_freq=5, verbose=0)
    model.fit(
        x, y, batch_size=8, epochs=6, shuffle=False, verbose=0, callbacks=[detector]
    )
    np.testing.assert_allclose(
        np.asarray(detector.raw_losses[:10]) / start, 0.64 ** np.arange(10), rtol=1e-3
    )
    assert detector.events == [] and detector.rollbacks == 0
    assert model.evaluate(x, y, verbose=0) < 1e-6 * start


def test_slow_divergence_after_the_best_snapshot_is_caught():
    # Two epochs at lr 0.1 (loss x0.64 per step) reach 1e-3 of the start;
    # then lr 1.02 makes it grow 1.0816x per step: no jump the z-score
    # would call a spike (turned off here anyway), and the regression rule is
    # off. Only the slow-divergence rule can see it, once the mean of the
    # last 20 losses is 10x the best snapshot's loss floored at a tenth of
    # the starting loss: 10x a loss near zero is not a divergence by itself.
    x, y, start = _quadratic_problem()
    model = _linear(0.1)
    schedule = keras.callbacks.LearningRateScheduler(
        lambda epoch: 0.1 if epoch < 2 else 1.02
    )
    detector = GradientExplosionDetector(
        check_every=1,  # pins the steps of a look after every step
        action="stop",
        snapshot_freq=5,
        loss_z_threshold=1e9,
        grad_z_threshold=1e9,
        regress_factor=None,
        verbose=0,
    )
    with pytest.warns(UserWarning, match="loss diverging"):
        model.fit(
            x,
            y,
            batch_size=8,
            epochs=30,
            shuffle=False,
            verbose=0,
            callbacks=[schedule, detector],
        )
    best = detector.best
    assert 10 <= best.step <= 20 and best.score < 2e-3 * start
    (event,) = detector.events
    assert event["detail"].startswith("loss diverging")
    assert "floored at 0.1x the starting loss" in event["detail"]
    # The starting loss: the mean of the first 4 batches (32 samples).
    start_level = np.mean(detector.raw_losses[:4])
    assert start_level == pytest.approx(start * np.mean(0.64 ** np.arange(4)), rel=1e-3)
    # 20 losses after the best snapshot's, averaging 10x the floor (the
    # starting loss), long after they averaged 10x the best snapshot's loss.
    window = np.asarray(detector.raw_losses[-20:])
    assert window.mean() > start_level > window[:10].mean() > 10 * best.score
    assert 80 < detector.step < 140, detector.step
    # Stopped with the best snapshot's weights, not the last ones.
    assert model.evaluate(x, y, verbose=0) < best.score < 0.1 * window[-1]


def test_nan_batch_is_skipped_counted_and_training_goes_on():
    x, y = _data(160)
    x = x.copy()
    x[70] = np.nan  # batch 4 of 10 (batch size 16)
    model = deep_mlp(keras.optimizers.SGD(0.05), depth=2)
    detector = GradientExplosionDetector(verbose=0)
    history, messages = _quiet(
        model.fit,
        x,
        y,
        batch_size=16,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[detector],
    )
    assert detector.skipped_batches == 2  # once per epoch
    assert int(model.optimizer.steps_skipped_nonfinite.numpy()) == 2
    assert detector.rollbacks == 0 and detector.stopped_reason is None
    assert _finite(model)
    # The epoch loss excludes the skipped batch instead of turning NaN.
    assert all(math.isfinite(v) for v in history.history["loss"])
    assert history.history["skipped_batches"] == [1, 2]
    assert [e["kind"] for e in detector.events] == ["skipped_nonfinite"] * 2
    assert [e["step"] for e in detector.events] == [5, 15]


def test_skipped_step_does_not_score_the_pending_snapshot():
    # Snapshot of step 0: scored by steps 1-5. Snapshot of step 6: scored by
    # the next 5 healthy steps. An Inf input (NaN loss) at step 8 is skipped
    # and is not one of them (it used to give the snapshot a NaN score).
    x, y = _data(192)  # 12 batches of 16
    x = x.copy()
    x[7 * 16 + 3] = np.inf
    # No hidden ReLU (which maps NaN to 0): the logits, and so the loss, are NaN.
    model = deep_mlp(keras.optimizers.SGD(0.05), depth=0)
    detector = GradientExplosionDetector(check_every=1, snapshot_freq=5, verbose=0)
    _quiet(
        model.fit,
        x,
        y,
        batch_size=16,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[detector],
    )
    assert detector.skipped_batches == 1 and detector.rollbacks == 0
    assert math.isnan(detector.raw_losses[7])
    assert detector.snapshot.step == 6
    scoring = [detector.raw_losses[i] for i in (6, 8, 9, 10, 11)]  # steps 7, 9-12
    assert detector.snapshot.score == pytest.approx(np.mean(scoring), rel=1e-6)
    assert math.isfinite(detector.best.score)


def test_inf_batch_inside_a_multi_step_execution_is_skipped_counted_and_training_goes_on():
    # steps_per_execution=4: the detector runs once per 4 batches. An Inf
    # input gives a NaN loss, which Keras' running loss mean holds for the
    # rest of the epoch; the skip must still be seen (from the guard's
    # counter), counted, and kept out of the rules and of the epoch loss.
    x, y = _data(160)
    x = x.copy()
    x[70] = np.inf  # batch 4 of 10 (batch size 16): the second call
    model = deep_mlp(keras.optimizers.SGD(0.05), depth=2, steps_per_execution=4)
    detector = GradientExplosionDetector(verbose=0)
    history, _ = _quiet(
        model.fit,
        x,
        y,
        batch_size=16,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[detector],
    )
    assert int(model.optimizer.steps_skipped_nonfinite.numpy()) == 2
    assert detector.skipped_batches == 2
    assert detector.rollbacks == 0 and detector.stopped_reason is None
    assert _finite(model)
    assert all(math.isfinite(v) for v in history.history["loss"])
    assert history.history["skipped_batches"] == [1, 2]
    # Steps count batches (calls of 4, 4 and 2), not calls, and not Keras'
    # batch index of the short last call (11).
    assert detector.step == 20
    assert [(e["kind"], e["step"]) for e in detector.events] == [
        ("skipped_nonfinite", 8),
        ("skipped_nonfinite", 18),
    ]
    assert detector.events[0]["detail"] == "1 of the 4 steps of this call"


def test_all_nan_data_with_several_steps_per_execution_stops_with_last_good_weights():
    x, y = _data(160)
    x = np.full_like(x, np.nan)
    model = deep_mlp(keras.optimizers.SGD(0.05), depth=2, steps_per_execution=4)
    initial = [w.copy() for w in model.get_weights()]
    detector = GradientExplosionDetector(
        max_rollbacks=2, max_consecutive_skips=2, verbose=0
    )
    _quiet(model.fit, x, y, batch_size=16, epochs=5, verbose=0, callbacks=[detector])
    # Calls of 4, 4, 2 batches an epoch, every step skipped. The first two
    # calls: 4 in a row (more than 2) -> rollback, twice; the epoch's last
    # call makes 2 in a row, tolerated; the next epoch's first makes 6: stop.
    assert detector.rollbacks == 2 and model.stop_training
    assert detector.step == 14 and detector.skipped_batches == 14
    assert "6 non-finite steps in a row after 2 rollbacks" in detector.stopped_reason
    for w, w0 in zip(model.get_weights(), initial, strict=True):
        np.testing.assert_array_equal(w, w0)


def test_all_nan_data_stops_after_max_rollbacks_with_last_good_weights(tmp_path):
    x, y = _data(160)
    x = np.full_like(x, np.nan)
    model = deep_mlp(keras.optimizers.SGD(0.05), depth=2)
    initial = [w.copy() for w in model.get_weights()]
    path = os.path.join(tmp_path, "diagnostic.json")
    detector = GradientExplosionDetector(
        max_rollbacks=2, max_consecutive_skips=2, diagnostic_path=path, verbose=0
    )
    history, messages = _quiet(
        model.fit, x, y, batch_size=16, epochs=5, verbose=0, callbacks=[detector]
    )
    # Every step skipped: the epoch loss is NaN (never 0.0, which a tuner
    # minimising the loss would pick).
    assert history.history["loss"] and all(
        math.isnan(v) for v in history.history["loss"]
    )
    # 3 non-finite steps in a row -> the snapshot and the current weights
    # compared on the next batches, which are non-finite again (3 of 3):
    # rollback, twice; the third time it stops.
    assert detector.rollbacks == 2
    assert detector.step == 15 and model.stop_training
    rollbacks = [e for e in detector.events if e.get("action") == "rollback"]
    assert [e["step"] for e in rollbacks] == [6, 12]
    assert all(
        "the non-finite steps went on (3 of the next 3)" in e["detail"]
        for e in rollbacks
    )
    assert (
        "3 non-finite steps in a row after 2 rollbacks (max_rollbacks=2)"
        in detector.stopped_reason
    )
    stop = [m for m in messages if "stopped training" in m]
    assert stop and "Restored the best healthy weights (step 0)" in stop[0]
    assert path in stop[0]
    for w, w0 in zip(model.get_weights(), initial, strict=True):
        np.testing.assert_array_equal(w, w0)
    with open(path) as f:
        diagnostic = json.load(f)
    assert diagnostic["step"] == 15 and diagnostic["rollbacks"] == 2
    assert diagnostic["restored_step"] == 0
    assert len(diagnostic["loss_history"]) == 15
    norms = diagnostic["per_layer_grad_norms"]
    assert list(norms) == [layer.name for layer in model.layers]
    # NaN inputs: the first layer's kernel gradient is NaN (ReLU maps NaN to 0
    # in TensorFlow, so later layers can stay finite).
    assert norms[model.layers[0].name] == "nan"


def test_rollback_scales_a_schedule_instead_of_replacing_it():
    x, y = _data(256)
    schedule = keras.optimizers.schedules.ExponentialDecay(
        10.0, decay_steps=100, decay_rate=0.9
    )
    model = deep_mlp(keras.optimizers.SGD(schedule))
    detector = GradientExplosionDetector(
        snapshot_freq=5, lr_factor=0.1, skip_batches=1, verbose=0
    )
    model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[detector])
    lr = model.optimizer.inner_optimizer._learning_rate
    assert detector.rollbacks >= 1
    assert isinstance(lr, ScaledSchedule) and lr.schedule is schedule
    step = int(model.optimizer.iterations.numpy())
    # Lowered by 0.1 per rollback, or its cube root for a probe, a failed
    # recovery or a plateau after a rollback: at least one cube root.
    factor = float(np.asarray(lr.factor))
    assert factor <= 0.1 ** (1 / 3) * (1 + 1e-6)
    exponent = np.log(factor) / np.log(0.1)
    assert exponent * 3 == pytest.approx(round(exponent * 3), abs=1e-4)
    assert float(np.asarray(model.optimizer.learning_rate)) == pytest.approx(
        float(schedule(step)) * factor, rel=1e-5
    )
    assert _finite(model)


def test_stop_action_stops_at_first_problem_and_warn_only_warns():
    x, y = _data(256)
    model = deep_mlp(keras.optimizers.SGD(10.0))
    detector = GradientExplosionDetector(action="stop", verbose=0)
    _, messages = _quiet(
        model.fit, x, y, batch_size=32, epochs=2, verbose=0, callbacks=[detector]
    )
    assert detector.rollbacks == 0 and detector.stopped_reason
    assert model.stop_training and _finite(model)
    assert any("stopped training" in m for m in messages)

    model = deep_mlp(keras.optimizers.SGD(10.0))
    detector = GradientExplosionDetector(action="warn", verbose=0)
    _, messages = _quiet(
        model.fit, x, y, batch_size=32, epochs=1, verbose=0, callbacks=[detector]
    )
    assert detector.rollbacks == 0 and detector.stopped_reason is None
    assert any("GradientExplosionDetector at step" in m for m in messages)
    assert _finite(model)  # never ends a run with NaN weights


def test_snapshot_is_a_copy():
    model = deep_mlp(keras.optimizers.SGD(0.1), depth=1)
    model.optimizer.build(model.trainable_variables)
    snap = Snapshot(model)
    model.weights[0].assign(np.zeros(model.weights[0].shape))
    assert np.any(snap.weights[0] != 0)
    snap.restore(model)
    np.testing.assert_array_equal(np.asarray(model.weights[0]), snap.weights[0])


def test_a_snapshot_through_arrays_restores_the_same_values():
    # As a backup keeps it (`to_arrays`, `from_arrays`); an optimizer value
    # of another shape (an optimizer built on other variables) is left alone.
    model = deep_mlp(keras.optimizers.Adam(0.01), depth=2)
    x, y = _data(64)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    info, arrays = Snapshot(model, step=7, score=0.5).to_arrays()
    back = Snapshot.from_arrays(model, info, arrays)
    assert (back.step, back.score) == (7, 0.5)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    moved = optimizer_state_variables(model.optimizer)[-1]
    arrays["o" + str(len(back.optimizer_values) - 1)] = np.zeros((3, 3))
    odd = Snapshot.from_arrays(model, info, arrays)
    kept = moved.numpy()
    odd.restore(model)
    np.testing.assert_array_equal(moved.numpy(), kept)
    back.restore(model)
    for got, want in zip(Snapshot(model).weights, back.weights, strict=True):
        np.testing.assert_array_equal(got, want)
    # Weights of another shape: not this model's snapshot.
    arrays["w0"] = np.zeros((1, 1), "float32")
    assert Snapshot.from_arrays(model, info, arrays) is None


def test_snapshot_reads_every_value_bitwise_in_one_traced_call():
    model = deep_mlp(keras.optimizers.Adam(0.01), depth=2)
    x, y = _data(64)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    variables = list(model.weights) + optimizer_state_variables(model.optimizer)
    first = Snapshot(model)
    for got, v in zip(first.weights + first.optimizer_values, variables, strict=True):
        np.testing.assert_array_equal(got, v.numpy())
        assert got.dtype == v.numpy().dtype
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    second = Snapshot(model)  # the reader sees the new values
    assert not np.array_equal(second.weights[0], first.weights[0])
    np.testing.assert_array_equal(second.weights[0], model.weights[0].numpy())
    reader = snapshots._READERS[model][1]
    assert reader.experimental_get_tracing_count() == 1


def test_scaled_schedule_survives_keras_save_and_load(tmp_path):
    x, y = _data(256)
    schedule = keras.optimizers.schedules.ExponentialDecay(
        10.0, decay_steps=100, decay_rate=0.9
    )
    model = deep_mlp(keras.optimizers.SGD(schedule))
    detector = GradientExplosionDetector(
        snapshot_freq=5, lr_factor=0.1, skip_batches=1, verbose=0
    )
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[detector])
    assert detector.rollbacks >= 1
    assert detector._recovery is None  # a probe unfinished at the end is undone
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    inner = loaded.optimizer.inner_optimizer
    assert isinstance(inner._learning_rate, ScaledSchedule)
    factor = float(np.asarray(inner._learning_rate.factor))
    assert factor == pytest.approx(0.1 ** (detector.rollbacks + detector.lr_probes))
    np.testing.assert_allclose(
        loaded.predict(x[:8], verbose=0), model.predict(x[:8], verbose=0)
    )


def test_monitor_and_detector_share_raw_loss_across_a_skipped_nan_batch():
    from keras_stability.callbacks import GradientMonitor

    x, y = _data(160)
    x = x.copy()
    x[70] = np.nan  # batch 4 (0-based) of 10
    model = deep_mlp(keras.optimizers.SGD(0.05), depth=2)

    class TrueLoss(keras.callbacks.Callback):
        losses = []

        def on_train_batch_begin(self, batch, logs=None):
            s = slice(batch * 16, (batch + 1) * 16)
            self.losses.append(float(self.model.loss(y[s], self.model(x[s]))))

    truth = TrueLoss()
    detector = GradientExplosionDetector(verbose=0)
    monitor = GradientMonitor(verbose=0)
    _quiet(
        model.fit,
        x,
        y,
        batch_size=16,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[truth, detector, monitor],
    )
    # The NaN input gives NaN gradients (skipped); the detector removes that
    # batch from the epoch mean, and the raw losses after it must stay exact.
    # (Batch 4's own loss is NaN eagerly but may be finite in the compiled
    # step, where the fused ReLU maps NaN to 0, so it is not compared.)
    assert detector.skipped_batches == 1 and detector.events[0]["step"] == 5
    others = [i for i in range(10) if i != 4]
    np.testing.assert_allclose(
        np.asarray(monitor.raw_losses)[others],
        np.asarray(truth.losses)[others],
        rtol=1e-4,
    )
    np.testing.assert_allclose(detector.raw_losses, monitor.raw_losses)


def test_skip_action_guards_with_spike_skipping_and_stops_on_repeated_nan():
    x, y = _data(160)
    model = deep_mlp(keras.optimizers.SGD(0.05), depth=2)
    detector = GradientExplosionDetector(
        action="skip", max_consecutive_skips=2, verbose=0
    )
    x_nan = np.full_like(x, np.nan)
    initial = [w.copy() for w in model.get_weights()]
    _, messages = _quiet(
        model.fit, x_nan, y, batch_size=16, epochs=1, verbose=0, callbacks=[detector]
    )
    assert model.optimizer.skip_spikes is not None  # in-graph spike skipping on
    assert detector.step == 3 and detector.rollbacks == 0
    assert detector.stopped_reason == "3 non-finite steps in a row"
    for w, w0 in zip(model.get_weights(), initial, strict=True):
        np.testing.assert_array_equal(w, w0)


def test_healthy_training_to_a_tiny_heavy_tailed_loss_is_left_alone():
    # The Keras example on digits trained to a loss near 0.01, where single
    # batches reach 5x the median: the detector must not take this for a
    # divergence (it did once, at about step 935, rolling back 3 times and
    # stopping a healthy run).
    from keras_stability.datasets import load_dataset

    (x, y), _ = load_dataset("digits", seed=0)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(x.shape[1:]),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    detector = GradientExplosionDetector(verbose=0)
    history = model.fit(x, y, batch_size=32, epochs=30, verbose=0, callbacks=[detector])
    raw = np.asarray(detector.raw_losses[-450:])
    assert history.history["loss"][-1] < 0.02  # trained, not stalled
    # The heavy tail is there: one batch 10x another (what once counted as a
    # divergence from the best snapshot) and 5x the median.
    assert raw.max() > 10 * raw.min() and raw.max() > 5 * np.median(raw)
    assert detector.events == [] and detector.rollbacks == 0
    assert detector.stopped_reason is None
    assert detector.step == 30 * math.ceil(len(x) / 32)


def test_unwritable_diagnostic_path_is_a_value_error_when_training_starts(tmp_path):
    x, y = _data(32)
    blocker = os.path.join(tmp_path, "a_file")
    with open(blocker, "w") as f:
        f.write("not a directory")
    model = deep_mlp(keras.optimizers.SGD(0.05), depth=1)
    detector = GradientExplosionDetector(
        diagnostic_path=os.path.join(blocker, "sub", "d.json")
    )
    with pytest.raises(ValueError) as info:
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[detector])
    assert str(info.value).startswith(
        "Invalid value for argument `diagnostic_path`. Expected a path under a directory ("
    )
    assert model.optimizer.iterations.numpy() == 0  # refused before any step
    with pytest.raises(ValueError, match="a file path"):
        model.fit(
            x,
            y,
            epochs=1,
            verbose=0,
            callbacks=[GradientExplosionDetector(diagnostic_path=str(tmp_path))],
        )


def test_a_diagnostic_that_cannot_be_written_when_stopping_warns_and_fit_returns(
    tmp_path,
):
    x, y = _data(64)
    x = x.copy()
    x[40:] = np.nan  # batches 3 and 4: the detector stops at the first
    model = deep_mlp(keras.optimizers.SGD(0.05), depth=1)
    out = os.path.join(tmp_path, "out")
    os.makedirs(out)
    path = os.path.join(out, "diagnostic.json")

    class BreakTheFolder(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if os.path.isdir(
                out
            ):  # writable at the start, gone when the detector stops
                os.rmdir(out)
                with open(out, "w") as f:
                    f.write("now a file")

    detector = GradientExplosionDetector(
        action="stop", max_consecutive_skips=0, diagnostic_path=path
    )
    history, messages = _quiet(
        model.fit,
        x,
        y,
        batch_size=16,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[BreakTheFolder(), detector],
    )
    assert isinstance(history, keras.callbacks.History) and history.history["loss"]
    assert detector.stopped_reason is not None and detector.diagnostic["step"] == 3
    assert any(
        "could not write the diagnostic" in m and "diagnostic_path=" in m
        for m in messages
    )
    assert any(
        "stopped training" in m and "could not be written" in m for m in messages
    )
    assert _finite(model)


def _tiny_separable(seed, lr, batch_size, epochs, callbacks=()):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(256, 4)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int32")
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(2),
        ]
    )
    model.compile(
        keras.optimizers.Adam(lr),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(
        x, y, batch_size=batch_size, epochs=epochs, verbose=0, callbacks=list(callbacks)
    )
    return model.evaluate(x, y, verbose=0), model


@pytest.mark.parametrize("seed, lr", [(0, 1e-2), (1, 1e-3)])
def test_healthy_batch_size_1_run_is_left_alone_with_defaults(seed, lr):
    # A tiny MLP on separable data at batch size 1: single-sample losses and
    # gradient norms are heavy-tailed, and the loss nears zero. The detector
    # used to roll back (gradient-norm z > 6, "10x the best snapshot",
    # a regression judged on 5 single samples) and end up to 2x worse than
    # plain fit; with its defaults it must leave the run exactly as it is.
    plain, _ = _tiny_separable(seed, lr, 1, 2)
    detector = GradientExplosionDetector()
    (loss, model), messages = _quiet(
        _tiny_separable, seed, lr, 1, 2, callbacks=[detector]
    )
    assert detector.rollbacks == 0 and detector.stopped_reason is None
    assert not [e for e in detector.events if e["kind"] != "spike"]
    assert loss == pytest.approx(plain, rel=1e-5)
    assert detector.step == 512 and model.optimizer.iterations.numpy() == 512


def _blobs_batch_1(seed, lr, callbacks=()):
    # The battery's "tiny MLP, batch 1": two blobs 8 standard deviations
    # apart; within a few steps most single-sample losses are ~1e-4, with
    # an ordinary 0.05-0.5 one now and then.
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 240).astype("int32")
    x = rng.normal(size=(240, 2)).astype("float32") + 4.0 * (2 * y[:, None] - 1)
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(2),
        ]
    )
    model.compile(
        keras.optimizers.Adam(lr),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=1, epochs=2, verbose=0, callbacks=list(callbacks))
    return model.evaluate(x, y, verbose=0)


@pytest.mark.parametrize("lr", [1e-2, 1e-3])
def test_batch_1_loss_near_zero_in_the_first_steps_is_not_a_rising_loss(lr):
    # The battery's failing healthy run (seed 0): the loss falls to ~1e-4
    # within 10 steps, so the median of the first steps (before the z-score
    # can judge) is ~1e-4 and ordinary single-sample losses of 0.07-0.5 were
    # "300-400x" it: 4 such "spikes" among 8 steps read as a persistent rise
    # and rolled back at step 16 (3 rollbacks and a stop at 1e-2, held-out
    # loss 0.37 against 8.4e-5). Early spikes are now judged against the
    # starting loss too, and nothing below a tenth of it is a spike.
    plain = _blobs_batch_1(0, lr)
    detector = GradientExplosionDetector()
    loss, _ = _quiet(_blobs_batch_1, 0, lr, callbacks=[detector])
    assert _actions(detector) == []
    assert detector.rollbacks == 0 and detector.stopped_reason is None
    assert loss == pytest.approx(plain, rel=1e-5)
    assert detector.step == 480


def test_sgd_20_on_the_keras_example_is_rescued_with_default_arguments():
    # The demo's case: plain fit ends with NaN weights. With the defaults
    # (lr_factor 0.1) the detector rolls back once the loss climbs 4 steps in
    # a row, to 2.0, and the model learns (the test accuracy of plain fit at
    # the best of SGD 0.05-2.0 in the same 60 steps is 0.71; chance 0.1).
    from keras_stability.datasets import load_dataset
    from keras_stability.models import build_example_model
    from keras_stability.models import compile_example_model

    (x, y), (xt, yt) = load_dataset("synthetic", seed=0)
    x, y = x[:640], y[:640]

    def fit(callbacks):
        keras.utils.set_random_seed(1)
        model = build_example_model(x.shape[1], 10)
        compile_example_model(model, keras.optimizers.SGD(20.0))
        model.fit(x, y, batch_size=32, epochs=3, verbose=0, callbacks=callbacks)
        return model

    plain, _ = _quiet(fit, [])
    assert not _finite(plain)
    detector = GradientExplosionDetector()
    model, _ = _quiet(fit, [detector])
    assert _finite(model) and detector.stopped_reason is None
    assert 1 <= detector.rollbacks <= 2
    loss, accuracy = model.evaluate(xt, yt, verbose=0)
    assert accuracy > 0.5 and loss < 1.5, (loss, accuracy)


def test_early_spike_message_gives_the_ratio_to_the_median_not_a_zero_z_score():
    # Before `min_samples` steps there is no z-score: the message used to
    # say "z-score 0.0".
    x, y, start = _quadratic_problem()
    model = _linear(1.5)
    detector = GradientExplosionDetector(regress_factor=None, verbose=0)
    model.fit(
        x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[detector]
    )
    spike = detector.events[0]
    assert spike["kind"] == "spike" and spike["step"] == 4
    # Step 4's loss is 64x the first; the median of steps 1-3 is 4x.
    assert spike["detail"] == (
        f"loss spike: raw loss {64 * start:.4g} is 16x the median {4 * start:.4g} "
        "of the first 3 steps"
    )
    assert not any("z-score 0.0" in e["detail"] for e in detector.events)


def test_diagnostic_restored_loss_is_the_loss_measured_at_the_restored_weights(
    tmp_path,
):
    # The step-0 snapshot is never scored here (a spike comes before 5
    # healthy steps): the JSON said `restored_loss: "inf"` while the message
    # gave the restored weights' loss. Now both give the loss measured there.
    x, y, start = _quadratic_problem()
    model = _linear(1.5)
    path = os.path.join(tmp_path, "d.json")
    detector = GradientExplosionDetector(
        lr_factor=0.7,
        skip_batches=3,
        max_rollbacks=1,
        regress_factor=None,
        probe_lower_lr=False,
        diagnostic_path=path,
        verbose=0,
    )
    _, messages = _quiet(
        model.fit,
        x,
        y,
        batch_size=8,
        epochs=5,
        shuffle=False,
        verbose=0,
        callbacks=[detector],
    )
    assert detector.stopped_reason.startswith("recovery failed")
    with open(path) as f:
        diagnostic = json.load(f)
    assert diagnostic["restored_step"] == 0
    assert diagnostic["restored_loss"] == pytest.approx(start, rel=1e-5)
    assert f"restored weights' loss {start:.4g}" in detector.stopped_reason
    assert model.evaluate(x, y, verbose=0) == pytest.approx(start, rel=1e-5)


def test_nan_weights_before_fit_are_not_claimed_restored():
    # Nothing finite to go back to: the detector used to say it "restored the
    # healthy snapshot of step 0" and leave the NaN weights.
    x, y = _data(64)
    model = deep_mlp(keras.optimizers.SGD(0.05), depth=1)
    kernel = model.layers[0].kernel
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    detector = GradientExplosionDetector(verbose=0)
    _, messages = _quiet(
        model.fit, x, y, batch_size=16, epochs=3, verbose=0, callbacks=[detector]
    )
    # (TensorFlow's ReLU maps the NaN to 0: the loss and gradients stay
    # finite, training goes on, the kernel stays NaN.)
    assert any("non-finite before training starts" in m for m in messages)
    assert not any("restored the healthy snapshot" in m for m in messages)
    assert any(
        "training ended with non-finite weights, and no finite snapshot" in m
        for m in messages
    )
    assert detector.rollbacks == 0
    assert not _finite(model)  # honestly left as it was


def test_a_rollback_without_a_finite_snapshot_stops_and_says_so():
    x, y = _data(64)
    x = np.full_like(x, np.nan)
    model = deep_mlp(keras.optimizers.SGD(0.05), depth=1)
    kernel = model.layers[-1].kernel
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    detector = GradientExplosionDetector(verbose=0)
    _, messages = _quiet(
        model.fit, x, y, batch_size=16, epochs=3, verbose=0, callbacks=[detector]
    )
    assert detector.rollbacks == 0 and detector.step == 4
    assert detector.stopped_reason == (
        "4 non-finite steps in a row; no finite snapshot to roll back to (the "
        "weights were non-finite when `fit` started)"
    )
    assert any("No finite snapshot to restore" in m for m in messages)
    assert not any("Restored the" in m for m in messages)
    assert detector.diagnostic["restored_step"] is None


def test_verbose_messages_start_on_a_new_line_under_the_progress_bar(capsys):
    detector = GradientExplosionDetector(verbose=1)
    detector.set_params({"verbose": 1, "epochs": 1, "steps": 8})
    detector._say("GradientExplosionDetector at step 3: something.")
    assert (
        capsys.readouterr().out == "\nGradientExplosionDetector at step 3: something.\n"
    )
    detector.set_params({"verbose": 2, "epochs": 1, "steps": 8})  # one line per epoch
    detector._say("x")
    assert capsys.readouterr().out == "x\n"


def _keras_io_custom_train_step_model():
    """keras.io's lower-level custom `train_step`: its own `Mean` loss
    tracker, no compiled loss, the loss never passed through the optimizer."""
    import tensorflow as tf

    class CustomModel(keras.Model):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.loss_tracker = keras.metrics.Mean(name="loss")
            self.loss_fn = keras.losses.MeanSquaredError()

        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = self.loss_fn(y, self(x, training=True))
            trainable_vars = self.trainable_variables
            self.optimizer.apply(tape.gradient(loss, trainable_vars), trainable_vars)
            self.loss_tracker.update_state(loss)
            return {"loss": self.loss_tracker.result()}

        @property
        def metrics(self):
            return [self.loss_tracker]

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    model = CustomModel(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    return model


@pytest.mark.parametrize("nan_batch", [False, True])
def test_custom_train_step_without_a_compiled_loss_is_judged_on_the_norm(nan_batch):
    # Keras' loss tracker stays empty (its raw loss is NaN): every step used
    # to look non-finite, and the detector rolled back 3 times and stopped
    # at the initial weights. Now the per-step loss comes from the logged
    # running mean of the model's own tracker; NaN steps are still skipped.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 8)).astype("float32")
    y = x @ rng.normal(size=(8, 1)).astype("float32")
    if nan_batch:
        x[32:48] = np.nan  # batch 3 of 8
    plain = _keras_io_custom_train_step_model()
    plain_x = np.delete(x, np.s_[32:48], axis=0) if nan_batch else x
    plain_y = np.delete(y, np.s_[32:48], axis=0) if nan_batch else y
    plain.fit(plain_x, plain_y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    model = _keras_io_custom_train_step_model()
    detector = GradientExplosionDetector()
    _, messages = _quiet(
        model.fit,
        x,
        y,
        batch_size=16,
        epochs=3,
        shuffle=False,
        verbose=0,
        callbacks=[detector],
    )
    # The per-step loss is recovered from the model's own logged running mean
    # (`RawLossTracker.source == "logged_mean"`), so nothing is left unjudged.
    assert not any("no per-step loss is seen" in m for m in messages)
    # After the NaN batch, the model's own Mean stays NaN for the epoch: from
    # there the detector judges the gradient norm alone, and says so.
    poisoned = sum("own loss tracker is non-finite" in m for m in messages)
    assert poisoned == (1 if nan_batch else 0)
    assert detector.rollbacks == 0 and detector.stopped_reason is None
    assert detector.skipped_batches == (3 if nan_batch else 0)
    # The same updates as plain fit without the NaN batch.
    for w, w0 in zip(model.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_allclose(w, w0, rtol=1e-5, atol=1e-6)


def test_gan_needs_optimizer_argument_and_guards_the_named_optimizer():
    # keras.io's GAN: its own d_optimizer / g_optimizer, model.optimizer
    # unused. The detector raised "`skip_next` needs a built optimizer";
    # now it fails at the start of fit naming the optimizers, or guards the
    # one named, and its snapshots hold both optimizers' state.
    from keras_stability.optimizers import GuardedOptimizer
    from tests.callbacks.test_custom_training import _gan

    gan, data = _gan()
    with pytest.raises(ValueError, match="optimizer='d_optimizer'"):
        gan.fit(
            data,
            batch_size=8,
            epochs=1,
            verbose=0,
            callbacks=[GradientExplosionDetector()],
        )
    gan, data = _gan()
    detector = GradientExplosionDetector(optimizer="d_optimizer")
    history = gan.fit(data, batch_size=8, epochs=2, verbose=0, callbacks=[detector])
    # Its values under the optimizer's attribute (one detector per optimizer
    # would otherwise share `raw_loss`, `rollbacks`, `skipped_batches`).
    assert history.history["d_optimizer/rollbacks"] == [0, 0]
    assert history.history["d_optimizer/skipped_batches"] == [0, 0]
    # (NaN: this train_step's loss reaches neither Keras nor the guard.)
    assert len(history.history["d_optimizer/raw_loss"]) == 2
    assert not {"raw_loss", "rollbacks", "skipped_batches"} & set(history.history)
    assert isinstance(gan.d_optimizer, GuardedOptimizer)
    assert detector.optimizer is gan.d_optimizer and detector.step == 8
    assert int(gan.d_optimizer.step) == 8
    assert detector.rollbacks == 0 and detector.stopped_reason is None
    snapshot = Snapshot(gan)
    assert len({i for i, _ in snapshot.optimizer_paths}) >= 2  # d and g states
    before = [np.array(v) for v in gan.g_optimizer.variables]
    gan.fit(data, batch_size=8, epochs=1, verbose=0)
    snapshot.restore(gan)
    for v, b in zip(gan.g_optimizer.variables, before, strict=True):
        np.testing.assert_array_equal(np.array(v), b)
    assert (
        GradientExplosionDetector(optimizer="d_optimizer").get_config()["optimizer"]
        == "d_optimizer"
    )


def test_snapshots_of_many_models_do_not_warn_about_retracing():
    # A snapshot reader is traced once per model (a Keras Tuner search makes
    # a model per trial); TensorFlow must not call that excessive retracing.
    import logging

    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger("tensorflow")
    logger.addHandler(handler)
    try:
        for seed in range(7):
            Snapshot(deep_mlp(keras.optimizers.SGD(0.1), depth=1, seed=seed))
    finally:
        logger.removeHandler(handler)
    assert not [m for m in messages if "triggered tf.function retracing" in m]


def _poisoned_example(epochs, start=25, every=50, scale=1000.0):
    """The Keras example's data in order, one batch of 32 in `every` (from
    batch `start`) with its inputs times `scale` (a corrupt shard), and the
    same data without those batches."""
    from keras_stability.datasets import load_dataset

    (x, y), (xt, yt) = load_dataset("synthetic", seed=0)
    x = np.array(x, dtype="float32", copy=True)
    bad = np.zeros(len(x), bool)
    for batch in range(start, len(x) // 32, every):
        bad[batch * 32 : (batch + 1) * 32] = True
    clean = (x[~bad].copy(), y[~bad])
    x[bad] *= scale
    return (x, y), clean, (xt, yt), int(bad.sum()) // 32 * epochs


def _example_fit(x, y, epochs, callbacks=()):
    from keras_stability.models import build_example_model
    from keras_stability.models import compile_example_model

    keras.utils.set_random_seed(0)
    model = compile_example_model(
        build_example_model(x.shape[1], 10), keras.optimizers.Adam(1e-3)
    )
    model.fit(
        x,
        y,
        batch_size=32,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=list(callbacks),
    )
    return model


def test_poisoned_batches_are_skipped_in_graph_with_default_arguments():
    # A batch of inputs 1000x off in every epoch: plain fit applies it
    # (Adam's second moments then hold its squares for ~1000 steps) and ends
    # far above the run without those batches. The detector's guard skips
    # each such step in-graph (a gradient norm >= 10x the median of the
    # recent ones and 6 robust deviations above it): the weights end as the
    # clean run's, with no rollback (a single spike is no divergence).
    epochs = 3
    (x, y), (xc, yc), (xt, yt), poisoned = _poisoned_example(epochs)
    assert poisoned == 3
    plain = _example_fit(x, y, epochs)
    clean = _example_fit(xc, yc, epochs)
    detector = GradientExplosionDetector()
    model, _ = _quiet(_example_fit, x, y, epochs, [detector])
    assert int(model.optimizer.steps_skipped_spike.numpy()) == poisoned
    assert detector.rollbacks == 0 and detector.stopped_reason is None
    # The only actions: the in-graph skips, one per epoch.
    assert [kind for _, kind in _actions(detector)] == ["skipped_spike"] * poisoned
    assert detector.skipped_batches == detector.skipped_spikes == poisoned
    for w, wc in zip(model.get_weights(), clean.get_weights(), strict=True):
        np.testing.assert_allclose(w, wc, rtol=1e-5, atol=1e-6)
    loss = model.evaluate(xt, yt, verbose=0)[0]
    assert loss < 0.8 * plain.evaluate(xt, yt, verbose=0)[0]


def test_a_corrupt_batch_in_the_first_steps_is_skipped_in_graph_too():
    # The first bad batch at step 6, before the window has 20 norms: a norm
    # 100x the median of the first ones (1800x here) is skipped too, and its
    # loss is no explosion for the host (before: "no progress after an
    # explosion" at step 20, 3 rollbacks, a stop at 2.47 against plain fit's
    # 1.61).
    epochs = 2
    (x, y), (xc, yc), _, poisoned = _poisoned_example(epochs, start=5)
    assert poisoned == 2
    clean = _example_fit(xc, yc, epochs)
    detector = GradientExplosionDetector()
    model, _ = _quiet(_example_fit, x, y, epochs, [detector])
    assert int(model.optimizer.steps_skipped_spike.numpy()) == poisoned
    assert detector.rollbacks == 0
    assert [kind for _, kind in _actions(detector)] == ["skipped_spike"] * poisoned
    assert any(e["kind"] == "spike" and e["step"] == 6 for e in detector.events)
    for w, wc in zip(model.get_weights(), clean.get_weights(), strict=True):
        np.testing.assert_allclose(w, wc, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps_per_execution", [1, 5])
def test_a_spike_skipped_in_graph_counts_in_skipped_batches(steps_per_execution):
    # One batch of the stream has its inputs 1000x off (finite: a corrupt
    # shard). The guard skips it in-graph as a gradient-norm spike
    # (`steps_skipped_spike`); the detector's users read `skipped_batches`,
    # which counted only the non-finite skips: 0 here before. Now it counts
    # the spike skip too, with its own event kind (`"skipped_spike"`, as
    # `"skipped_nonfinite"`) and count (`skipped_spikes`).
    from keras_stability.models import build_example_model
    from keras_stability.models import compile_example_model

    (x, y), _, _, poisoned = _poisoned_example(1)
    assert poisoned == 1
    x, y = x[: 30 * 32], y[: 30 * 32]  # the bad batch is batch 25 (step 26)
    keras.utils.set_random_seed(0)
    model = compile_example_model(
        build_example_model(x.shape[1], 10), keras.optimizers.Adam(1e-3)
    )
    model.compile(
        model.optimizer,
        model.loss,
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    detector = GradientExplosionDetector()
    history, _ = _quiet(
        model.fit,
        x,
        y,
        batch_size=32,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[detector],
    )
    assert int(model.optimizer.steps_skipped_spike.numpy()) == 1
    assert detector.skipped_batches == 1 and detector.skipped_spikes == 1
    assert history.history["skipped_batches"] == [1]
    assert [e["step"] for e in detector.events if e["kind"] == "skipped_spike"] == [
        26 if steps_per_execution == 1 else 30
    ]
    assert detector.rollbacks == 0 and detector.stopped_reason is None


def test_sample_weights_rising_over_the_epoch_are_no_explosion():
    # A healthy run, `shuffle=False`, sample weights rising 20x over the
    # epoch: Keras' loss (the weighted sum over the batch size) rises with
    # them although the model improves. Before, the detector took that for
    # an explosion (2x the start, the lightly weighted first batch) and a
    # stall after it: "no progress after an explosion" at step 20, then 2
    # failed recoveries, 3 rollbacks. The rules now judge the loss per unit
    # of sample weight (the step's loss over the batch's mean weight).
    from keras_stability.datasets import load_dataset
    from keras_stability.models import build_example_model
    from keras_stability.models import compile_example_model

    (x, y), _ = load_dataset("synthetic", seed=0)
    x, y = x[:640], y[:640]
    weights = np.linspace(1.0, 20.0, len(x)).astype("float32")

    def fit(callbacks):
        keras.utils.set_random_seed(0)
        model = compile_example_model(
            build_example_model(x.shape[1], 10), keras.optimizers.Adam(1e-3)
        )
        history = model.fit(
            x,
            y,
            sample_weight=weights,
            batch_size=32,
            epochs=2,
            shuffle=False,
            verbose=0,
            callbacks=callbacks,
        )
        return model, history

    plain, plain_history = fit([])
    detector = GradientExplosionDetector()
    (model, history), _ = _quiet(fit, [detector])
    assert detector.rollbacks == 0 and detector.stopped_reason is None
    assert _actions(detector) == []
    for w, wp in zip(model.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_array_equal(w, wp)
    np.testing.assert_allclose(history.history["loss"], plain_history.history["loss"])
    # The raw loss the rules judge: the first batch's loss per unit weight
    # (its weights are about 1), not the weighted loss of the last batches.
    assert detector.raw_losses[-1] < 2 * detector.raw_losses[0]


def test_loss_spikes_that_kill_the_model_are_an_explosion():
    # The Keras example at SGD(5), batch 64, seed 0: the loss spikes to 18x,
    # 23x and 119x its start within 7 steps, the other steps' median stays
    # at 1.4x, and by step 12 the model is dead at the class prior (ln 10),
    # its gradient 0.1x the start. Before, no rule saw an explosion (the
    # median under 2x the start), so no stall either: the run ended at
    # chance, as plain `fit` does. The spikes now are the explosion.
    from keras_stability.datasets import load_dataset
    from keras_stability.models import build_example_model
    from keras_stability.models import compile_example_model

    (x, y), (xv, yv) = load_dataset("synthetic", seed=0)

    def fit(callbacks):
        keras.utils.set_random_seed(0)
        model = compile_example_model(
            build_example_model(x.shape[1], 10), keras.optimizers.SGD(5.0)
        )
        model.fit(x, y, batch_size=64, epochs=2, verbose=0, callbacks=callbacks)
        return model.evaluate(xv, yv, verbose=0)[0]

    chance = math.log(10)
    assert fit([]) > 0.95 * chance
    detector = GradientExplosionDetector()
    loss, _ = _quiet(fit, [detector])
    problems = [e for e in detector.events if e["kind"] == "problem"]
    # Seen at step 10, when the explosion leaves the stretch's median at
    # 1.4x the start (before, at step 20, as the stall after it, once its
    # window of 20 steps had filled); the snapshot (the weights `fit` started
    # from) and the current weights compared on the next 5 batches; rolled
    # back at step 15.
    assert [(e["step"], e["action"]) for e in problems] == [
        (10, "compare"),
        (15, "rollback"),
    ]
    assert problems[0]["detail"].startswith("loss exploded")
    assert [e["problem"] for e in problems] == ["exploded", "exploded"]
    assert "confirmed on the next 5 batches" in problems[1]["detail"]
    assert 0.5 < problems[1]["paired_ratio"] < 1.5
    assert detector.rollbacks == 1 and detector.stopped_reason is None
    # The comparison measured the restored weights: nothing skipped after.
    assert detector.skipped_requested == 0
    assert loss < 0.5 * chance
    # The rollback to step 0 abandons the spikes' updates: their batches
    # (Keras' batch = step - 1 in the first epoch) go on the exclude list.
    spikes = [e["step"] for e in detector.events if e["kind"] == "spike"]
    assert len(spikes) >= 2 and max(spikes) < 15
    assert detector.offending_batches == [(0, step - 1) for step in spikes]


def _seasonal_windows(seed, n=12000, seq=24, delay=36):
    # keras.io's weather forecaster in small: a seasonal series, windows
    # made by `timeseries_dataset_from_array` (unshuffled, as there). The
    # first batches sit where the season is near its mean, the later ones
    # far from it: their loss is no measure of the later ones'.
    features = make_seasonal_series(n, seed=seed)
    targets = features[delay:, 0]

    def windows(start, stop):
        return keras.utils.timeseries_dataset_from_array(
            features[:-delay][start:stop],
            targets[start:stop],
            sequence_length=seq,
            batch_size=256,
        )

    return windows(0, 9000), windows(9000, None)


def _seasonal_fit(callbacks, epochs=4):
    train, heldout = _seasonal_windows(0)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((24, 2)),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    model.fit(train, epochs=epochs, verbose=0, callbacks=callbacks)
    return (
        model.evaluate(heldout, verbose=0),
        float(model.optimizer.learning_rate.numpy()),
        model.get_weights(),
    )


class _ShadowProbe(keras.callbacks.Callback):
    """Keeps weak references to the detector's device copies of a snapshot."""

    def __init__(self, detector):
        super().__init__()
        self.detector = detector
        self.refs = []

    def on_train_batch_end(self, batch, logs=None):
        shadow = self.detector._shadows.get(self.model)
        if shadow is not None and not self.refs:
            self.refs = [weakref.ref(v.value) for v in shadow.variables.values()]


def test_a_rollback_the_data_explains_is_declined():
    # The loss of an unshuffled seasonal series rises 2-10x its first
    # batches' as the season moves, smoothly, with the gradient: an
    # explosion and a stall to the rules. Before, the detector rolled back
    # at once to the weights `fit` started from, and (the skipped batches
    # measuring them worse) undid it 5 steps later: those 5 batches were
    # lost to training. Now the snapshot and the current weights are
    # compared on the same next 5 batches while training goes on: the
    # snapshot scores 2.6x worse, the rise is the data's, no rollback is
    # made and the run is plain `fit`'s to the bit. The explosion at step 8
    # leaves the loss above its start, so it is compared at once (5 pairs
    # by step 15: the first comes at the host's next look), not at the
    # stall after it (step 20).
    plain, _, plain_weights = _seasonal_fit([], epochs=1)
    detector = GradientExplosionDetector(verbose=0)
    shadows = _ShadowProbe(detector)
    (loss, rate, weights), caught = _quiet(_seasonal_fit, [detector, shadows], epochs=1)
    assert _actions(detector) == [(8, "problem"), (15, "rollback_declined")]
    assert detector.events[0]["detail"].startswith("loss exploded")
    # The device copy of the snapshot's weights is not kept after `fit`.
    gc.collect()
    assert shadows.refs and not any(ref() is not None for ref in shadows.refs)
    assert detector._shadows[detector.model].variables == {}
    # Compared with the snapshot of step 0; nothing was restored.
    assert detector.events[0]["action"] == "compare"
    assert detector.events[0]["compared_step"] == 0
    assert "restored_step" not in detector.events[0]
    (declined,) = [e for e in detector.events if e["kind"] == "rollback_declined"]
    assert declined["paired_ratio"] > 1.5
    assert detector.rollbacks == 0 and detector.rollbacks_declined == 1
    assert detector.rollbacks_undone == 0 and detector.skipped_batches == 0
    assert detector.offending_batches == [] and detector.stopped_reason is None
    assert any("rollback declined" in message for message in caught)
    assert rate == pytest.approx(1e-3)
    assert loss == plain
    for a, b in zip(weights, plain_weights, strict=True):
        np.testing.assert_array_equal(a, b)


def _mirrored_seasonal_fits():
    # In a child with 2 logical CPU devices: plain `fit` and `fit` with the
    # detector, each under a MirroredStrategy over both.
    import tensorflow as tf

    results = []
    for callbacks in ([], [GradientExplosionDetector(verbose=0)]):
        with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
            (loss, _, weights), _ = _quiet(_seasonal_fit, callbacks, epochs=1)
        detector = callbacks[0] if callbacks else None
        results.append(
            {
                "loss": loss,
                "weights": weights,
                "actions": None if detector is None else _actions(detector),
                "declined": None if detector is None else detector.rollbacks_declined,
                "rollbacks": None if detector is None else detector.rollbacks,
            }
        )
    return results


def test_a_rollback_the_data_explains_is_declined_under_a_mirrored_strategy(
    two_cpu_devices,
):
    # The comparison under 2 replicas: each scores its half of the batch at
    # the snapshot, the mean over both is the global batch's loss (as the
    # step's own loss); the rise is the data's and the run is plain `fit`'s.
    plain, detected = two_cpu_devices(_mirrored_seasonal_fits)
    assert detected["actions"] == [(8, "problem"), (15, "rollback_declined")]
    assert detected["declined"] == 1 and detected["rollbacks"] == 0
    assert detected["loss"] == plain["loss"]
    for a, b in zip(detected["weights"], plain["weights"], strict=True):
        np.testing.assert_array_equal(a, b)


class OwnLossStep(keras.Sequential):
    """A compiled loss only `train_step` can compute (`compute_loss` refuses
    to run elsewhere): the step cannot score the snapshot on its own."""

    def train_step(self, data):
        self._in_step = True
        try:
            return super().train_step(data)
        finally:
            self._in_step = False

    def compute_loss(self, *args, **kwargs):
        if not getattr(self, "_in_step", False):
            raise RuntimeError("compute_loss outside train_step")
        return super().compute_loss(*args, **kwargs)


def test_a_model_the_step_cannot_score_rolls_back_at_once():
    # The comparison is traced in the middle of `fit`: a model whose loss
    # cannot be computed apart from its `train_step` gets none (no error),
    # and the rollback acts as without one (then is undone: the data's rise).
    train, _ = _seasonal_windows(0)
    keras.utils.set_random_seed(0)
    model = OwnLossStep(
        [
            keras.Input((24, 2)),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    detector = GradientExplosionDetector(verbose=0)
    _quiet(model.fit, train, epochs=1, verbose=0, callbacks=[detector])
    assert detector._shadows[model].failed.startswith("RuntimeError")
    # The explosion at 8: its comparison, tried at the next step, measures
    # nothing, so no rollback (a blind rollback this early cannot be told
    # from the data's rise). The stall at 20 rolls back at once, and the 5
    # skipped batches measure the restored weights: undone.
    assert _actions(detector) == [
        (8, "problem"),
        (20, "problem"),
        (25, "rollback_undone"),
    ]
    assert detector.events[0]["action"] == "none"
    assert detector.events[0]["detail"].startswith("loss exploded")
    assert detector.rollbacks == 0 and detector.rollbacks_undone == 1


def test_a_rollback_the_data_explains_is_undone_without_a_comparison():
    # Without a paired comparison (a custom `train_step` with no compiled
    # loss has none; forced off here), the rollback acts at once and the
    # batches skipped after it measure the restored weights on the data
    # that follows: 1.5x or more the loss of the weights left behind, so
    # the rise was the data's. The rollback is undone (those weights and
    # their rate back), and the rules that compare the loss with its start
    # or a snapshot stay off.
    plain, _, _ = _seasonal_fit([])
    detector = GradientExplosionDetector(verbose=0)
    detector._can_trial = lambda problem: False
    (loss, rate, _), caught = _quiet(_seasonal_fit, [detector])
    assert _actions(detector) == [(20, "problem"), (25, "rollback_undone")]
    assert detector.rollbacks == 0 and detector.rollbacks_undone == 1
    # Its abandoned spikes were kept after all: trained on, not excluded.
    assert detector.offending_batches == []
    assert detector.stopped_reason is None
    assert rate == pytest.approx(1e-3)
    (undone,) = [e for e in detector.events if e["kind"] == "rollback_undone"]
    assert undone["action"] == "undo" and undone["restored_step"] == 20
    assert any("rollback undone" in message for message in caught)
    # Only the 5 batches skipped to measure the restored weights differ.
    assert loss < 1.05 * plain


@pytest.mark.parametrize("monitor_first", [False, True])
def test_spike_skipping_whoever_made_the_guard_and_off_by_argument(monitor_first):
    # The guard skips spikes whether the detector or the monitor wrapped the
    # optimizer first; `skip_spikes=False` leaves it without; a guard with
    # its own spike skipping keeps it.
    from keras_stability.callbacks import GradientMonitor
    from keras_stability.clipping import RobustSpikeSkipping
    from keras_stability.clipping import SpikeSkipping
    from keras_stability.optimizers import GuardedOptimizer

    x, y = _data(64)

    def fit(optimizer, detector):
        model = deep_mlp(optimizer, depth=1)
        callbacks = [detector, GradientMonitor()]
        if monitor_first:
            callbacks.reverse()
        _quiet(model.fit, x, y, batch_size=16, epochs=1, verbose=0, callbacks=callbacks)
        return model.optimizer.skip_spikes

    spikes = fit(keras.optimizers.Adam(), GradientExplosionDetector())
    assert isinstance(spikes, RobustSpikeSkipping)
    assert spikes.get_config() == {
        "window": 128,
        "z_threshold": 6.0,
        "min_samples": 20,
        "max_consecutive": 3,
        "min_ratio": 10.0,
        "early_ratio": 100.0,
        "peak_ratio": 100.0,
    }
    assert (
        fit(keras.optimizers.Adam(), GradientExplosionDetector(skip_spikes=False))
        is None
    )
    assert (
        fit(keras.optimizers.Adam(), GradientExplosionDetector(action="warn")) is None
    )
    own = fit(
        GuardedOptimizer(keras.optimizers.Adam(), skip_spikes=True),
        GradientExplosionDetector(),
    )
    assert type(own) is SpikeSkipping


def test_adaptive_clipping_asking_for_spike_skipping_after_the_detector_keeps_its():
    # `skip_spikes=True` asks for spike skipping, not for settings: after
    # the detector's it is satisfied (before: a ValueError, "already a
    # GuardedOptimizer with skip_spikes=...").
    from keras_stability.callbacks import AdaptiveClipping
    from keras_stability.clipping import RobustSpikeSkipping

    x, y = _data(64)
    model = deep_mlp(keras.optimizers.Adam(), depth=1)
    callbacks = [GradientExplosionDetector(), AdaptiveClipping(1.0, skip_spikes=True)]
    _quiet(model.fit, x, y, batch_size=16, epochs=1, verbose=0, callbacks=callbacks)
    assert isinstance(model.optimizer.skip_spikes, RobustSpikeSkipping)
    assert model.optimizer.clipping is not None


def _as_plain_fit(fit):
    """`fit(callbacks)` with the default detector: no action, plain fit's weights.

    Returns the detector. Spike events (records, no action) are allowed.
    """
    detector = GradientExplosionDetector(verbose=0)
    plain, watched = fit([]), fit([detector])
    assert detector.rollbacks == 0 and detector.stopped_reason is None
    assert [e["kind"] for e in detector.events if e["kind"] != "spike"] == []
    for a, b in zip(plain.get_weights(), watched.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    return detector


def test_a_rare_class_at_batch_size_1_is_a_healthy_run():
    # 2% of the samples in a second class, batch size 1: once the common
    # class is fit, its losses are ~0.003 and a rare sample's ~5 (1000x).
    # The mean of 20 losses holding one of them was 10x the best snapshot's
    # (floored at a tenth of the starting loss), a "slow divergence": 4
    # rollbacks and a learning rate 1000x lower. The median of the 20 is no
    # divergence: the run is plain `fit`'s, weight for weight.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 10)).astype("float32")
    y = (rng.random(400) < 0.02).astype("int64")
    x[y == 1] += 2.0

    def fit(callbacks):
        keras.utils.set_random_seed(2)
        model = keras.Sequential(
            [
                keras.Input((10,)),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dense(2),
            ]
        )
        model.compile(
            keras.optimizers.Adam(1e-2),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        _quiet(model.fit, x, y, batch_size=1, epochs=1, verbose=0, callbacks=callbacks)
        return model

    _as_plain_fit(fit)


@pytest.mark.parametrize(
    "seed, batch, epochs, rare",
    [(0, 4, 2, 0.01), (1, 4, 1, 0.01), (1, 32, 1, 0.01), (2, 32, 1, 0.03)],
)
def test_fine_tuning_a_fit_model_on_a_new_rare_class_is_a_healthy_run(
    seed, batch, epochs, rare
):
    # A model fit on classes 0 and 2 (loss ~0.002) fine-tuned at batch size
    # 4 on data with 1% of a class 1 it never saw. A rare sample's loss (~5)
    # made the mean of 256 samples 2x the near-zero start, an "explosion"
    # (an explosion now raises the median), and the median of the next 20
    # losses stayed at the start (the classes already fit have nothing left
    # to learn): "no progress after an explosion", a rollback, the rate
    # lowered to 1e-9, the new class never learnt (held-out loss 5.9 against
    # plain fit's 0.22). Later the median of the fit classes' losses rises
    # 10x from 3e-4 to 3e-3 while the new class is learnt: no divergence
    # either, near zero (`rules.NEAR_ZERO`). Seed 1: the first two class-1
    # batches (steps 14 and 28) have norms of 5.4 and 5.8, 49x and 21x the
    # largest norm applied before them (the fit model's), and were skipped
    # in-graph as corrupt batches with a peak ratio of 10 (held-out loss
    # +7.6% in the battery); a corrupt batch is 650-1600x. Batch size 32: a
    # quarter of the batches hold a class-1 sample (loss ~0.3, 100x the
    # others): 4 of 8 steps were loss spikes, "loss rising", two rollbacks
    # in the first 17 steps; the others stay at the fit level: no rise
    # (`rules.rising`). A 3% class at batch size 32: 62% of the batches
    # hold one (0.5-1.0); the first 5 steps' median was 3 lucky ones without
    # (0.006), so the others were "100x" it, 7 of 8 steps "bad" and three
    # rollbacks; in the first steps a spike is now also 10x the start.
    rng = np.random.default_rng(1234)
    x0 = rng.normal(size=(2000, 10)).astype("float32")
    y0 = 2 * (rng.random(2000) < 0.5).astype("int64")
    x0[y0 == 2] -= 2.0
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2000, 10)).astype("float32")
    u = rng.random(2000)
    y = np.where(u < rare, 1, np.where(u < 0.5 + rare / 2, 0, 2)).astype("int64")
    x[y == 1] += 2.0
    x[y == 2] -= 2.0

    def fit(callbacks):
        keras.utils.set_random_seed(seed)
        model = keras.Sequential(
            [
                keras.Input((10,)),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dense(3),
            ]
        )
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        model.compile(keras.optimizers.Adam(1e-2), loss)
        model.fit(x0, y0, batch_size=32, epochs=5, verbose=0)
        model.compile(keras.optimizers.Adam(1e-3), loss)
        _quiet(
            model.fit,
            x,
            y,
            batch_size=batch,
            epochs=epochs,
            verbose=0,
            callbacks=callbacks,
        )
        return model

    _as_plain_fit(fit)


def test_a_second_fit_of_a_fit_model_is_a_healthy_run():
    # `fit` again on a model already fit (loss ~0.005): its losses near zero
    # jump 20-50x from one batch of 16 to the next (0.0006 -> 0.03), which
    # were loss spikes 10x the median of the first steps, four in a row a
    # rollback: 3 rollbacks, the rate 1e-3 of Adam's, the loss 2.6x plain
    # fit's. A loss of 0.1 or below is never a spike (`rules.SPIKE_FLOOR`).
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1000, 10)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    x[y == 1, 1] += 1.5

    def fit(callbacks):
        keras.utils.set_random_seed(2)
        model = keras.Sequential(
            [
                keras.Input((10,)),
                keras.layers.Dense(32, activation="relu"),
                keras.layers.Dense(2),
            ]
        )
        model.compile(
            keras.optimizers.Adam(1e-2),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(x, y, batch_size=16, epochs=5, verbose=0)
        _quiet(model.fit, x, y, batch_size=16, epochs=5, verbose=0, callbacks=callbacks)
        return model

    _as_plain_fit(fit)


@pytest.mark.parametrize("seed, batch_size, epochs", [(0, 8, 1), (2, 32, 5)])
def test_regression_with_heavy_tailed_noise_is_a_healthy_run(seed, batch_size, epochs):
    # Targets with Student-t noise of 2 degrees of freedom (infinite
    # variance): a few batches' squared errors are 10-100x the rest. At
    # batch size 8 the mean of a stretch of 256 samples reached 2x the
    # starting loss, an "explosion"; the model, still learning, was at its
    # start level: "no progress after an explosion", 3 rollbacks, the rate
    # 1e-6 of Adam's. An explosion raises the median of the stretch, not its
    # mean. At batch size 32 (seed 2) the median of 8 batches reached 2x the
    # first batch at step 57, the gradient norms rising with the squared
    # errors, and the run, still at its start level, rolled back 3 times
    # (23x plain fit's held-out error); that median was below the largest
    # of the 48 healthy batch losses before it (0.21x), where an explosion
    # rises above the run's past.
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2000, 5)).astype("float32")
    w = rng.normal(size=(5, 1))
    y = (x @ w + rng.standard_t(2, size=(2000, 1))).astype("float32")

    def fit(callbacks):
        keras.utils.set_random_seed(seed)
        model = keras.Sequential(
            [
                keras.Input((5,)),
                keras.layers.Dense(32, activation="relu"),
                keras.layers.Dense(1),
            ]
        )
        model.compile(keras.optimizers.Adam(1e-3), "mse")
        _quiet(
            model.fit,
            x,
            y,
            batch_size=batch_size,
            epochs=epochs,
            verbose=0,
            callbacks=callbacks,
        )
        return model

    detector = _as_plain_fit(fit)
    assert detector._history.exploded_at is None


def _huber_regression(batch_size):
    """`fit(callbacks)` of a Huber regression, 5% of the targets 20 off."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 8)).astype("float32")
    w = rng.normal(size=(8, 1))
    noise = 0.1 * rng.normal(size=(2000, 1)) + (rng.random((2000, 1)) < 0.05) * 20
    y = (x @ w + noise).astype("float32")

    def fit(callbacks):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(32, activation="relu"),
                keras.layers.Dense(1),
            ]
        )
        model.compile(keras.optimizers.Adam(1e-3), keras.losses.Huber())
        _quiet(
            model.fit,
            x[:1500],
            y[:1500],
            batch_size=batch_size,
            epochs=5,
            verbose=0,
            callbacks=callbacks,
        )
        return model

    return fit


def test_huber_regression_with_outlier_batches_is_a_healthy_run():
    # Batch 16: a batch holding an outlier has a loss ~1.2 and one without
    # ~0.04 (44% of them), so the median of 20 batch losses flips between
    # the two levels. The best snapshot's score, the mean of 5 steps, came
    # from 5 clean batches in a row (0.039); a later median of 1.23 was
    # "10x" it: a slow divergence, 2 rollbacks, the held-out error 2x plain
    # fit's. The reference is floored at the mean loss of the steps before
    # the best snapshot.
    detector = _as_plain_fit(_huber_regression(16))
    assert detector.best.typical > 10 * detector.best.score


def test_a_low_first_batch_is_no_explosion_when_the_gradient_stays_level():
    # Batch 64: the loss the fit started from is one batch (1.03), a low
    # draw of batch losses near 1.7 (each outlier adds ~0.3); 8 batches
    # later the median is 2.1, "2x the start", and the losses, never lower
    # than the outliers allow, moved 1.4-1.55x from step to step: "no
    # progress after an explosion", 3 rollbacks and a stop. Huber's gradient
    # is bounded: the largest norm of those 8 steps was 1.6x the first
    # step's, against 4.7-1400x in the battery's explosions.
    detector = _as_plain_fit(_huber_regression(64))
    assert detector._history.exploded_at is None


class _BatchLogs(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.skipped = []

    def on_train_batch_end(self, batch, logs=None):
        self.skipped.append(int(logs["skipped_batches"]))


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_every_step_the_guard_skips_counts_once_in_skipped_batches(
    steps_per_execution,
):
    # Four NaN batches in a row (steps 13-16 of each epoch) are a problem.
    # With one batch per call the snapshot and the current weights are
    # compared on the next batches, which are fine: the rollback is declined
    # (the NaNs were the data's). With two per call (no comparison) it rolls
    # back. Besides the four non-finite steps, the guard skips steps the
    # detector asked for (`steps_skipped_requested`): the `skip_batches`
    # updates after a rollback and, with one batch per call, the steps its
    # trip flag held back until the next look (steps 17-20 in the first
    # epoch; the look is at step 20). `skipped_batches` counted only the
    # non-finite and spike skips.
    x, y = _data(400)
    x = x.copy()
    x[12 * 16 : 16 * 16] = np.nan
    model = deep_mlp(
        keras.optimizers.SGD(0.05), depth=2, steps_per_execution=steps_per_execution
    )
    detector = GradientExplosionDetector(verbose=0)
    logged = _BatchLogs()
    history, _ = _quiet(
        model.fit,
        x,
        y,
        batch_size=16,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[detector, logged],
    )
    guard = model.optimizer
    nonfinite = int(guard.steps_skipped_nonfinite.numpy())
    requested = int(guard.steps_skipped_requested.numpy())
    spikes = int(guard.steps_skipped_spike.numpy())
    # One problem an epoch; in the first, with one batch per call, the
    # trip held 4 steps (17-20) before the look that found it.
    assert detector.stopped_reason is None
    if steps_per_execution == 1:
        assert detector.rollbacks == 0 and detector.rollbacks_declined == 2
        assert requested == 4
    else:
        assert detector.rollbacks == 2
        assert requested == 2 * detector.skip_batches
    assert nonfinite == 8  # the four NaN batches, in each epoch
    assert detector.skipped_batches == nonfinite + requested + spikes
    # By cause, each step once.
    assert detector.skipped_nonfinite == nonfinite
    assert detector.skipped_requested == requested
    assert detector.skipped_spikes == spikes
    kinds = [e["kind"] for e in detector.events]
    assert kinds.count("skipped_nonfinite") == nonfinite // steps_per_execution
    # One event a step, or a call (the 5 skipped steps span 3 calls of 2).
    assert kinds.count("skipped_requested") == (
        requested if steps_per_execution == 1 else 2 * 3
    )
    assert int(guard.step.numpy()) == 50  # every batch went through the guard
    assert history.history["skipped_batches"][-1] == detector.skipped_batches
    assert logged.skipped[-1] == detector.skipped_batches
    assert logged.skipped == sorted(logged.skipped)  # never counted back down


def test_a_rise_seen_at_a_step_that_is_no_spike_names_no_last_spike():
    # Adam(1.0) on the Keras example: "loss rising" is found at a step that
    # is not itself a loss spike; its message said "the last: None".
    from keras_stability.datasets import load_dataset
    from keras_stability.models import build_example_model
    from keras_stability.models import compile_example_model

    (x, y), _ = load_dataset("synthetic")
    keras.utils.set_random_seed(0)
    model = compile_example_model(build_example_model(), keras.optimizers.Adam(1.0))
    detector = GradientExplosionDetector()
    _quiet(model.fit, x[:640], y[:640], epochs=2, verbose=0, callbacks=[detector])
    problems = [e for e in detector.events if e["kind"] == "problem"]
    assert problems and problems[0]["problem"] == "rising"
    assert all("None" not in e["detail"] for e in detector.events)


def test_a_run_of_nan_batches_in_the_data_is_not_rolled_back_for():
    # 4 NaN-input batches in a row each epoch: the guard skips them (the
    # weights do not change) and the next batches score the current weights
    # finitely and no worse than the snapshot, so the escalation to a
    # rollback is declined. It rolled back to step 0 every epoch, cut the
    # rate 10x each time and ended at the untrained weights (loss 1.609).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(640, 10)).astype("float32")
    y = np.argmax(x @ rng.normal(size=(10, 5)), axis=1)
    x[64:192] = np.nan  # batches 2-5 of each epoch at batch size 32

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(5),
        ]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    untrained = model.evaluate(x[192:], y[192:], verbose=0)
    detector = GradientExplosionDetector()
    _quiet(model.fit, x, y, epochs=3, shuffle=False, verbose=0, callbacks=[detector])
    assert detector.rollbacks == 0 and detector.stopped_reason is None
    assert detector.rollbacks_declined == 3 and detector.skipped_nonfinite == 12
    declined = [e for e in detector.events if e["kind"] == "rollback_declined"]
    assert all("came from the data" in e["detail"] for e in declined)
    assert [e["problem"] for e in detector.events if e["kind"] == "problem"] == [
        "nonfinite_in_a_row"
    ] * 3
    assert float(np.asarray(model.optimizer.learning_rate)) == pytest.approx(1e-3)
    assert model.evaluate(x[192:], y[192:], verbose=0) < 0.9 * untrained


def test_nan_steps_from_exploded_weights_still_roll_back():
    # The other side of the comparison: weights an explosion broke score the
    # next batches non-finite, and the rollback goes on.
    x, y = _data(512)
    model = deep_mlp(keras.optimizers.SGD(10.0))
    detector = GradientExplosionDetector()
    _quiet(model.fit, x, y, batch_size=32, epochs=2, verbose=0, callbacks=[detector])
    assert detector.rollbacks >= 1 and _finite(model)


def test_a_nan_batch_under_mixed_precision_is_a_skipped_step():
    # Keras' LossScaleOptimizer skips the NaN batch's step itself, without
    # calling the guard inside it, whose values stayed the last step's: the
    # detector saw "non-finite loss (nan) or gradient norm (0.97)" and rolled
    # back to step 0 each epoch (3 rollbacks, the rate 1000x lower, accuracy
    # 0.22 where plain fit reaches 0.38).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(320, 10)).astype("float32")
    y = np.argmax(x @ rng.normal(size=(10, 5)), axis=1)
    x[64:96] = np.nan  # batch 2 of every epoch

    def fit(callbacks):
        keras.mixed_precision.set_global_policy("mixed_float16")
        try:
            keras.utils.set_random_seed(0)
            model = keras.Sequential(
                [
                    keras.Input((10,)),
                    keras.layers.Dense(32, activation="relu"),
                    keras.layers.Dense(5),
                    keras.layers.Activation("linear", dtype="float32"),
                ]
            )
            model.compile(
                "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            )
            history = model.fit(
                x, y, epochs=3, shuffle=False, verbose=0, callbacks=callbacks
            )
        finally:
            keras.mixed_precision.set_global_policy("float32")
        return model, history

    plain, _ = fit([])
    detector = GradientExplosionDetector()
    model, history = _quiet(fit, [detector])[0]
    assert detector.rollbacks == 0 and detector.stopped_reason is None
    assert detector.skipped_nonfinite == 3
    assert all(math.isfinite(v) for v in history.history["loss"])
    for a, b in zip(model.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
