"""The gradient-health overhead variants build and train (`benchmarks/`).

`benchmarks.gradient_health` times, and `benchmarks.graph_ops` counts, the
same variants: one that no longer trains breaks both, and neither runs in
the suite otherwise.
"""

import numpy as np

from benchmarks import gradient_health
from benchmarks import graph_ops
from benchmarks.gradient_health import EVERY_MEDIAN
from benchmarks.gradient_health import GUARD_SPIKES
from benchmarks.gradient_health import NO_COND
from benchmarks.gradient_health import UNGATED_SPIKES


def test_every_overhead_variant_of_the_example_trains_and_counts_its_ops():
    counts = graph_ops.count("example")
    plain = len(counts["plain fit"])
    assert plain > 100
    # Every variant adds work to plain fit's step.
    for name, ops in counts.items():
        if name != "plain fit":
            assert len(ops) > plain, name
    guard = len(counts["GuardedOptimizer alone (no callback)"])
    # The reference without the skip `cond` measures what the guard does.
    assert len(counts[NO_COND]) <= guard
    assert not any(op == "If" for _, op in counts[NO_COND])
    assert any(op == "If" for _, op in counts["GuardedOptimizer alone (no callback)"])
    # Each callback adds to the guard it attaches; both add more than either.
    stack = len(counts["GradientMonitor() + GradientExplosionDetector() (defaults)"])
    detector = len(counts["detector only"])
    monitor = len(counts["monitor only (defaults)"])
    assert guard < monitor < stack and guard < detector < stack
    # The spike rule's reference takes the quartiles at every step: no `cond`
    # of its own, and the quartiles' sort among its ops; the rule has both.
    ungated = [op for _, op in counts[UNGATED_SPIKES]]
    gated = [op for _, op in counts[GUARD_SPIKES]]
    assert "StatelessIf" in gated and "StatelessIf" not in ungated
    assert ungated.count("If") == gated.count("If")
    assert "TopKV2" in ungated and "TopKV2" in gated


def test_the_every_median_reference_turns_the_host_gate_off():
    from keras_stability.diagnostics import rules

    assert rules.all_below([1.0, 2.0], 3.0)
    with gradient_health._burst_context(EVERY_MEDIAN):
        assert not rules.all_below([1.0, 2.0], 3.0)
    with gradient_health._burst_context(GUARD_SPIKES):
        assert rules.all_below([1.0, 2.0], 3.0)
    assert rules.all_below([1.0, 2.0], 3.0)


def test_the_guard_without_its_cond_applies_a_non_finite_step():
    import keras

    from benchmarks.gradient_health import _guard_without_cond

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(_guard_without_cond(keras.optimizers.SGD(0.1)), "mse")
    x = np.ones((4, 3), "float32")
    model.fit(x, np.ones((4, 1)), batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(model.get_weights()[0]).all()
    model.fit(x, np.full((4, 1), np.nan), batch_size=4, epochs=1, verbose=0)
    # The real guard would have skipped this step (tests/optimizers).
    assert np.isnan(model.get_weights()[0]).all()
    assert int(model.optimizer.steps_skipped_nonfinite.numpy()) == 1


def test_half_ffn_is_the_largest_2_block_ffn_at_half_the_parameters():
    from benchmarks import llm_compression as lc
    from keras_stability import pruning

    teacher = lc._char_lm(96, 0, **dict(lc.LM_SHAPE, hidden_dim=32))
    ffn = lc.half_ffn(teacher)
    half = lc.non_embedding_params(teacher) / 2

    def params(f):
        shrunk = pruning.shrink_transformer(teacher, num_layers=2, intermediate_dim=f)
        return lc.non_embedding_params(shrunk)

    assert params(ffn) <= half < params(ffn + 1)
    # The benchmark's LM: the `SHRUNK` shape.
    assert (
        lc.half_ffn(lc._char_lm(96, 0, **lc.LM_SHAPE)) == lc.SHRUNK["intermediate_dim"]
    )


def test_the_resume_benchmark_kills_and_resumes_a_run():
    from benchmarks import battery
    from benchmarks import resume

    (case,) = [c for c in battery.cases() if c.name == "Keras example, SGD(20)"]
    result = resume.run_case(case, 0, kills=(7, 1000), epochs=1)
    assert set(result) == {"alone", "backup", "longest_wait", 7, 1000}
    assert result["longest_wait"] > 0  # the backups wait while it rescues
    # Rescued, and resumed to the same model as the uninterrupted run.
    assert result["backup"] < 1.0  # chance: log(10) = 2.30
    assert result[7] == result["backup"]
    # A kill after the last batch (50 here) never happens: no resumed run.
    assert result[1000] is None


def test_the_self_trained_teacher_reads_only_the_labeled_rows(monkeypatch):
    import keras

    from benchmarks import llm_compression as lc

    monkeypatch.setitem(lc.SELF_TRAINING, "members", 2)
    monkeypatch.setitem(lc.SELF_TRAINING, "rounds", 1)
    monkeypatch.setitem(lc.SELF_TRAINING, "epochs", 1)
    monkeypatch.setitem(lc.SELF_TRAINING, "threshold", 0.0)  # every input
    rng = np.random.default_rng(0)
    x = rng.random((60, 64)).astype("float32")
    y = rng.integers(0, 10, 60)
    labeled = np.zeros(60, bool)
    labeled[:20] = True
    teacher = lc.self_trained_teacher(x, y, labeled, seed=0)
    # The other labels changed: the same teacher, to the last bit.
    other = np.where(labeled, y, (y + 1) % 10)
    again = lc.self_trained_teacher(x, other, labeled, seed=0)
    logits = teacher.predict(x, verbose=0)
    np.testing.assert_array_equal(logits, again.predict(x, verbose=0))
    # Its logits are the log of the members' mean probabilities.
    members = [layer for layer in teacher.layers if isinstance(layer, keras.Model)]
    assert len(members) == 2
    probs = np.mean(
        [
            keras.ops.convert_to_numpy(keras.ops.softmax(m(x, training=False)))
            for m in members
        ],
        0,
    )
    np.testing.assert_allclose(logits, np.log(probs + 1e-8), rtol=1e-5, atol=1e-5)
    # The labels it did read changed: another teacher.
    flipped = np.where(labeled, (y + 1) % 10, y)
    other_teacher = lc.self_trained_teacher(x, flipped, labeled, seed=0)
    assert not np.array_equal(logits, other_teacher.predict(x, verbose=0))
