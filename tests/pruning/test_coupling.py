"""The dependency graph behind `shrink_transformer`: which weight axes shrink together."""

import keras
import numpy as np

from keras_stability.pruning.coupling import AxisGroups
from keras_stability.pruning.coupling import trace_model


def test_products_unify_factor_by_factor_and_close_joins_equal_products():
    g = AxisGroups()
    heads, head_dim, merged = g.new(4), g.new(8), g.new(32)
    g.set_factors(merged, [heads, head_dim])
    other_heads, other_dim, other = g.new(4), g.new(8), g.new(32)
    g.set_factors(other, [other_heads, other_dim])
    # Joining two products joins their factors in order.
    g.union(merged, other)
    assert g.find(heads) == g.find(other_heads)
    assert g.find(head_dim) == g.find(other_dim)
    # Two axes that are products of the same groups are one axis.
    third = g.new(32)
    g.set_factors(third, [heads, head_dim])
    g.close()
    assert g.find(third) == g.find(merged)
    assert g.locate(merged, head_dim) == (4, 8, 1)
    assert g.locate(merged, heads) == (1, 4, 8)


def test_expand_keeps_whole_blocks_of_a_product():
    g = AxisGroups()
    kv, group, heads = g.new(3), g.new(2), g.new(6)
    g.set_factors(heads, [kv, group])
    kept = g.expand(heads, {g.find(kv): np.array([0, 2])})
    np.testing.assert_array_equal(kept, [0, 1, 4, 5])
    assert g.expand(group, {g.find(kv): np.array([0, 2])}) is None


def test_an_opaque_product_blocks_its_factors_but_not_the_reverse():
    g = AxisGroups()
    heads, head_dim, merged = g.new(4), g.new(8), g.new(32)
    g.set_factors(merged, [heads, head_dim])
    g.mark_opaque(head_dim, "op rope/split splits this axis")
    assert g.blocked(head_dim) == "op rope/split splits this axis"
    assert g.blocked(heads) is None  # RoPE on the head size leaves heads free
    g.mark_opaque(merged, "op concat concatenates along this axis")
    assert g.blocked(heads) == "op concat concatenates along this axis"


def _mlp_with_residual():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5, 6))
    h = keras.layers.Dense(6, name="proj")(inputs)
    r = keras.layers.Dense(10, activation="relu", name="up")(h)
    r = keras.layers.Dense(6, name="down")(r)
    h = keras.layers.Add()([h, r])
    h = keras.layers.LayerNormalization(name="norm")(h)
    heads = keras.layers.EinsumDense("btd,dnh->btnh", (5, 2, 3), name="heads")(h)
    flat = keras.layers.Reshape((5, 6))(heads)
    out = keras.layers.Dense(4, name="out")(flat)
    return keras.Model(inputs, out)


def test_trace_joins_residual_writers_and_keeps_inner_units_apart():
    model = _mlp_with_residual()
    trace = trace_model(model, np.zeros((2, 5, 6), "float32"))
    index = {v.path: i for i, v in enumerate(trace.variables)}

    def group(path, axis):
        return trace.group(index[path], axis)

    stream = group("proj/kernel", 1)
    # The residual sum joins what `proj` and `down` write, and what reads it.
    assert group("down/kernel", 1) == group("down/bias", 0) == stream
    assert group("norm/gamma", 0) == group("norm/beta", 0) == stream
    assert group("up/kernel", 0) == group("heads/kernel", 0) == stream
    # The FFN units: written by `up`, read by `down`, nothing else.
    units = group("up/kernel", 1)
    assert units == group("up/bias", 0) == group("down/kernel", 0) != stream
    assert {trace.variables[i].path for i, _, _ in trace.members(units)} == {
        "up/kernel",
        "up/bias",
        "down/kernel",
    }
    # `heads * head_dim` flattened into `out`: the rows of `out` are the
    # product of the two kernel axes, each a group of its own.
    n, h = group("heads/kernel", 1), group("heads/kernel", 2)
    assert n != h
    out_rows = trace.group(index["out/kernel"], 0)
    assert trace.groups.locate(out_rows, n) == (1, 2, 3)
    assert trace.groups.locate(out_rows, h) == (2, 3, 1)
    # The input features and the outputs are flagged; nothing is opaque.
    assert "input" in trace.flags(group("proj/kernel", 0))
    assert "output" in trace.flags(group("out/kernel", 1))
    assert trace.opaque_reason(stream) is None


def test_an_op_without_a_rule_makes_the_axes_it_touches_opaque():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5, 6))
    h = keras.layers.Dense(8, name="a")(inputs)
    h = keras.layers.Lambda(lambda t: keras.ops.flip(t, axis=-1), name="flip")(h)
    h = keras.layers.Dense(3, name="b")(h)
    model = keras.Model(inputs, h)
    trace = trace_model(model, np.zeros((2, 5, 6), "float32"))
    index = {v.path: i for i, v in enumerate(trace.variables)}
    reason = trace.opaque_reason(trace.group(index["a/kernel"], 1))
    assert reason is not None and "flip" in reason and "no coupling rule" in reason
