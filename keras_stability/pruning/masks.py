"""Mask maths for magnitude pruning: pure functions of weight tensors.

Nothing here knows about layers, models or training. The rules are TF-MOT's
(`pruning_impl.Pruning`) so that a mask computed here equals TF-MOT's for the
same weights and sparsity:

- keep the `k = max(round(size * (1 - sparsity)), 1)` largest magnitudes
  (`round` halves to even, as `tf.math.round`); every weight whose magnitude
  equals the k-th largest is kept too;
- block sparsity pools magnitudes over blocks of a 2-D weight first;
- N:M ("m by n") sparsity zeroes the `m` smallest of every `n` consecutive
  weights along the input axis (axis -2 of a Keras kernel, `(..., in, out)`).

All functions use `keras.ops`, so they run eagerly, under `tf.function`, XLA
and tf.distribute alike.
"""

import math

from keras import ops

from keras_stability._checks import check_choice
from keras_stability._checks import is_integer

__all__ = [
    "block_magnitude_mask",
    "einsum_input_axis",
    "global_magnitude_masks",
    "m_by_n_mask",
    "magnitude_mask",
    "unit_scores",
    "validate_m_by_n",
]


def _keep_count(size, sparsity):
    """`max(round(size * (1 - sparsity)), 1)` as int32, computed as TF-MOT does."""
    sparsity = ops.cast(sparsity, "float32")
    keep = ops.round(ops.cast(size, "float32") * (1.0 - sparsity))
    return ops.cast(ops.maximum(keep, 1.0), "int32")


def magnitude_mask(weights, sparsity):
    """Mask keeping the largest magnitudes of `weights`, TF-MOT's rule.

    Args:
        weights: Tensor of any shape.
        sparsity: Scalar in [0, 1), the fraction of weights to zero.

    Returns:
        Tensor like `weights` (same shape and dtype) of zeros and ones.

    Example:

    >>> import numpy as np
    >>> w = np.array([[0.1, -0.4], [0.3, -0.2]], "float32")
    >>> np.asarray(magnitude_mask(w, 0.5)).tolist()
    [[0.0, 1.0], [1.0, 0.0]]
    """
    weights = ops.convert_to_tensor(weights)
    shape = tuple(weights.shape)
    size = math.prod(shape)
    abs_weights = ops.abs(weights)
    flat = ops.reshape(abs_weights, [-1])
    k = _keep_count(size, sparsity)
    values, indices = ops.top_k(flat, k=size)
    threshold = ops.take(values, k - 1)
    position = ops.take(indices, k - 1)
    at_threshold = ops.equal(
        ops.arange(size, dtype="int32"), ops.cast(position, "int32")
    )
    mask = ops.logical_or(ops.greater_equal(flat, threshold), at_threshold)
    return ops.cast(ops.reshape(mask, shape), weights.dtype)


def global_magnitude_masks(weights_list, sparsity):
    """Masks ranking the magnitudes of several tensors together.

    One threshold for all tensors: the `round(total * (1 - sparsity))` largest
    magnitudes over the concatenation are kept, so layers with many small
    weights lose more of them than layers with few large ones.

    Args:
        weights_list: List of tensors.
        sparsity: Scalar in [0, 1), the overall fraction of weights to zero.

    Returns:
        List of masks, one per tensor, like `magnitude_mask`.
    """
    weights_list = [ops.convert_to_tensor(w) for w in weights_list]
    flat = ops.concatenate(
        [ops.reshape(ops.cast(w, "float32"), [-1]) for w in weights_list], axis=0
    )
    mask = magnitude_mask(flat, sparsity)
    masks, offset = [], 0
    for w in weights_list:
        size = math.prod(tuple(w.shape))
        part = ops.reshape(mask[offset : offset + size], tuple(w.shape))
        masks.append(ops.cast(part, w.dtype))
        offset += size
    return masks


def block_magnitude_mask(weights, sparsity, block_size, pooling_type="AVG"):
    """Magnitude mask over blocks of a 2-D weight.

    Magnitudes are pooled (mean or max) over `block_size` blocks, the blocks
    are ranked with `magnitude_mask`, and each block's mask is spread over its
    weights. A shape that the block does not divide is padded at the end; an
    average then counts only the real weights. (Masks equal TF-MOT's when the
    block divides the shape; otherwise TF-MOT's "SAME" pooling may pad at the
    start too and its blocks no longer line up with the weights.)

    Args:
        weights: 2-D tensor.
        sparsity: Scalar in [0, 1), the fraction of blocks to zero.
        block_size: Pair `(height, width)` of the blocks.
        pooling_type: `"AVG"` or `"MAX"`. Defaults to `"AVG"`.

    Returns:
        Tensor like `weights` of zeros and ones.

    Raises:
        ValueError: If `weights` is not 2-D.
    """
    weights = ops.convert_to_tensor(weights)
    if len(weights.shape) != 2:
        raise ValueError(
            "Invalid value for argument `weights`. Expected a 2-D tensor for "
            f"block sparsity. Received: weights with shape={tuple(weights.shape)}"
        )
    (h, w), (bh, bw) = tuple(weights.shape), tuple(block_size)
    ph, pw = -h % bh, -w % bw
    padding = [[0, ph], [0, pw]]
    abs_weights = ops.pad(ops.abs(ops.cast(weights, "float32")), padding)
    blocks = ops.reshape(abs_weights, [(h + ph) // bh, bh, (w + pw) // bw, bw])
    if pooling_type == "MAX":
        pooled = ops.max(blocks, axis=(1, 3))
    else:
        count = ops.reshape(
            ops.pad(ops.ones((h, w), "float32"), padding),
            [(h + ph) // bh, bh, (w + pw) // bw, bw],
        )
        pooled = ops.sum(blocks, axis=(1, 3)) / ops.sum(count, axis=(1, 3))
    block_mask = magnitude_mask(pooled, sparsity)
    mask = ops.repeat(ops.repeat(block_mask, bh, axis=0), bw, axis=1)[:h, :w]
    return ops.cast(mask, weights.dtype)


def m_by_n_mask(weights, m_by_n=(2, 4), axis=-2):
    """N:M mask: the `m` smallest of every `n` consecutive weights along the input axis.

    Groups run along `axis`, by default -2, the input axis of Keras kernels
    `(..., in, out)` (for a 2:4 mask on a Dense kernel: every 4 consecutive
    inputs of an output unit keep their 2 largest weights). This is TF-MOT's
    grouping. An `EinsumDense` kernel may have its input elsewhere: the query
    kernel of `MultiHeadAttention` is `(in, heads, head_dim)`, so its input
    axis is 0 (see `einsum_input_axis`).

    Args:
        weights: Tensor of rank >= 2 whose `axis` is divisible by `n`.
        m_by_n: Pair `(m, n)` with `0 < m < n`. Defaults to `(2, 4)`.
        axis: The input axis the groups run along. Defaults to `-2`.

    Returns:
        Tensor like `weights` of zeros and ones.

    Raises:
        ValueError: If `m_by_n` is invalid or `n` does not divide axis -2.
    """
    weights = ops.convert_to_tensor(weights)
    m, n = validate_m_by_n(m_by_n)
    shape = tuple(weights.shape)
    if len(shape) < 2 or shape[axis] % n:
        raise ValueError(
            "Invalid value for argument `sparsity_m_by_n`. Expected `n` to divide "
            f"the input axis ({axis}) of the weight. Received: "
            f"sparsity_m_by_n={tuple(m_by_n)} for a weight of shape={shape}"
        )
    moved = ops.moveaxis(ops.abs(weights), axis, -1)
    moved_shape = tuple(moved.shape)
    groups = ops.reshape(moved, [-1, n])
    _, indices = ops.top_k(groups, k=n - m)
    keep = ops.sum(ops.one_hot(indices, n, dtype="float32"), axis=-2)
    mask = ops.moveaxis(ops.reshape(keep, moved_shape), -1, axis)
    return ops.cast(mask, weights.dtype)


def einsum_input_axis(equation):
    """The input axis of an `EinsumDense` kernel, for N:M groups.

    The kernel's axes that are summed over (in the input's and the kernel's
    subscripts, not in the output's) are its input axes; the groups run
    along the last of them, as along axis -2 of a Dense kernel. For
    `MultiHeadAttention`'s query `"abc,cde->abde"` that is axis 0 of the
    `(in, heads, head_dim)` kernel, for its output `"abcd,cde->abe"` axis 1
    (head_dim) of `(heads, head_dim, out)`.

    Args:
        equation: The layer's einsum equation, `"<input>,<kernel>-><output>"`.

    Returns:
        The axis as a negative integer, or `-2` when the equation has no
        summed kernel axis.
    """
    inputs, output = equation.replace(" ", "").split("->")
    left, kernel = inputs.split(",")
    summed = [i for i, c in enumerate(kernel) if c in left and c not in output]
    if not summed:
        return -2
    return summed[-1] - len(kernel)


def validate_m_by_n(m_by_n):
    """Checks an `(m, n)` pair; returns it as a tuple of ints."""
    ok = (
        isinstance(m_by_n, (tuple, list))
        and len(m_by_n) == 2
        and all(is_integer(v) for v in m_by_n)
        and 0 < m_by_n[0] < m_by_n[1]
    )
    if not ok:
        raise ValueError(
            "Invalid value for argument `sparsity_m_by_n`. Expected a pair of "
            "integers `(m, n)` with 0 < m < n, e.g. (2, 4). Received: "
            f"sparsity_m_by_n={m_by_n!r}"
        )
    return int(m_by_n[0]), int(m_by_n[1])


def unit_scores(kernel, criterion="l1"):
    """Importance of each output unit (last axis) of a kernel.

    Args:
        kernel: Tensor `(..., in, out)`.
        criterion: `"l1"` (sum of magnitudes) or `"l2"` (Euclidean norm),
            reduced over every axis but the last. Defaults to `"l1"`.

    Returns:
        1-D tensor of length `out`.

    Raises:
        ValueError: If `criterion` is not `"l1"` or `"l2"`.
    """
    criterion = check_choice("criterion", criterion, ("l1", "l2"))
    kernel = ops.convert_to_tensor(kernel)
    axes = tuple(range(len(kernel.shape) - 1))
    if criterion == "l2":
        return ops.sqrt(ops.sum(ops.square(kernel), axis=axes))
    return ops.sum(ops.abs(kernel), axis=axes)
