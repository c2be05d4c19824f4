import functools

import numpy as np
import pytest

from tests import prefetch
from tests.callbacks import distributed_cases
from tests.helpers import run_in_subprocess

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


# Started when the session begins, beside the other modules' tests.
prefetch.register(
    __name__,
    "results",
    functools.partial(
        run_in_subprocess, distributed_cases.compare_all_cases, n_cpu_devices=2
    ),
)


@pytest.fixture(scope="module")
def results():
    return prefetch.result(__name__, "results")


@pytest.mark.parametrize("case", ["nan_shard", "rollback"])
def test_detector_takes_the_same_decision_on_every_replica(results, case):
    one, two = results[case]
    assert two["n_replicas"] == 2 and two["replicas_identical"]
    assert one["finite"] and two["finite"]
    # Same decisions as on one device for the same global batches.
    assert two["events"] == one["events"]
    assert two["rollbacks"] == one["rollbacks"] and two["skipped"] == one["skipped"]
    if case == "nan_shard":
        assert two["skipped"] == 1 and two["events"] == [(5, "skipped_nonfinite")]
    else:
        assert two["rollbacks"] >= 1
    for w1, w2 in zip(one["weights"], two["weights"], strict=True):
        np.testing.assert_allclose(w1, w2, rtol=1e-3, atol=1e-5)


def test_listed_batch_is_drawn_without_training_on_every_replica(results):
    # The NaN batch (replica 1's shard) listed in `exclude_batches_path`: it
    # is drawn from the distributed iterator without a step, on one device
    # and on two replicas alike.
    one, two = results["excluded"]
    assert two["n_replicas"] == 2 and two["replicas_identical"]
    for run in (one, two):
        assert run["finite"] and run["excluded"] == 1 and run["skipped"] == 0
        assert [kind for _, kind in run["events"] if kind != "spike"] == [
            "excluded_batch"
        ]
        assert run["steps_applied"] == 15  # 16 batches, one drawn only
    for w1, w2 in zip(one["weights"], two["weights"], strict=True):
        np.testing.assert_allclose(w1, w2, rtol=1e-3, atol=1e-5)


def test_vanishing_diagnosis_same_on_two_replicas(results):
    one, two = results["vanishing"]
    assert two["n_replicas"] == 2 and two["replicas_identical"]
    assert one["vanishing"] == two["vanishing"] and one["vanishing"][:5] == [
        0,
        1,
        2,
        3,
        4,
    ]
    np.testing.assert_allclose(one["norms"], two["norms"], rtol=1e-3)
