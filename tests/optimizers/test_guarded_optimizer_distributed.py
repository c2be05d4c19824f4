"""GuardedOptimizer under MirroredStrategy on 2 logical CPU devices."""

import functools
import tempfile

import numpy as np
import pytest

from tests import prefetch
from tests.helpers import run_in_subprocess
from tests.optimizers import distributed_cases

# Started when the session begins, beside the other modules' tests.
prefetch.register(
    __name__,
    "scenario_results",
    functools.partial(
        run_in_subprocess, distributed_cases.all_issue_scenarios, n_cpu_devices=2
    ),
)


@pytest.fixture(scope="module")
def scenario_results():
    return prefetch.result(__name__, "scenario_results")


@pytest.mark.distributed
def test_issue_scenario_every_policy_one_and_two_replicas(scenario_results):
    results = scenario_results
    for kind in ("global_norm", "autoclip", "zclip", "agc"):
        for n in (1, 2):
            weight, stats, iterations = results[(kind, n)]
            assert weight == pytest.approx(1.0, abs=1e-6), (kind, n, weight)
            # The statistics describe the all-reduced gradient on every replica count.
            assert stats["grad_norm"] == pytest.approx(10.5)
            assert stats["steps_clipped"] == 1
            assert stats["last_step_skipped"] == 0
            assert iterations == 1
    # Keras' own global_clipnorm clips per replica before the all-reduce: 1.5.
    weight, _, _ = results["keras_global_clipnorm"]
    assert weight == pytest.approx(1.5)


@pytest.mark.distributed
def test_nan_in_either_replica_skips_everywhere(scenario_results):
    results = scenario_results
    for nan_replica in (0, 1):
        weight, stats, iterations = results[("nan", nan_replica)]
        assert weight == 0.0
        assert stats["steps_skipped_nonfinite"] == 1
        assert stats["last_step_skipped"] == 1
        assert stats["step"] == 1
        assert iterations == 0


def _fit_cases():
    with tempfile.TemporaryDirectory() as tmp_dir:
        return run_in_subprocess(distributed_cases.fit_cases, tmp_dir, n_cpu_devices=2)


# Started when the session begins, beside the other modules' tests.
prefetch.register(__name__, "fit_results", _fit_cases)


@pytest.fixture(scope="module")
def fit_results():
    return prefetch.result(__name__, "fit_results")


@pytest.mark.distributed
@pytest.mark.slow
def test_fit_same_weights_on_one_and_two_replicas(fit_results):
    (w1, s1), (w2, s2) = fit_results["one_two"]
    assert s1["steps_clipped"] == s2["steps_clipped"] == 6
    assert s1["grad_norm"] == pytest.approx(s2["grad_norm"], rel=1e-5)
    for a, b in zip(w1, w2, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.distributed
@pytest.mark.slow
def test_observer_after_apply_and_callback_under_mirrored(fit_results):
    result = fit_results["observer_callback"]
    first, second = result["kernel_copies"]
    # after_apply re-applied the mask on every replica's copy.
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first[0], 0.0)
    assert np.all(first[1:] != 0.0)
    # observe saw the all-reduced, pre-clip norm (> the clip threshold of 1).
    assert (
        result["seen_norm"] == pytest.approx(result["grad_norm"])
        and result["seen_norm"] > 1
    )
    history = result["history"]
    assert history["clip_threshold"] == pytest.approx([0.5, 0.5])
    assert history["grad_norm"][-1] == pytest.approx(
        result["callback_stats"]["grad_norm"]
    )
    assert result["callback_stats"]["steps_clipped"] == 8


@pytest.mark.distributed
@pytest.mark.slow
def test_mixed_precision_nan_in_second_replica_is_skipped_and_saved(fit_results):
    result = fit_results["mixed"]
    assert result["outer"] == "LossScaleOptimizer"
    # LossScaleOptimizer checks replica 0 only and let the step through; the
    # guard saw the all-reduced NaN and skipped it on both replicas.
    assert result["unchanged"]
    stats = result["stats"]
    assert stats["step"] == 2 and stats["steps_skipped_nonfinite"] == 1
    assert result["loaded_inner"] == "GuardedOptimizer"
    assert result["loaded_stats"]["steps_skipped_nonfinite"] == 1


@pytest.mark.distributed
def test_step_loss_is_the_batch_loss_on_one_and_two_replicas():
    # Each replica sees half the batch and its loss divided by 2: the guard's
    # all-reduced step_loss is the whole batch's loss, as Keras' loss tracker.
    results = run_in_subprocess(
        distributed_cases.step_loss_one_and_two_replicas, n_cpu_devices=2
    )
    for n in (1, 2):
        losses = [loss for loss, _ in results[n]]
        assert [seen for _, seen in results[n]] == [1, 1, 1], n
        np.testing.assert_allclose(losses, results["expected"], rtol=1e-5)
