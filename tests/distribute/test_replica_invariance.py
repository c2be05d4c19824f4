"""Replica invariance of every in-graph part, and the same parts under XLA.

For the same global batches, each part (each clipping policy, non-finite and
spike skip decisions, clipping and skipping with gradient accumulation,
pruning masks, pruning with a guarded optimizer, the Distiller) must give the
same weights on 1 device and under MirroredStrategy on 2 logical CPU devices. A third run compiles the train step with XLA
(`jit_compile=True`, the TPU path) on one device.
"""

import functools

import numpy as np
import pytest

from tests import prefetch
from tests.distribute.invariance_cases import CASES
from tests.distribute.invariance_cases import train_cases
from tests.helpers import run_in_subprocess
from tests.helpers import run_side_by_side

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _train_everywhere():
    # The three children are independent (own process, devices and temporary
    # folder): they run side by side instead of one after another.
    one, two, xla = run_side_by_side(
        functools.partial(run_in_subprocess, train_cases, n_cpu_devices=1, timeout=900),
        functools.partial(run_in_subprocess, train_cases, n_cpu_devices=2, timeout=900),
        functools.partial(
            run_in_subprocess,
            train_cases,
            n_cpu_devices=1,
            timeout=900,
            jit_compile=True,
        ),
    )
    return {"one": one, "two": two, "xla": xla}


# Started when the session begins, beside the other modules' tests.
prefetch.register(__name__, "runs", _train_everywhere)


@pytest.fixture(scope="module")
def runs():
    return prefetch.result(__name__, "runs")


def _assert_same_weights(a, b, rtol=1e-5, atol=1e-6):
    assert len(a) == len(b)
    for wa, wb in zip(a, b, strict=True):
        np.testing.assert_allclose(wa, wb, rtol=rtol, atol=atol)


@pytest.mark.parametrize("case", CASES)
def test_two_replicas_equal_one(runs, case):
    one, two = runs["one"][case], runs["two"][case]
    assert one["replicas"] == 1 and two["replicas"] == 2
    assert all(np.isfinite(w).all() for w in two["weights"])
    _assert_same_weights(one["weights"], two["weights"])
    np.testing.assert_allclose(one["loss"], two["loss"], rtol=1e-4)
    for key in (
        "steps_clipped",
        "steps_skipped_nonfinite",
        "steps_skipped_spike",
        "rollbacks",
        "learning_rate",
    ):
        if key in one["stats"]:
            assert one["stats"][key] == two["stats"][key], key
    for key in ("layer_grad_norms", "update_ratios", "raw_loss"):
        if key in one["stats"]:
            np.testing.assert_allclose(one["stats"][key], two["stats"][key], rtol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_xla_equals_graph(runs, case):
    one, xla = runs["one"][case], runs["xla"][case]
    _assert_same_weights(one["weights"], xla["weights"], rtol=1e-4, atol=1e-5)
    for key in ("layer_grad_norms", "update_ratios"):
        if key in one["stats"]:
            np.testing.assert_allclose(one["stats"][key], xla["stats"][key], rtol=1e-3)


def test_the_cases_really_act(runs):
    one = runs["one"]
    # Each guarded case took its action at least once, so equality above is not vacuous.
    assert one["global_norm"]["stats"]["steps_clipped"] > 0
    assert one["autoclip"]["stats"]["steps_clipped"] > 0
    assert one["zclip"]["stats"]["steps_clipped"] > 0
    assert (
        one["nonfinite_replica0"]["stats"]["steps_skipped_nonfinite"] == 3
    )  # once an epoch
    assert one["nonfinite_replica1"]["stats"]["steps_skipped_nonfinite"] == 3
    # 12 micro-batches, 3 of them NaN: 4 updates, every one clipped.
    assert one["accumulation"]["stats"]["steps_skipped_nonfinite"] == 3
    assert one["accumulation"]["stats"]["steps_clipped"] == 4
    assert one["spike"]["stats"]["steps_skipped_spike"] > 0
    assert len(one["monitor"]["stats"]["layer_grad_norms"]) == 3
    assert all(g > 0 for g in one["monitor"]["stats"]["layer_grad_norms"])
    assert one["detector"]["stats"]["rollbacks"] >= 1
    assert one["detector"]["stats"]["learning_rate"] < 5.0
    for case in ("pruning", "pruning_guarded"):
        kernels = [w for w in one[case]["weights"] if w.ndim == 2]
        sparsity = np.mean([np.mean(k == 0) for k in kernels])
        assert sparsity >= 0.49, (case, sparsity)
