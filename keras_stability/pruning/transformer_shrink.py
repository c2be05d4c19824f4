"""Structured pruning of transformer language models: heads, FFN units, hidden size, blocks.

`shrink_transformer` returns a new, smaller, ordinary Keras model with the
weights sliced in (Minitron's width and depth pruning); `shrink_transformer_plan`
returns what it would remove and the scores behind the choice.

Which weight axes shrink together is found from the model's traced graph
(`keras_stability.pruning.coupling`, after Torch-Pruning's DepGraph): the
hidden size is the one group of axes that runs through every block and the
embeddings (token and position embeddings, norms, the rows of every
projection that reads the residual stream and the columns of every one that
writes it, the output head or the tied embedding); an attention head is the
group of axes that stays separate in the query-key product (for
grouped-query attention, a key/value head with the query heads that share
it); an FFN unit is a group that one projection writes and another reads
inside a block, with only elementwise ops between (both input projections of
a gated FFN). Building the smaller model needs the model's constructor:
keras-hub `GPT2Backbone`, `GemmaBackbone` and `LlamaBackbone` (and a
`CausalLM` around one) are rebuilt from a smaller config; a functional model
of `StableTransformerBlock`s (`build_char_transformer`) is cloned with
smaller block configs.

Importance, with calibration `data` (Minitron): a head by the L2 norm of its
attention output, an FFN unit by the mean absolute value of its activation,
a hidden channel by the mean absolute value of the norm outputs that the
projections read, each averaged over tokens; a block by the cosine distance
between its input and output hidden states, or by the increase of the loss
when it is skipped. Without data: the L2 norm of each unit's weights, and
for a block the L2 norm of its weights that write the residual stream.

Removing units whose contribution is exactly zero leaves the logits as they
were. Removing hidden channels changes the statistics of the norms over the
hidden axis; their scales are multiplied by `sqrt(hidden / new_hidden)`,
which is exact for RMS normalization when the removed channels are zero (up
to the norm's epsilon, which is not rescaled) and approximate for
LayerNormalization (whose mean also changes).

Reference:
    Muralidharan et al., "Compact Language Models via Pruning and Knowledge
    Distillation" (Minitron), 2024, arXiv:2407.14679; Fang et al., "DepGraph:
    Towards Any Structural Pruning", CVPR 2023.
"""

import itertools
import math
import re

import keras
import numpy as np
import tensorflow as tf

from keras_stability import _keras_internals
from keras_stability._checks import check_choice
from keras_stability._checks import check_int
from keras_stability._checks import check_positive_int
from keras_stability._checks import invalid
from keras_stability.pruning import _transformer_families as families
from keras_stability.pruning import _transformer_importance as importance
from keras_stability.pruning.coupling import layer_of_op
from keras_stability.pruning.coupling import trace_model

__all__ = ["shrink_transformer", "shrink_transformer_plan"]

BLOCK_IMPORTANCE = ("cosine", "loss")
# Most block subsets `_Analysis.block_subsets_by_loss` builds and measures.
MAX_BLOCK_SUBSETS = 256


def shrink_transformer_plan(
    model,
    num_heads=None,
    intermediate_dim=None,
    hidden_dim=None,
    num_layers=None,
    data=None,
    block_importance="cosine",
    batch_size=16,
    keep_blocks=None,
):
    """What `shrink_transformer` would remove, with the scores behind it.

    Args:
        model: A keras-hub `GPT2Backbone`, `GemmaBackbone` or `LlamaBackbone`,
            a `CausalLM` around one, or a functional model of
            `StableTransformerBlock`s.
        num_heads: Query heads to keep in every block, or `None` to keep all.
            With grouped-query attention, a multiple of the query heads per
            key/value head. Defaults to `None`.
        intermediate_dim: FFN size to keep, in the model's own config terms
            (keras-hub's `intermediate_dim`; the block's FFN width for our
            blocks), or `None`. Defaults to `None`.
        hidden_dim: Hidden (residual stream) size to keep, or `None`.
            Defaults to `None`.
        num_layers: Blocks to keep, or `None`. Defaults to `None`.
        data: Calibration data, or `None` for weight-magnitude scores: the
            model's inputs `x` (an int array, or a dict such as keras-hub's
            `{"token_ids", "padding_mask"}`), or a tuple `(x, y)` or
            `(x, y, sample_weight)`; `y` is needed for
            `block_importance="loss"`. Defaults to `None`.
        block_importance: `"cosine"` (1 - cosine similarity of a block's
            input and output hidden states) or `"loss"` (increase of the
            next-token cross-entropy when the block is skipped; needs `y`).
            Used with `data`. Defaults to `"cosine"`.
        batch_size: Calibration batch size. Defaults to `16`.
        keep_blocks: Indices of the blocks to keep (e.g. `[0, 1]` to drop
            the last two of four), or `None` to rank them by
            `block_importance`. Distinct integers in `[0, blocks - 1]`, in
            any order (the kept blocks stay in the model's order); their
            count is `num_layers`, which may be left `None`. Defaults to
            `None`.

    Returns:
        Dict with `"importance"` (`"activation"` or `"magnitude"`),
        `"sizes"` (the new `num_heads`, `intermediate_dim`, `hidden_dim`,
        `num_layers`), `"original_sizes"`, `"blocks"` (`"names"`, `"scores"`
        (`None` with `keep_blocks`), `"keep"`), `"heads"` and
        `"intermediate"` (per block name: `"scores"` and sorted `"keep"`
        indices; a head unit is a key/value
        head with its query heads under grouped-query attention), and
        `"hidden"` (`"scores"`, `"keep"`). A lower score is removed first.

    Raises:
        ValueError: On a bad argument, a model of an unsupported kind, or a
            size that cannot shrink because an op the analysis cannot see
            through touches it (the message names the op and its layer).
    """
    requested = _check_sizes(num_heads, intermediate_dim, hidden_dim, num_layers)
    keep_blocks, requested["num_layers"] = _check_keep_blocks(keep_blocks, num_layers)
    analysis = _Analysis(model, data, block_importance, batch_size)
    keep_blocks = analysis.check_keep_blocks(keep_blocks)
    return analysis.plan(analysis.target_sizes(requested), keep_blocks)


def shrink_transformer(
    model,
    num_heads=None,
    intermediate_dim=None,
    hidden_dim=None,
    num_layers=None,
    data=None,
    block_importance="cosine",
    batch_size=16,
    keep_blocks=None,
):
    """A smaller copy of a transformer LM with the least important parts removed.

    Heads, FFN units, hidden channels and blocks are ranked as in
    `shrink_transformer_plan`; the model is rebuilt with the smaller sizes
    (a keras-hub backbone from its config with those sizes, wrapped back in
    its `CausalLM` if `model` was one; a functional model cloned with
    smaller block configs) and the kept weights are copied in. The result
    is an ordinary Keras model: it trains, saves to `.keras` and reloads
    with nothing but `keras_stability` / `keras_hub` imported. Fine-tune or
    distill it afterwards (Minitron's recipe).

    Args:
        model: See `shrink_transformer_plan`.
        num_heads: Query heads to keep per block, or `None`. Defaults to `None`.
        intermediate_dim: FFN size to keep (config terms), or `None`.
            Defaults to `None`.
        hidden_dim: Hidden size to keep, or `None`. Defaults to `None`.
        num_layers: Blocks to keep, or `None`. Defaults to `None`.
        data: Calibration data (see `shrink_transformer_plan`), or `None`
            for magnitude scores. Defaults to `None`.
        block_importance: `"cosine"` or `"loss"`. Defaults to `"cosine"`.
        batch_size: Calibration batch size. Defaults to `16`.
        keep_blocks: Indices of the blocks to keep, or `None` (see
            `shrink_transformer_plan`). Defaults to `None`.

    Returns:
        A new model of the same kind; `model` is left unchanged. It is not
        compiled.

    Raises:
        ValueError: See `shrink_transformer_plan`; also when the family's
            config cannot express the sizes (keras-hub's GPT-2 and Llama
            derive `head_dim = hidden_dim // num_heads`, so there heads and
            hidden size must shrink together).

    Example:

    ```python
    small = shrink_transformer(
        teacher, num_heads=2, intermediate_dim=128, data=x_calibration
    )
    small.compile(optimizer="adam", loss=...)
    small.fit(...)  # a short fine-tune, or distill from `teacher`
    ```
    """
    requested = _check_sizes(num_heads, intermediate_dim, hidden_dim, num_layers)
    keep_blocks, requested["num_layers"] = _check_keep_blocks(keep_blocks, num_layers)
    analysis = _Analysis(model, data, block_importance, batch_size)
    keep_blocks = analysis.check_keep_blocks(keep_blocks)
    return analysis.apply(analysis.plan(analysis.target_sizes(requested), keep_blocks))


def _check_sizes(num_heads, intermediate_dim, hidden_dim, num_layers):
    """Positive integers or `None` (the upper bounds are checked on the model)."""
    requested = {
        "num_heads": num_heads,
        "intermediate_dim": intermediate_dim,
        "hidden_dim": hidden_dim,
        "num_layers": num_layers,
    }
    for name, value in requested.items():
        check_positive_int(name, value, allow_none=True)
    return requested


def _check_keep_blocks(keep_blocks, num_layers):
    """`(keep_blocks, num_layers)`: sorted distinct ints and their count.

    The upper bound of the indices is checked on the model
    (`_Analysis.check_keep_blocks`).
    """
    if keep_blocks is None:
        return None, num_layers
    what = "a list of distinct non-negative integer block indices"
    try:
        values = list(keep_blocks)
    except TypeError:
        raise invalid("keep_blocks", keep_blocks, what) from None
    if not values or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values
    ):
        raise invalid("keep_blocks", keep_blocks, what)
    values = [int(v) for v in values]
    if min(values) < 0 or len(set(values)) != len(values):
        raise invalid("keep_blocks", keep_blocks, what)
    if num_layers is not None and num_layers != len(values):
        raise invalid(
            "num_layers",
            num_layers,
            f"`None` or the number of `keep_blocks` ({len(values)}: {values})",
        )
    return sorted(values), len(values)


# -- data ----------------------------------------------------------------------


def _split_data(data):
    if data is None:
        return None, None, None
    if isinstance(data, tuple):
        if not 1 <= len(data) <= 3:
            raise invalid(
                "data", f"tuple of {len(data)}", "x, (x, y) or (x, y, sample_weight)"
            )
        data = data + (None,) * (3 - len(data))
        x, y, sw = data
    else:
        x, y, sw = data, None, None
    try:
        x = tf.nest.map_structure(np.asarray, x)
    except (TypeError, ValueError):
        raise invalid("data", type(x).__name__, "arrays of token ids") from None
    leaves = tf.nest.flatten(x)
    if not leaves or any(a.ndim != 2 for a in leaves):
        raise invalid(
            "data",
            f"arrays of shapes {[a.shape for a in leaves]}",
            "inputs of shape (batch, sequence) (an array or a dict of arrays)",
        )
    n = leaves[0].shape[0]
    others = [a for a in (y, sw) if a is not None]
    others = [np.asarray(a) for a in others]
    if n < 1 or any(a.shape[0] != n for a in leaves + others):
        raise invalid(
            "data",
            "arrays of different lengths",
            "x, y and sample_weight of one length",
        )
    y = None if y is None else np.asarray(y)
    sw = None if sw is None else np.asarray(sw, "float32")
    return x, y, sw


def _batches(x, y, sw, batch_size):
    n = tf.nest.flatten(x)[0].shape[0]
    size = min(batch_size, n)
    out = []
    for start in range(0, n - size + 1, size):
        take = slice(start, start + size)
        out.append(
            (
                tf.nest.map_structure(lambda a, take=take: a[take], x),
                None if y is None else y[take],
                None if sw is None else sw[take],
            )
        )
    return out


def _sublayers(layer, seen=None):
    """Every Keras layer reachable through `layer`'s attributes (itself included)."""
    seen = set() if seen is None else seen
    if id(layer) in seen:
        return []
    seen.add(id(layer))
    found = [layer]
    for value in vars(layer).values():
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if isinstance(item, keras.layers.Layer):
                found.extend(_sublayers(item, seen))
    return found


def _one_plus_scale(layer):
    # Gemma's RMSNormalization multiplies by (1 + scale).
    return type(layer).__module__.startswith("keras_hub.src.models.gemma")


def _is_norm(layer):
    name = type(layer).__name__
    return "Normalization" in name or name.endswith("LayerNorm")


def _layer_hint(reason):
    """`" (in layer a/b)"` for a reason that names a graph op, else `""`."""
    match = re.match(r"op (\S+)", reason)
    return f" (in layer {layer_of_op(match.group(1))})" if match else ""


def _top(scores, n_keep):
    order = np.argsort(-np.asarray(scores), kind="stable")
    return np.sort(order[:n_keep])


# -- analysis ------------------------------------------------------------------


class _Analysis:
    """One model traced once: its groups, scores and the smaller model."""

    def __init__(self, model, data, block_importance, batch_size):
        self.family = families.detect(model)
        self.model = model
        self.block_importance = check_choice(
            "block_importance", block_importance, BLOCK_IMPORTANCE
        )
        self.batch_size = check_positive_int("batch_size", batch_size)
        x, y, sw = _split_data(data)
        if data is not None and self.block_importance == "loss" and y is None:
            raise invalid(
                "data",
                "inputs without labels",
                "(x, y) or (x, y, sample_weight) for block_importance='loss'",
            )
        self.batches = [] if x is None else _batches(x, y, sw, self.batch_size)
        sample = self.batches[0][0] if self.batches else self.family.sample_inputs()
        try:
            self.trace = trace_model(model, sample)
        except (ValueError, TypeError) as e:
            if not self.batches:
                raise
            raise invalid(
                "data",
                f"inputs of type {type(x).__name__}",
                f"inputs the model accepts (calling it on them raised: {e})",
            ) from e
        self._index = {id(v): i for i, v in enumerate(self.trace.variables)}
        self._find_groups()

    # -- groups ---------------------------------------------------------------

    def _find_groups(self):
        tr, g = self.trace, self.trace.groups
        blocks = self.family.blocks
        owner = {}
        for k, block in enumerate(blocks):
            for v in block.weights:
                owner[id(v)] = k
        self.var_block = [owner.get(id(v)) for v in tr.variables]
        roots = {}
        for vi in range(len(tr.variables)):
            for r in tr.variable_groups(vi):
                if r is not None:
                    roots.setdefault(r, set()).add(self.var_block[vi])
        # The residual stream: the one group in every block and outside them.
        spanning = [
            r
            for r, owners in roots.items()
            if set(range(len(blocks))) <= owners and None in owners
        ]
        self.hidden, self.hidden_problem = None, None
        if spanning:
            self.hidden = max(spanning, key=lambda r: len(tr.members(r)))
        else:
            # An op cut the stream in pieces; name it through the piece that
            # holds the embeddings and the most blocks.
            pieces = [
                r for r, owners in roots.items() if None in owners and len(owners) > 1
            ]
            best = max(pieces, key=lambda r: len(roots[r]), default=None)
            self.hidden_problem = (best is not None and tr.opaque_reason(best)) or (
                "no group of weight axes runs through the embeddings and every block"
            )
        attention_roots = set()
        head_candidates = set()
        for record in tr.attention:
            attention_roots |= record["batch"] | record["contracted"] | record["free"]
            for r in record["batch"]:
                if "input" in tr.flags(r):
                    continue
                kids = [k for k in g.children(r) if g.sizes[k] > 1]
                head_candidates.add(kids[0] if kids else g.find(r))
        self.heads = {}
        for unit in head_candidates:
            owners = {self.var_block[vi] for vi, _, _ in tr.members(unit)}
            if len(owners) == 1 and None not in owners:
                self.heads.setdefault(owners.pop(), []).append(unit)
        self.ffn = {}
        for r, owners in roots.items():
            if r == self.hidden or len(owners) != 1 or None in owners:
                continue
            if g.sizes[r] <= 1 or tr.flags(r) or tr.opaque_reason(r):
                continue
            if any(g.contains(r, a) or g.contains(a, r) for a in attention_roots):
                continue
            if any(g.contains(r, h) or g.contains(h, r) for h in head_candidates):
                continue
            self.ffn.setdefault(next(iter(owners)), []).append(r)
        sizes = dict(self.family.sizes)
        if sizes["hidden_dim"] is None:
            sizes["hidden_dim"] = int(self.family.block_io(blocks[0])[0].shape[-1])
        self.sizes = sizes

    def check_keep_blocks(self, keep_blocks):
        """`keep_blocks` (sorted, distinct) checked against the model's blocks."""
        n = len(self.family.blocks)
        if keep_blocks is not None and max(keep_blocks) >= n:
            raise invalid(
                "keep_blocks",
                keep_blocks,
                f"distinct block indices in [0, {n - 1}] (the model has {n} blocks)",
            )
        return keep_blocks

    def _unit(self, table, k, what, argument, value):
        """The one group of heads (or FFN units) of block `k`."""
        units = table.get(k, [])
        if len(units) != 1:
            name = self.family.blocks[k].name
            raise invalid(
                argument,
                value,
                f"a model whose block {name!r} has one group of {what} "
                f"(found {len(units)})",
            )
        return units[0]

    def target_sizes(self, requested):
        """The new sizes: `requested`, with `None` meaning unchanged, checked."""
        out = {}
        for name, value in requested.items():
            current = self.sizes[name]
            if value is None:
                if current is None:
                    raise invalid(
                        name, None, "a value: the blocks of this model differ in it"
                    )
                out[name] = current
                continue
            what = (
                "a positive integer"
                if current is None
                else f"an integer in [1, {current}] (at most the model's {current})"
            )
            out[name] = check_int(name, value, low=1, high=current, what=what)
        self.family.check(out)
        self._check_shrinkable(out)
        return out

    def _check_shrinkable(self, sizes):
        tr = self.trace
        checks = []
        if sizes["hidden_dim"] < self.sizes["hidden_dim"]:
            if self.hidden is None:
                raise invalid(
                    "hidden_dim",
                    sizes["hidden_dim"],
                    f"the current size ({self.sizes['hidden_dim']}): the hidden size "
                    f"cannot shrink because {self.hidden_problem}"
                    f"{_layer_hint(self.hidden_problem)}",
                )
            checks.append(("hidden_dim", self.hidden, "hidden size"))
        for k in range(len(self.family.blocks)):
            if sizes["num_heads"] < self.sizes["num_heads"]:
                checks.append(
                    (
                        "num_heads",
                        self._unit(
                            self.heads,
                            k,
                            "attention heads",
                            "num_heads",
                            sizes["num_heads"],
                        ),
                        "heads",
                    )
                )
            if sizes["intermediate_dim"] < self.sizes["intermediate_dim"]:
                checks.append(
                    (
                        "intermediate_dim",
                        self._unit(
                            self.ffn,
                            k,
                            "FFN units",
                            "intermediate_dim",
                            sizes["intermediate_dim"],
                        ),
                        "FFN units",
                    )
                )
        for name, root, what in checks:
            reason = tr.opaque_reason(root)
            if reason is None and "input" in tr.flags(root):
                reason = "it reaches the model's inputs"
            if reason:
                raise invalid(
                    name,
                    sizes[name],
                    f"the current size ({self.sizes[name]}): the {what} cannot "
                    f"shrink because {reason}{_layer_hint(reason)}",
                )
        heads = (
            self.family.head_units(self.sizes["num_heads"])
            if self.sizes["num_heads"]
            else None
        )
        for k in range(len(self.family.blocks)):
            for table, expected, what in (
                (self.heads, heads, "head units"),
                (
                    self.ffn,
                    self.family.ffn_units(self.sizes["intermediate_dim"] or 0),
                    "FFN units",
                ),
            ):
                units = table.get(k, [])
                if (
                    len(units) == 1
                    and expected
                    and tr.groups.sizes[units[0]] != expected
                ):
                    raise invalid(
                        "model",
                        self.model.name,
                        f"{expected} {what} in block {self.family.blocks[k].name!r} "
                        f"as its config says (the graph shows {tr.groups.sizes[units[0]]})",
                    )

    # -- scores ---------------------------------------------------------------

    def _block_scores(self):
        blocks = self.family.blocks
        if not self.batches:
            return importance.writer_norms(
                self.trace, self.hidden, self.var_block, len(blocks)
            )
        if self.block_importance == "loss":
            return self._loss_block_scores()
        return importance.cosine_distances(
            self.family.root,
            [self.family.block_io(b) for b in blocks],
            [x for x, _, _ in self.batches],
        )

    def _loss(self, model):
        total = 0.0
        for x, y, sw in self.batches:
            logits = _keras_internals.to_numpy(model(x, training=False))
            total += importance.cross_entropy(logits, y, sw)
        return total / len(self.batches)

    def _loss_block_scores(self):
        base = self._loss(self.model)
        n = len(self.family.blocks)
        scores = np.zeros(n)
        for k in range(n):
            keep = [i for i in range(n) if i != k]
            sizes = dict(self._full_sizes(), num_layers=n - 1)
            plan = {
                "sizes": sizes,
                "blocks": {"keep": np.array(keep)},
                "heads": {},
                "intermediate": {},
                "hidden": {"keep": None},
            }
            scores[k] = self._loss(self.apply(plan)) - base
        return scores

    def block_subsets_by_loss(self, plan, limit=MAX_BLOCK_SUBSETS):
        """Every choice of `plan`'s number of blocks, by calibration loss.

        Each subset of `plan["sizes"]["num_layers"]` blocks is built with
        the rest of `plan` (heads, FFN units, hidden channels) and its loss
        measured on the calibration batches, right after removal.

        Returns:
            A list of `(keep, loss)`, `keep` a sorted index array, lowest
            loss first (ties in the order of `itertools.combinations`).
        """
        n = len(self.family.blocks)
        k = plan["sizes"]["num_layers"]
        count = math.comb(n, k)
        if count > limit:
            raise invalid(
                "num_layers",
                k,
                f"a block count with at most {limit} subsets of the model's {n} "
                f"blocks to try ({count} for {k}); name the blocks with "
                "`keep_blocks` instead",
            )
        out = []
        for keep in itertools.combinations(range(n), k):
            candidate = dict(plan, blocks=dict(plan["blocks"], keep=np.array(keep)))
            out.append((np.array(keep), self._loss(self.apply(candidate))))
        out.sort(key=lambda pair: pair[1])
        return out

    def _full_sizes(self):
        return {k: self.sizes[k] for k in families.SIZE_NAMES}

    # -- plan -----------------------------------------------------------------

    def plan(self, sizes, keep_blocks=None):
        """What to remove to reach `sizes`; `keep_blocks` overrides the block ranking."""
        blocks = self.family.blocks
        by_data = bool(self.batches)
        shrink_heads = sizes["num_heads"] < self.sizes["num_heads"]
        shrink_ffn = sizes["intermediate_dim"] < self.sizes["intermediate_dim"]
        shrink_hidden = sizes["hidden_dim"] < self.sizes["hidden_dim"]
        roots = []
        if shrink_heads:
            roots += [self.heads[k][0] for k in range(len(blocks))]
        if shrink_ffn:
            roots += [self.ffn[k][0] for k in range(len(blocks))]
        if shrink_hidden:
            roots.append(self.hidden)
        if by_data and roots:
            inputs = [x for x, _, _ in self.batches]
            scores = importance.activation_scores(self.trace, roots, inputs)
        else:
            scores = {r: importance.magnitude_scores(self.trace, r) for r in roots}
        plan = {
            "importance": "activation" if by_data else "magnitude",
            "sizes": dict(sizes),
            "original_sizes": self._full_sizes(),
            "blocks": {"names": [b.name for b in blocks]},
            "heads": {},
            "intermediate": {},
            "hidden": {"keep": None},
        }
        if keep_blocks is not None:
            plan["blocks"]["scores"] = None
            plan["blocks"]["keep"] = np.array(keep_blocks)
        elif sizes["num_layers"] < len(blocks):
            block_scores = self._block_scores()
            plan["blocks"]["scores"] = block_scores
            plan["blocks"]["keep"] = _top(block_scores, sizes["num_layers"])
        else:
            plan["blocks"]["scores"] = None
            plan["blocks"]["keep"] = np.arange(len(blocks))
        for k, block in enumerate(blocks):
            if shrink_heads:
                r = self.heads[k][0]
                n = self.family.head_units(sizes["num_heads"])
                plan["heads"][block.name] = {
                    "scores": scores[r],
                    "keep": _top(scores[r], n),
                }
            if shrink_ffn:
                r = self.ffn[k][0]
                n = self.family.ffn_units(sizes["intermediate_dim"])
                plan["intermediate"][block.name] = {
                    "scores": scores[r],
                    "keep": _top(scores[r], n),
                }
        if shrink_hidden:
            s = scores[self.hidden]
            plan["hidden"] = {"scores": s, "keep": _top(s, sizes["hidden_dim"])}
        return plan

    # -- the smaller model ----------------------------------------------------

    def apply(self, plan):
        """Builds the smaller model of `plan` and copies the kept weights in."""
        blocks = self.family.blocks
        sizes = plan["sizes"]
        keep_blocks = [int(k) for k in plan["blocks"]["keep"]]
        keep = {}
        for k, block in enumerate(blocks):
            if block.name in plan["heads"]:
                keep[self.heads[k][0]] = plan["heads"][block.name]["keep"]
            if block.name in plan["intermediate"]:
                keep[self.ffn[k][0]] = plan["intermediate"][block.name]["keep"]
        if plan["hidden"]["keep"] is not None:
            keep[self.hidden] = plan["hidden"]["keep"]
        if isinstance(self.family, families.FunctionalFamily):
            self.family.resized_outputs = self._resized_outputs(keep)
        new_model = self.family.build(sizes, keep_blocks)
        norms = {}
        for layer in _sublayers(self.family.root):
            if _is_norm(layer):
                for v in layer.weights:
                    norms[id(v)] = layer
        ratio = math.sqrt(self.sizes["hidden_dim"] / sizes["hidden_dim"])
        assigned = set()
        for old_layer, new_layer in self.family.pairs(new_model, keep_blocks):
            old_weights, new_weights = old_layer.weights, new_layer.weights
            if len(old_weights) != len(new_weights):
                raise invalid(
                    "model",
                    self.model.name,
                    f"layer {old_layer.name!r} rebuilt with the same weights "
                    f"({len(old_weights)} before, {len(new_weights)} after)",
                )
            for old, new in zip(old_weights, new_weights, strict=True):
                value = self._sliced(old, keep, norms.get(id(old)), ratio)
                if tuple(value.shape) != tuple(new.shape):
                    raise invalid(
                        "model",
                        self.model.name,
                        f"a layer whose config can express the smaller sizes: "
                        f"{old.path} sliced to {value.shape} but the rebuilt "
                        f"{new_layer.name!r} has {tuple(new.shape)}",
                    )
                new.assign(value.astype(new.dtype))
                assigned.add(id(new))
        missing = [v.path for v in new_model.weights if id(v) not in assigned]
        if missing:
            raise invalid(
                "model",
                self.model.name,
                f"every weight of the smaller model copied; missed {missing}",
            )
        self.family.correct(new_model, ratio)
        return new_model

    def _sliced(self, variable, keep, norm, ratio):
        """The kept part of `variable`; a norm's scale on the hidden axis rescaled.

        RMS over `new_hidden` channels of a stream whose removed channels
        are zero is `sqrt(hidden / new_hidden)` times the RMS over all of
        them: the scale is multiplied by that ratio to compensate.
        """
        tr = self.trace
        value = np.asarray(variable.numpy())
        vi = self._index.get(id(variable))
        if vi is None:  # not read by the call: unchanged
            return value
        for axis, e in enumerate(tr.var_axes(vi)):
            kept = None if e is None else tr.groups.expand(e, keep)
            if kept is not None:
                value = np.take(value, kept, axis=axis)
        name = variable.path.rsplit("/", 1)[-1]
        if (
            norm is not None
            and ratio != 1.0
            and value.ndim == 1
            and tr.variable_groups(vi)[0] == self.hidden
            and name not in ("beta", "bias", "center")
        ):
            if _one_plus_scale(norm):
                return (1.0 + value) * ratio - 1.0
            return value * ratio
        return value

    def _resized_outputs(self, keep):
        """Names of top-level Embedding/Dense layers whose output axis shrinks."""
        tr, g = self.trace, self.trace.groups
        names = set()
        for layer in self.family.root.layers:
            if not isinstance(layer, (keras.layers.Embedding, keras.layers.Dense)):
                continue
            v = layer.weights[0] if layer.weights else None
            vi = None if v is None else self._index.get(id(v))
            if vi is None:
                continue
            last = tr.var_axes(vi)[-1]
            if last is not None and g.expand(last, keep) is not None:
                names.add(layer.name)
        return names
