"""Cached teacher outputs: run the frozen teacher once, reuse it every epoch.

For data that fits in memory the teacher's outputs (logits and any hint
features) are computed once and packed next to the inputs. Keras' data
adapters then slice and shuffle inputs and cached outputs together, so each
batch still sees the teacher outputs of its own samples and an epoch costs
about what the student costs.
"""

import keras
import numpy as np
from keras import tree

from keras_stability._checks import check_positive_int
from keras_stability._checks import invalid

__all__ = [
    "CACHED_INPUTS_KEY",
    "CACHED_TEACHER_KEY",
    "compute_teacher_outputs",
    "is_cached_batch",
    "pack_cached",
    "split_cached",
]

CACHED_INPUTS_KEY = "keras_stability_inputs"
CACHED_TEACHER_KEY = "keras_stability_teacher_outputs"


def _is_in_memory(x):
    leaves = tree.flatten(x)
    return bool(leaves) and all(
        isinstance(leaf, np.ndarray)
        or (hasattr(leaf, "__array__") and hasattr(leaf, "shape"))
        for leaf in leaves
    )


def compute_teacher_outputs(teacher_fn, x, batch_size=256):
    """Runs `teacher_fn` over in-memory `x` in batches, in order.

    Args:
        teacher_fn: A `keras.Model` (the frozen teacher or its feature
            extractor); it is run with `predict`, in inference mode.
        x: NumPy arrays (or a nested structure of them), samples first.
        batch_size: Batch size of the single pass. Defaults to `256`.

    Returns:
        The teacher outputs as NumPy arrays, in the structure `teacher_fn`
        returns, one row per sample of `x`.

    Raises:
        ValueError: If `teacher_fn` is not a Keras model, `x` is not
            in-memory array data or `batch_size` is not a positive integer.
    """
    if not isinstance(teacher_fn, keras.Model):
        raise invalid("teacher_fn", teacher_fn, "a `keras.Model` (the teacher)")
    batch_size = check_positive_int("batch_size", batch_size)
    if not _is_in_memory(x):
        raise ValueError(
            "Invalid value for argument `x`. Expected in-memory arrays (NumPy "
            "or tensors) when caching teacher outputs; for a tf.data.Dataset, "
            "a generator or a PyDataset pass `cache_teacher_outputs=False`. "
            f"Received: x of type {type(x).__name__}"
        )
    outputs = teacher_fn.predict(x, batch_size=batch_size, verbose=0)
    return tree.map_structure(np.asarray, outputs)


def pack_cached(x, teacher_outputs):
    """Packs inputs and their cached teacher outputs into one `x` for `fit`."""
    return {CACHED_INPUTS_KEY: x, CACHED_TEACHER_KEY: teacher_outputs}


def is_cached_batch(x):
    """Whether `x` (a batch or the whole input) was made by `pack_cached`."""
    return isinstance(x, dict) and set(x) == {CACHED_INPUTS_KEY, CACHED_TEACHER_KEY}


def split_cached(x):
    """Returns `(inputs, teacher_outputs)`; `teacher_outputs` is None if not cached."""
    if is_cached_batch(x):
        return x[CACHED_INPUTS_KEY], x[CACHED_TEACHER_KEY]
    return x, None
