"""Importance of heads, FFN units, hidden channels and blocks (Minitron's scores).

Pure functions over a `coupling.Trace` and calibration batches. A unit's
activation score is the mean over tokens of the L2 norm of its slice of the
activations that projections read along it: for a head, the attention output
the output projection reads (L2 over the head size); for an FFN unit, the
intermediate activation the down projection reads (its absolute value); for
a hidden channel, the norm outputs the projections read (absolute value).
Without data, a unit's score is the L2 norm of its slices of every weight in
its group.

Reference:
    Muralidharan et al., "Compact Language Models via Pruning and Knowledge
    Distillation" (Minitron), 2024, arXiv:2407.14679.
"""

import keras
import numpy as np
import tensorflow as tf

# Ops that only reshape or relabel: the scores read through them to the
# activation they come from (one score per activation, however many read it).
_PASS = ("Reshape", "Identity", "Cast", "ExpandDims", "Squeeze")


def magnitude_scores(trace, root):
    """L2 norm of each unit of group `root` over all its weight slices."""
    total = np.zeros(trace.groups.sizes[root])
    for vi, axis, (pre, size, post) in trace.members(root):
        w = np.asarray(trace.variables[vi].numpy(), "float64")
        w = np.moveaxis(w, axis, -1).reshape(-1, pre, size, post)
        total += (w**2).sum(axis=(0, 1, 3))
    return np.sqrt(total)


def consumers(trace, root):
    """Activations that projections read along group `root`: `(tensor, axis)`."""
    g = trace.groups
    found = {}
    for record in trace.contractions:
        t = record["activation"]
        for axis in record["contracted"]:
            e = trace.axes(t)[axis]
            if e is None or not g.contains(e, root):
                continue
            src, src_axis = t, axis
            while src.op.type in _PASS:
                inp = src.op.inputs[0]
                axes = [
                    i
                    for i, x in enumerate(trace.axes(inp) or [])
                    if x is not None and g.contains(x, root)
                ]
                if not axes or not trace.is_dependent(inp):
                    break
                src, src_axis = inp, axes[0]
            found[src.name] = (src, src_axis)
    return list(found.values())


def activation_scores(trace, roots, inputs):
    """Minitron's activation scores of the units of each group in `roots`.

    Args:
        trace: The `coupling.Trace` of the model.
        roots: Group roots to score.
        inputs: Calibration batches (each the model's input structure), of
            the batch shape the model was traced with.

    Returns:
        Dict root -> scores (one per unit).
    """
    g = trace.groups
    wanted = {r: consumers(trace, r) for r in roots}
    tensors = {t.name: t for items in wanted.values() for t, _ in items}
    names = list(tensors)
    fetch = trace.fetcher([tensors[n] for n in names])
    totals = {r: np.zeros(g.sizes[r]) for r in roots}
    for x in inputs:
        feeds = [
            tf.constant(a, dtype=f.dtype)
            for a, f in zip(tf.nest.flatten(x), trace.feeds, strict=True)
        ]
        values = [np.asarray(v, "float64") for v in fetch(*feeds)]
        values = dict(zip(names, values, strict=True))
        for r, items in wanted.items():
            for t, axis in items:
                pre, size, post = g.locate(trace.axes(t)[axis], r)
                a = np.moveaxis(values[t.name], axis, -1).reshape(-1, pre, size, post)
                totals[r] += np.sqrt((a**2).sum(-1)).mean(axis=(0, 1))
    return {r: totals[r] / max(len(inputs), 1) for r in roots}


def writer_norms(trace, hidden, var_block, n_blocks):
    """Per block, the L2 norm of its weights that write group `hidden`.

    The weights multiplied into the residual stream (attention output and
    FFN down projections): a block whose writers are zero is the identity.
    With `hidden=None` (no residual group found), all the block's
    projection weights count.
    """
    g = trace.groups
    scores = np.zeros(n_blocks)
    for record in trace.contractions:
        if hidden is not None and not any(
            g.contains(e, hidden) for e in record["free"]
        ):
            continue
        for vi in record["variables"]:
            k = var_block[vi]
            if k is not None:
                w = np.asarray(trace.variables[vi].numpy(), "float64")
                scores[k] += float((w**2).sum())
    return np.sqrt(scores)


def cosine_distances(root, block_io, inputs):
    """Minitron's block importance: mean of `1 - cos(input, output)` over tokens.

    Args:
        root: The functional model holding the blocks.
        block_io: Pairs of Keras tensors of `root` (a block's input, output).
        inputs: Calibration batches.

    Returns:
        One distance per pair.
    """
    probe = keras.Model(root.input, [t for pair in block_io for t in pair])
    distance = np.zeros(len(block_io))
    for x in inputs:
        values = [np.asarray(v, "float64") for v in probe(x, training=False)]
        for k in range(len(block_io)):
            a, b = values[2 * k], values[2 * k + 1]
            a = a.reshape(-1, a.shape[-1])
            b = b.reshape(-1, b.shape[-1])
            cos = (a * b).sum(-1) / (
                np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12
            )
            distance[k] += float((1.0 - cos).mean())
    return distance / max(len(inputs), 1)


def cross_entropy(logits, y, sample_weight=None):
    """Mean next-token cross-entropy of `logits` against `y` (weighted)."""
    logits = np.asarray(logits, "float64")
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(y)[..., None].astype("int64"), -1)[
        ..., 0
    ]
    if sample_weight is None:
        return float(nll.mean())
    return float((nll * sample_weight).sum() / max(sample_weight.sum(), 1e-12))
