import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from keras_stability.pruning import masks
from tests.pruning.reference import tfmot_mask


def _weights(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


@pytest.mark.parametrize("shape", [(10,), (8, 6), (3, 3, 4, 5), (7, 13), (1, 1)])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.8, 0.9, 0.99])
def test_magnitude_mask_equals_tfmot(shape, sparsity):
    w = _weights(shape)
    ours = np.asarray(masks.magnitude_mask(w, sparsity))
    np.testing.assert_array_equal(ours, tfmot_mask(w, sparsity))
    assert ours.shape == shape and ours.dtype == np.float32


def test_magnitude_mask_rounds_half_to_even_and_keeps_ties_like_tfmot():
    # 10 * (1 - 0.25) = 7.5 -> 8 kept (half to even); 6 * 0.75 = 4.5 -> 4 kept.
    w = _weights((10,), seed=1)
    assert np.asarray(masks.magnitude_mask(w, 0.25)).sum() == 8
    w6 = _weights((6,), seed=2)
    assert np.asarray(masks.magnitude_mask(w6, 0.25)).sum() == 4
    # Ties at the threshold are all kept, as in TF-MOT.
    tied = np.array([0.5, -0.5, 0.5, 0.1, 0.2, -0.5], "float32")
    ours = np.asarray(masks.magnitude_mask(tied, 0.5))
    np.testing.assert_array_equal(ours, tfmot_mask(tied, 0.5))
    np.testing.assert_array_equal(ours, [1, 1, 1, 0, 0, 1])


@settings(max_examples=25, deadline=None)
@given(
    size=st.integers(1, 200),
    sparsity=st.floats(0.0, 0.99),
    seed=st.integers(0, 10_000),
)
def test_magnitude_mask_keeps_the_k_largest(size, sparsity, seed):
    w = np.random.default_rng(seed).permutation(size).astype("float32") + 1.0
    mask = np.asarray(masks.magnitude_mask(w, sparsity))
    k = max(int(np.round(np.float32(size) * np.float32(1 - np.float32(sparsity)))), 1)
    assert mask.sum() == k
    assert w[mask == 1].min() > (w[mask == 0].max() if k < size else 0)


@pytest.mark.parametrize("pooling", ["AVG", "MAX"])
@pytest.mark.parametrize("block_size", [(2, 3), (4, 1), (1, 2)])
def test_block_mask_equals_tfmot(pooling, block_size):
    w = _weights((8, 6), seed=3)
    ours = np.asarray(masks.block_magnitude_mask(w, 0.5, block_size, pooling))
    np.testing.assert_array_equal(ours, tfmot_mask(w, 0.5, block_size, pooling))
    # Whole blocks are zero or one.
    bh, bw = block_size
    blocks = ours.reshape(8 // bh, bh, 6 // bw, bw)
    assert np.all(blocks.min(axis=(1, 3)) == blocks.max(axis=(1, 3)))


def test_block_mask_pads_shapes_the_block_does_not_divide():
    w = _weights((5, 7), seed=4)
    mask = np.asarray(masks.block_magnitude_mask(w, 0.5, (2, 2), "AVG"))
    assert mask.shape == (5, 7)
    # 3 x 4 = 12 blocks, 6 kept.
    pooled = mask[::2, ::2]
    assert pooled.sum() == 6


def test_block_mask_rejects_other_ranks():
    with pytest.raises(ValueError, match="Expected a 2-D tensor for block sparsity"):
        masks.block_magnitude_mask(_weights((2, 2, 2)), 0.5, (2, 2))


@pytest.mark.parametrize("shape", [(8, 6), (3, 3, 8, 4)])
@pytest.mark.parametrize("m_by_n", [(2, 4), (1, 4), (3, 8)])
def test_m_by_n_mask_equals_tfmot(shape, m_by_n):
    w = _weights(shape, seed=5)
    ours = np.asarray(masks.m_by_n_mask(w, m_by_n))
    np.testing.assert_array_equal(ours, tfmot_mask(w, 0.5, m_by_n=m_by_n))


@pytest.mark.parametrize("shape", [(8, 6), (3, 3, 8, 4), (5, 12, 3)])
def test_2_by_4_zeroes_exactly_two_of_every_four_inputs(shape):
    w = _weights(shape, seed=6)
    mask = np.asarray(masks.m_by_n_mask(w, (2, 4)))
    groups = np.moveaxis(mask, -2, -1).reshape(-1, 4)
    assert np.all(groups.sum(axis=1) == 2)
    # The two kept are the two largest magnitudes of the group.
    mags = np.moveaxis(np.abs(w), -2, -1).reshape(-1, 4)
    assert np.all(
        mags[groups == 1].reshape(-1, 2).min(axis=1)
        > mags[groups == 0].reshape(-1, 2).max(axis=1)
    )


def test_m_by_n_errors():
    with pytest.raises(
        ValueError, match=r"Expected a pair of integers `\(m, n\)` with 0 < m < n"
    ):
        masks.m_by_n_mask(_weights((8, 4)), (4, 4))
    with pytest.raises(ValueError, match="Received: sparsity_m_by_n=3"):
        masks.validate_m_by_n(3)
    with pytest.raises(
        ValueError, match=r"Expected `n` to divide the input axis \(-2\)"
    ):
        masks.m_by_n_mask(_weights((6, 4)), (2, 4))


def test_global_masks_use_one_threshold():
    small = 0.1 * _weights((20, 10), seed=7)
    large = _weights((10, 5), seed=8)
    got = [np.asarray(m) for m in masks.global_magnitude_masks([small, large], 0.6)]
    assert got[0].shape == small.shape and got[1].shape == large.shape
    total = small.size + large.size
    assert sum(m.sum() for m in got) == round(total * 0.4)
    kept = np.concatenate([np.abs(small)[got[0] == 1], np.abs(large)[got[1] == 1]])
    dropped = np.concatenate([np.abs(small)[got[0] == 0], np.abs(large)[got[1] == 0]])
    assert kept.min() > dropped.max()
    # The small-weight layer loses more than the global fraction.
    assert 1 - got[0].mean() > 0.6 > 1 - got[1].mean()


def test_unit_scores():
    k = np.array([[1.0, -2.0], [-3.0, 0.0]], "float32")
    np.testing.assert_allclose(masks.unit_scores(k, "l1"), [4.0, 2.0])
    np.testing.assert_allclose(masks.unit_scores(k, "l2"), [np.sqrt(10), 2.0])


@pytest.mark.parametrize(
    "equation, axis",
    [
        ("abc,cde->abde", -3),  # MultiHeadAttention's query: (in, heads, head_dim)
        ("abcd,cde->abe", -2),  # its output: (heads, head_dim, out)
        ("btd,ndh->btnh", -2),  # keras-hub Gemma's query: (heads, in, head_dim)
        ("btnh,nhd->btd", -2),  # Gemma's output
        ("ab,bc->ac", -2),  # a Dense
        ("ab,c->abc", -2),  # nothing summed
    ],
)
def test_einsum_input_axis_is_the_last_summed_kernel_axis(equation, axis):
    assert masks.einsum_input_axis(equation) == axis


def test_m_by_n_mask_groups_along_the_given_axis():
    w = np.random.default_rng(0).normal(size=(8, 4, 3)).astype("float32")
    mask = np.asarray(masks.m_by_n_mask(w, (2, 4), axis=0))
    groups = np.moveaxis(mask, 0, -1).reshape(-1, 4)
    np.testing.assert_array_equal(groups.sum(axis=1), 2)
    # Each group keeps its 2 largest magnitudes along axis 0.
    top = np.argsort(-np.abs(np.moveaxis(w, 0, -1).reshape(-1, 4)), axis=1)[:, :2]
    kept = np.take_along_axis(groups, top, axis=1)
    np.testing.assert_array_equal(kept, 1)
