"""Smoke test of the gradient-health battery (`benchmarks/battery.py`, issue #16).

One healthy and one diverging case, shrunk to a few steps, through the same
code as `python -m benchmarks.gradient_health --battery`; plus the verdicts
on hand-made rows.
"""

import dataclasses
import math

import numpy as np
import pytest

from benchmarks import battery


def _case(name):
    (case,) = [case for case in battery.cases() if case.name == name]
    return case


def test_every_kind_is_in_the_battery():
    kinds = [case.kind for case in battery.cases()]
    assert kinds.count("healthy") == 20
    assert kinds.count("diverging") == 11
    assert kinds.count("plateau") == 2
    for case in battery.cases():
        if case.kind == "diverging":
            assert case.grid, case.name


def test_poisoned_stream_scales_one_batch_in_50_and_clean_drops_it():
    x, y, xv, _ = battery._poisoned_stream(0)
    xc, yc, xvc, _ = battery._poisoned_stream(0, clean=True)
    batches = len(x) // 32
    big = np.abs(x).reshape(batches, -1).max(axis=1) > 100 * np.abs(xc).max()
    assert list(np.flatnonzero(big)) == list(range(25, batches, 50))
    assert len(xc) == len(x) - 32 * big.sum() and len(yc) == len(xc)
    np.testing.assert_array_equal(xv, xvc)


def test_one_healthy_and_one_diverging_run_give_full_rows(capsys):
    healthy = dataclasses.replace(_case("tiny MLP, batch 32, Adam(0.01)"), epochs=3)
    diverging = dataclasses.replace(
        _case("Keras example, SGD(20)"), epochs=1, grid=(0.1,)
    )
    rows = battery.run([healthy, diverging], seeds=1)
    assert [row["kind"] for row in rows] == ["healthy", "diverging"]
    for row in rows:
        for key in ("rollbacks", "stops", "skipped"):
            assert isinstance(row[key], int) and row[key] >= 0, key
        assert isinstance(row["passed"], bool)
        assert row["passed"] == (not row["failed"])
        assert row["seed"] == 0
    first, second = rows
    # Separable blobs: plain fit learns (well below chance, log 2).
    assert first["plain"] < 0.5 * math.log(2)
    assert first["best_lr"] is None and math.isnan(first["best"])
    # SGD(20) on the Keras example: plain fit ends with non-finite weights,
    # the grid's rate 0.1 trains.
    assert math.isnan(second["plain"])
    assert second["best_lr"] == 0.1
    assert second["best"] < math.log(10)
    assert second["chance"] == pytest.approx(math.log(10))
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("| tiny MLP, batch 32, Adam(0.01) | healthy | 0 |")
    assert printed[1].startswith("| Keras example, SGD(20) | diverging | 0 |")
    assert battery.summary(rows).startswith(
        f"Passed {sum(row['passed'] for row in rows)}/2 runs (healthy "
    )


def _row(**kwargs):
    row = {
        "plain": 1.0,
        "detector": 1.0,
        "best": 1.0,
        "chance": 2.3,
        "rollbacks": 0,
        "stops": 0,
    }
    row.update(kwargs)
    return row


@pytest.mark.parametrize(
    ("kind", "row", "failed"),
    [
        ("healthy", _row(detector=1.019), []),
        ("healthy", _row(detector=1.03), ["+3.0% vs plain"]),
        ("healthy", _row(rollbacks=1), ["rollback"]),
        ("healthy", _row(stops=1, detector=math.nan), ["stopped", "non-finite"]),
        ("plateau", _row(rollbacks=2, detector=0.9), []),
        ("plateau", _row(stops=1), ["stopped"]),
        ("diverging", _row(plain=math.nan, detector=1.04), []),
        ("diverging", _row(detector=1.06), ["+6.0% vs best"]),
        ("diverging", _row(detector=2.4, best=2.35), ["at chance"]),
        ("diverging", _row(detector=math.inf), ["non-finite"]),
    ],
)
def test_verdicts_follow_the_issue(kind, row, failed):
    case = dataclasses.replace(battery.cases()[0], kind=kind)
    assert battery.verdict(case, row) == (not failed, failed)


def test_a_previous_table_gives_plain_and_best_stable(tmp_path):
    path = tmp_path / "before.md"
    path.write_text(
        battery.HEADER
        + "\n| Keras example, SGD(20) | diverging | 1 | 3 | 1 | 0 | nan | 2.388 | "
        "0.5058 (0.1) | FAIL: at chance |\n"
        "| Keras example, Adam(1e-3) | healthy | 0 | 0 | 0 | 0 | 0.4681 | 0.4681 | "
        "- | pass |\nPassed 1/2 runs.\n"
    )
    reference = battery.read_reference(path)
    assert set(reference) == {
        ("Keras example, SGD(20)", 1),
        ("Keras example, Adam(1e-3)", 0),
    }
    plain, best, best_lr = reference["Keras example, SGD(20)", 1]
    assert math.isnan(plain) and best == 0.5058 and best_lr == 0.1
    plain, best, best_lr = reference["Keras example, Adam(1e-3)", 0]
    assert plain == 0.4681 and math.isnan(best) and best_lr is None
