"""Which weight axes must shrink together: a dependency graph of a traced model.

Removing channel `i` from one weight forces the same removal from every
weight and tensor that the channel flows into: a residual sum joins the
hidden axis of the embeddings with every projection that writes the stream,
a matmul joins the axis it contracts with the kernel rows it reads, a
reshape `(hidden, heads, head_dim) -> (hidden, heads * head_dim)` makes the
merged axis the product of the two. Torch-Pruning's DepGraph finds these
couplings by walking PyTorch's autograd graph; this module does the same on
the TensorFlow graph of one call of a Keras model, so it sees inside
subclassed layers (keras-hub decoders, our transformer block) without
knowing their Python code.

Every axis of every tensor (of size > 1) is an element of a union-find; each
op's rule joins the axes that carry the same channel index (elementwise ops
with broadcasting, matmul and einsum by their letters, transpose, gather,
reshape by equal-product chunks). An axis that a reshape splits into several
is recorded as the product of its factors (major first), so the heads and
head size behind a `heads * head_dim` axis stay separate groups, and
grouped-query attention's query heads are the product of key/value heads and
the query heads per group. An op that slices, concatenates, pads, tiles or
that no rule covers makes the axes it touches *opaque*: those groups cannot
be shrunk, and the reason names the op (whose name starts with the Keras
layer path).

This module knows nothing of transformers; `transformer_shrink` decides
which groups are heads, FFN units and the hidden size.

Reference:
    Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023.
"""

import math
import re

import numpy as np
import tensorflow as tf

__all__ = ["AxisGroups", "Trace", "trace_model"]


class AxisGroups:
    """Union-find over tensor axes, with products (factorizations) of groups."""

    def __init__(self):
        self.parent = []
        self.sizes = []
        self.factors = {}  # root -> list of element ids, major first
        self.opaque = {}  # root -> reason
        self.flags = {}  # root -> set of strings ("input", "output")

    def new(self, size):
        self.parent.append(len(self.parent))
        self.sizes.append(int(size))
        return len(self.parent) - 1

    def find(self, x):
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def size(self, x):
        return self.sizes[self.find(x)]

    def mark_opaque(self, x, reason):
        r = self.find(x)
        self.opaque.setdefault(r, reason)

    def flag(self, x, name):
        self.flags.setdefault(self.find(x), set()).add(name)

    def union(self, a, b):
        work = [(a, b)]
        while work:
            a, b = work.pop()
            ra, rb = self.find(a), self.find(b)
            if ra == rb:
                continue
            if self.sizes[ra] != self.sizes[rb]:  # pragma: no cover - rule bug
                reason = "axes of different sizes joined"
                self.mark_opaque(ra, reason)
                self.mark_opaque(rb, reason)
                continue
            self.parent[rb] = ra
            if rb in self.opaque:
                self.opaque.setdefault(ra, self.opaque.pop(rb))
            if rb in self.flags:
                self.flags.setdefault(ra, set()).update(self.flags.pop(rb))
            fb = self.factors.pop(rb, None)
            if fb is None:
                continue
            fa = self.factors.get(ra)
            if fa is None:
                self.factors[ra] = fb
            elif [self.size(f) for f in fa] == [self.size(f) for f in fb]:
                work.extend(zip(fa, fb, strict=False))
            else:
                self.mark_opaque(ra, "one axis reshaped in two incompatible ways")

    def set_factors(self, x, parts):
        """Records axis `x` as the product of the axes `parts` (major first)."""
        parts = [p for p in parts if p is not None]
        if not parts:
            return
        if len(parts) == 1:
            self.union(x, parts[0])
            return
        r = self.find(x)
        if r not in self.factors:
            self.factors[r] = list(parts)
            return
        old = self.factors[r]
        if [self.size(f) for f in old] == [self.size(f) for f in parts]:
            for f, g in zip(old, parts, strict=False):
                self.union(f, g)
        else:
            self.mark_opaque(r, "one axis reshaped in two incompatible ways")

    def children(self, x):
        return [self.find(f) for f in self.factors.get(self.find(x), ())]

    def contains(self, x, target, _depth=0):
        """Whether group `target` is `x` or one of its (nested) factors."""
        x, target = self.find(x), self.find(target)
        if x == target:
            return True
        if _depth > 16:
            return False
        return any(self.contains(f, target, _depth + 1) for f in self.children(x))

    def locate(self, x, target, _depth=0):
        """`(pre, size, post)` of `target` inside axis `x`, or `None`.

        An axis of group `x` reshaped to `(pre, size, post)` has the index of
        group `target` in the middle.
        """
        x, target = self.find(x), self.find(target)
        if x == target:
            return (1, self.sizes[x], 1)
        if _depth > 16:
            return None
        kids = self.children(x)
        for i, f in enumerate(kids):
            found = self.locate(f, target, _depth + 1)
            if found is not None:
                pre = math.prod(self.sizes[k] for k in kids[:i]) * found[0]
                post = found[2] * math.prod(self.sizes[k] for k in kids[i + 1 :])
                return (pre, found[1], post)
        return None

    def close(self):
        """Joins axes that are products of the same groups in the same order.

        A reshape `(b, t, k * g, h) -> (b, t, k, g, h)` and its inverse give
        two product axes with the same factors: they carry the same index.
        """
        changed = True
        while changed:
            changed = False
            seen = {}
            for r in list(self.factors):
                if r not in self.factors or self.find(r) != r:
                    continue
                key = tuple(self.find(f) for f in self.factors[r])
                other = seen.get(key)
                if other is not None and self.find(other) != r:
                    self.union(other, r)
                    changed = True
                    break
                seen[key] = r

    def blocked(self, x):
        """Why group `x` cannot shrink, or `None`.

        A group is blocked when an op made it opaque, or made opaque an axis
        that contains it as a factor (slicing the product would slice it).
        An opaque factor of `x` (a RoPE-split head size inside
        `heads * head_dim`) does not block `x` (the heads).
        """
        r = self.find(x)
        if r in self.opaque:
            return self.opaque[r]
        for p in list(self.factors):
            p = self.find(p)
            if p != r and p in self.opaque and self.contains(p, r):
                return self.opaque[p]
        return None

    def expand(self, x, keep, _depth=0):
        """Indices kept along an axis of group `x`, given kept indices per group.

        Args:
            x: An element of the axis.
            keep: Dict root -> sorted kept indices, for the groups shrunk.

        Returns:
            The kept indices along the axis, or `None` if nothing in it shrinks.
        """
        r = self.find(x)
        if r in keep:
            return np.asarray(keep[r])
        kids = self.children(r)
        if not kids or _depth > 16:
            return None
        parts = [self.expand(k, keep, _depth + 1) for k in kids]
        if all(p is None for p in parts):
            return None
        sizes = [self.sizes[k] for k in kids]
        parts = [
            np.arange(s) if p is None else p for p, s in zip(parts, sizes, strict=False)
        ]
        grids = np.meshgrid(*parts, indexing="ij")
        return np.ravel_multi_index([g.reshape(-1) for g in grids], sizes)


_UNARY = frozenset(
    """
    Identity Cast StopGradient PreventGradient Neg Abs Square Sqrt Rsqrt
    Reciprocal Inv Exp Expm1 Log Log1p Tanh Sigmoid Relu Relu6 Elu Selu
    Softplus Softsign Erf Erfc Sin Cos Floor Ceil Round Rint Sign Softmax
    LogSoftmax Cumsum Cumprod MatrixBandPart ZerosLike OnesLike IsFinite IsNan
    IsInf LogicalNot LeakyRelu Gelu CheckNumerics EnsureShape Snapshot Acos
    Asin Atan Cosh Sinh Tan ClipByValue Mish Swish
    """.split()
)
_BROADCAST = frozenset(
    """
    Add AddV2 AddN Sub Mul MulNoNan RealDiv Div DivNoNan TruncateDiv FloorDiv
    FloorMod Mod Maximum Minimum Pow SquaredDifference Atan2 Equal NotEqual
    Less LessEqual Greater GreaterEqual LogicalAnd LogicalOr SelectV2 BiasAdd
    Xdivy Xlogy BroadcastTo Pad PadV2 MirrorPad Tile Slice
    """.split()
)
_REDUCE = {"Mean", "Sum", "Max", "Min", "Prod", "All", "Any", "EuclideanNorm"}
_RESHAPE = {"Reshape", "ExpandDims", "Squeeze"}
_NO_COUPLING = frozenset(
    """
    Const Placeholder NoOp Shape ShapeN Size Rank Range Fill VarHandleOp Assert
    RandomUniform RandomStandardNormal StatelessRandomUniformV2
    StatelessRandomNormalV2 BroadcastArgs BroadcastGradientArgs
    """.split()
)


class Trace:
    """The axis groups of one traced call of a model, with what reads them.

    Attributes:
        groups: The `AxisGroups`.
        variables: Keras variables the call reads, in trace order.
        contractions: One dict per matmul/einsum between an activation and
            weights: `"op"`, `"activation"` (tensor), `"contracted"` (its
            contracted axes), `"variables"` (indices into `variables` of the
            weights it multiplies), `"free"` (elements of the weights' axes
            that reach the output).
        attention: One dict per matmul/einsum between two activations:
            `"op"`, `"batch"`, `"contracted"`, `"free"` (group roots).
        function: The traced `tf.compat.v1.wrap_function`.
    """

    def __init__(self, function, feeds, outputs, variables):
        self.function = function
        self.feeds = feeds
        self.outputs = outputs
        self.variables = variables
        self.groups = AxisGroups()
        self.contractions = []
        self.attention = []
        self._axes = {}  # tensor name -> list of element ids (None for size 1)
        self._var_axes = {}  # variable index -> list of element ids
        self._dependent = set()  # names of tensors that depend on a feed

    # -- building ---------------------------------------------------------------

    def axes(self, tensor):
        name = tensor.name
        if name not in self._axes:
            shape = tensor.shape
            if shape.rank is None:
                self._axes[name] = None
            else:
                self._axes[name] = [
                    None if d == 1 else self.groups.new(-1 if d is None else d)
                    for d in shape.as_list()
                ]
                for e, d in zip(self._axes[name], shape.as_list(), strict=False):
                    if e is not None and d is None:
                        self.groups.mark_opaque(e, f"unknown size in {name}")
        return self._axes[name]

    def var_axes(self, index):
        if index not in self._var_axes:
            shape = tuple(self.variables[index].shape)
            self._var_axes[index] = [
                None if d == 1 else self.groups.new(d) for d in shape
            ]
        return self._var_axes[index]

    def is_dependent(self, tensor):
        return tensor.name in self._dependent

    # -- queries ----------------------------------------------------------------

    def group(self, tensor_or_var, axis):
        """Root of the group of `axis` of a graph tensor or a variable index."""
        if isinstance(tensor_or_var, int):
            elems = self.var_axes(tensor_or_var)
        else:
            elems = self.axes(tensor_or_var)
        if elems is None:
            return None
        e = elems[axis]
        return None if e is None else self.groups.find(e)

    def variable_groups(self, index):
        """Roots of each axis of variable `index` (`None` for size-1 axes)."""
        return [
            None if e is None else self.groups.find(e) for e in self.var_axes(index)
        ]

    def members(self, root):
        """`(variable index, axis, (pre, size, post))` of every weight axis in `root`."""
        out = []
        for index in self._var_axes:
            for axis, e in enumerate(self._var_axes[index]):
                if e is None:
                    continue
                where = self.groups.locate(e, root)
                if where is not None:
                    out.append((index, axis, where))
        return out

    def opaque_reason(self, root):
        """Why group `root` cannot shrink (see `AxisGroups.blocked`), or `None`."""
        return self.groups.blocked(root)

    def flags(self, root):
        return self.groups.flags.get(self.groups.find(root), set())

    def fetcher(self, tensors):
        """A function from the feeds' values to the values of `tensors`."""
        return self.function.prune(feeds=self.feeds, fetches=list(tensors))


def _static(tensor):
    value = tf.get_static_value(tensor)
    return None if value is None else np.asarray(value)


def _norm_axis(axis, rank):
    return axis + rank if axis < 0 else axis


class _Walker:
    """Applies one coupling rule per op of a graph to a `Trace`."""

    def __init__(self, trace, resources):
        self.t = trace
        self.g = trace.groups
        self.resources = resources  # placeholder name -> variable index

    def link(self, a, b, op):
        if a is None or b is None:
            return
        if self.g.size(a) != self.g.size(b):
            self.g.mark_opaque(a, f"op {op.name} ({op.type}) changes this axis")
            self.g.mark_opaque(b, f"op {op.name} ({op.type}) changes this axis")
            return
        self.g.union(a, b)

    def opaque_all(self, op, why=None):
        reason = why or f"op {op.name} of type {op.type} has no coupling rule"
        for t in list(op.inputs) + list(op.outputs):
            if t.dtype == tf.resource:
                continue
            for e in self.t.axes(t) or ():
                if e is not None:
                    self.g.mark_opaque(e, reason)

    def run(self, graph):
        t = self.t
        feeds = {f.name for f in t.feeds}
        t._dependent.update(feeds)
        for op in graph.get_operations():
            if any(i.name in t._dependent for i in op.inputs):
                t._dependent.update(o.name for o in op.outputs)
            if any(o.shape.rank is None for o in op.outputs if o.dtype != tf.resource):
                self.opaque_all(op, f"op {op.name} has an output of unknown rank")
                continue
            rule = self._rule(op.type)
            if rule is None:
                self.opaque_all(op)
            else:
                rule(op)
        for f in t.feeds:
            for e in t.axes(f) or ():
                if e is not None:
                    self.g.flag(e, "input")
        for o in t.outputs:
            for e in t.axes(o) or ():
                if e is not None:
                    self.g.flag(e, "output")
        self.g.close()

    def _rule(self, op_type):
        if op_type in _NO_COUPLING:
            return lambda op: None
        if op_type in _UNARY:
            return self.unary
        if op_type in _BROADCAST:
            return self.broadcast
        if op_type in _REDUCE:
            return self.reduce
        if op_type in _RESHAPE:
            return self.reshape
        if op_type in ("MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3"):
            return self.matmul
        table = {
            "IdentityN": self.identity_n,
            "Einsum": self.einsum,
            "Transpose": self.transpose,
            "GatherV2": self.gather,
            "ResourceGather": self.gather,
            "ReadVariableOp": self.read_variable,
            "StridedSlice": self.strided_slice,
            "ConcatV2": self.concat,
            "Pack": self.pack,
            "Unpack": self.unpack,
            "Split": self.split,
            "SplitV": self.split,
            "ArgMax": self.arg_reduce,
            "ArgMin": self.arg_reduce,
        }
        return table.get(op_type)

    # -- rules --------------------------------------------------------------

    def unary(self, op):
        a, b = self.t.axes(op.inputs[0]), self.t.axes(op.outputs[0])
        if len(a) != len(b):
            return self.opaque_all(op)
        for x, y in zip(a, b, strict=False):
            self.link(x, y, op)

    def identity_n(self, op):
        for i, o in zip(op.inputs, op.outputs, strict=False):
            for x, y in zip(self.t.axes(i), self.t.axes(o), strict=False):
                self.link(x, y, op)

    def broadcast(self, op):
        # Elementwise ops, and ops that keep an axis or change its size only
        # by broadcasting from 1, slicing, padding or tiling: an axis whose
        # size is unchanged is the same axis, a changed one is opaque.
        out = self.t.axes(op.outputs[0])
        out_shape = op.outputs[0].shape.as_list()
        inputs = op.inputs
        if op.type in ("BroadcastTo", "Pad", "PadV2", "MirrorPad", "Tile", "Slice"):
            inputs = op.inputs[:1]
        for inp in inputs:
            if inp.dtype == tf.resource:
                return self.opaque_all(op)
            axes = self.t.axes(inp)
            shape = inp.shape.as_list()
            offset = len(out_shape) - len(shape)
            if offset < 0:
                return self.opaque_all(op)
            for i, e in enumerate(axes):
                if e is None:
                    continue
                j = i + offset
                if shape[i] == out_shape[j]:
                    self.link(e, out[j], op)
                else:
                    reason = f"op {op.name} ({op.type}) changes the size of this axis"
                    self.g.mark_opaque(e, reason)
                    if out[j] is not None:
                        self.g.mark_opaque(out[j], reason)

    def _axes_value(self, tensor, rank):
        value = _static(tensor)
        if value is None:
            return None
        return sorted({_norm_axis(int(a), rank) for a in np.ravel(value)})

    def reduce(self, op):
        inp, out = op.inputs[0], op.outputs[0]
        rank = inp.shape.rank
        axes = self._axes_value(op.inputs[1], rank)
        if axes is None:
            return self.opaque_all(op)
        a, b = self.t.axes(inp), self.t.axes(out)
        keep = op.get_attr("keep_dims")
        j = 0
        for i in range(rank):
            if i in axes:
                if keep:
                    j += 1
                continue
            self.link(a[i], b[j], op)
            j += 1

    def arg_reduce(self, op):
        inp, out = op.inputs[0], op.outputs[0]
        axes = self._axes_value(op.inputs[1], inp.shape.rank)
        if axes is None:
            return self.opaque_all(op)
        a, b = self.t.axes(inp), self.t.axes(out)
        rest = [x for i, x in enumerate(a) if i not in axes]
        for x, y in zip(rest, b, strict=False):
            self.link(x, y, op)

    def reshape(self, op):
        inp, out = op.inputs[0], op.outputs[0]
        a_shape, b_shape = inp.shape.as_list(), out.shape.as_list()
        if None in a_shape or None in b_shape:
            return self.opaque_all(op, f"op {op.name} reshapes an axis of unknown size")
        a_axes, b_axes = self.t.axes(inp), self.t.axes(out)
        a = [(d, e) for d, e in zip(a_shape, a_axes, strict=False) if d != 1]
        b = [(d, e) for d, e in zip(b_shape, b_axes, strict=False) if d != 1]
        i = j = 0
        while i < len(a) and j < len(b):
            ci, cj = [a[i]], [b[j]]
            pa, pb = a[i][0], b[j][0]
            i += 1
            j += 1
            while pa != pb:
                if pa < pb:
                    if i >= len(a):
                        return self.opaque_all(op)
                    ci.append(a[i])
                    pa *= a[i][0]
                    i += 1
                else:
                    if j >= len(b):
                        return self.opaque_all(op)
                    cj.append(b[j])
                    pb *= b[j][0]
                    j += 1
            if len(ci) == 1 and len(cj) == 1:
                self.link(ci[0][1], cj[0][1], op)
            elif len(ci) == 1:
                self.g.set_factors(ci[0][1], [e for _, e in cj])
            elif len(cj) == 1:
                self.g.set_factors(cj[0][1], [e for _, e in ci])
            else:
                reason = f"op {op.name} regroups axes {[d for d, _ in ci]} -> {[d for d, _ in cj]}"
                for _, e in ci + cj:
                    self.g.mark_opaque(e, reason)

    def transpose(self, op):
        perm = _static(op.inputs[1])
        if perm is None:
            return self.opaque_all(op)
        a, b = self.t.axes(op.inputs[0]), self.t.axes(op.outputs[0])
        for j, i in enumerate(np.ravel(perm)):
            self.link(a[int(i)], b[j], op)

    def _variable_of(self, tensor):
        return self.resources.get(tensor.name)

    def read_variable(self, op):
        index = self._variable_of(op.inputs[0])
        if index is None:
            return self.opaque_all(op, f"op {op.name} reads an unknown variable")
        for x, y in zip(
            self.t.var_axes(index), self.t.axes(op.outputs[0]), strict=False
        ):
            self.link(x, y, op)

    def gather(self, op):
        params = op.inputs[0]
        if op.type == "ResourceGather":
            index = self._variable_of(params)
            if index is None:
                return self.opaque_all(op, f"op {op.name} reads an unknown variable")
            p_axes = self.t.var_axes(index)
            p_rank, axis = len(p_axes), 0
        else:
            p_axes = self.t.axes(params)
            p_rank = params.shape.rank
            axis = _static(op.inputs[2])
            if axis is None:
                return self.opaque_all(op)
            axis = _norm_axis(int(axis), p_rank)
        batch_dims = (
            op.get_attr("batch_dims") if "batch_dims" in op.node_def.attr else 0
        )
        idx = op.inputs[1]
        i_axes = self.t.axes(idx)
        out = self.t.axes(op.outputs[0])
        # out = params[:axis] + indices[batch_dims:] + params[axis + 1:]
        for k in range(axis):
            self.link(p_axes[k], out[k], op)
        for k in range(batch_dims):
            self.link(i_axes[k], out[k], op)
        n_idx = len(i_axes) - batch_dims
        for k in range(n_idx):
            self.link(i_axes[batch_dims + k], out[axis + k], op)
        for k in range(axis + 1, p_rank):
            self.link(p_axes[k], out[k - 1 + n_idx], op)
        if p_axes[axis] is not None:
            self.g.mark_opaque(p_axes[axis], f"rows gathered by op {op.name}")

    def matmul(self, op):
        a, b = op.inputs[0], op.inputs[1]
        out = op.outputs[0]
        if op.type == "MatMul":
            ta, tb = op.get_attr("transpose_a"), op.get_attr("transpose_b")
        else:
            ta, tb = op.get_attr("adj_x"), op.get_attr("adj_y")
        ra, rb, ro = a.shape.rank, b.shape.rank, out.shape.rank
        # Name the axes as einsum letters: batch axes right-aligned with the
        # output's, rows "m", shared "k", columns "n".
        la = [f"b{ro - ra + i}" for i in range(ra)]
        lb = [f"b{ro - rb + i}" for i in range(rb)]
        la[-1], la[-2] = ("m", "k") if ta else ("k", "m")
        lb[-1], lb[-2] = ("k", "n") if tb else ("n", "k")
        lo = [f"b{i}" for i in range(ro - 2)] + ["m", "n"]
        self._contract(op, [a, b], [la, lb], out, lo)

    def einsum(self, op):
        eq = op.get_attr("equation").decode()
        lhs, rhs = eq.replace(" ", "").split("->")
        terms = lhs.split(",")
        tensors = list(op.inputs)
        if len(terms) != len(tensors):
            return self.opaque_all(op)
        out = op.outputs[0]

        def expand(term, rank):
            if "..." not in term:
                return list(term)
            head, tail = term.split("...")
            n = rank - len(head) - len(tail)
            return list(head) + [f"_{k}" for k in range(n)] + list(tail)

        letters = [
            expand(term, t.shape.rank) for term, t in zip(terms, tensors, strict=False)
        ]
        self._contract(op, tensors, letters, out, expand(rhs, out.shape.rank))

    def _contract(self, op, tensors, letters, out, out_letters):
        """Joins the axes that carry the same letter (batch 1 axes skipped)."""
        where = {}
        for t, ls in list(zip(tensors, letters, strict=False)) + [(out, out_letters)]:
            for axis, letter in enumerate(ls):
                e = self.t.axes(t)[axis]
                if e is None:
                    continue
                if letter in where:
                    self.link(where[letter], e, op)
                else:
                    where[letter] = e
        self._record(
            op,
            [(t, self.t.axes(t), ls) for t, ls in zip(tensors, letters, strict=False)],
            out_letters,
        )

    def _record(self, op, operands, out_letters):
        """Keeps what a contraction reads, for importance and roles."""
        if len(operands) != 2:
            return
        dep = [self.t.is_dependent(t) for t, _, _ in operands]
        g = self.g
        if all(dep):
            (_, ax, la), (_, bx, lb) = operands
            batch, contracted, free = set(), set(), set()
            for axes, ls, other in ((ax, la, lb), (bx, lb, la)):
                for e, letter in zip(axes, ls, strict=False):
                    if e is None:
                        continue
                    if letter in other and letter in out_letters:
                        batch.add(g.find(e))
                    elif letter in other:
                        contracted.add(g.find(e))
                    else:
                        free.add(g.find(e))
            self.t.attention.append(
                {"op": op.name, "batch": batch, "contracted": contracted, "free": free}
            )
            return
        if not any(dep):
            return
        act, weight = (
            (operands[0], operands[1]) if dep[0] else (operands[1], operands[0])
        )
        a_tensor, a_axes, a_letters = act
        w_tensor, w_axes, w_letters = weight
        contracted = [
            i
            for i, letter in enumerate(a_letters)
            if letter in w_letters and letter not in out_letters
        ]
        free = [
            e
            for e, letter in zip(w_axes, w_letters, strict=False)
            if e is not None and letter in out_letters and letter not in a_letters
        ]
        self.t.contractions.append(
            {
                "op": op.name,
                "activation": a_tensor,
                "contracted": contracted,
                "variables": self._source_variables(w_tensor),
                "free": free,
            }
        )

    def _source_variables(self, tensor, limit=64):
        found, seen, stack = [], set(), [tensor]
        while stack and len(seen) < limit:
            t = stack.pop()
            if t.name in seen:
                continue
            seen.add(t.name)
            index = self._variable_of(t)
            if index is not None:
                found.append(index)
                continue
            stack.extend(t.op.inputs)
        return sorted(set(found))

    def strided_slice(self, op):
        inp, out = op.inputs[0], op.outputs[0]
        strides = _static(op.inputs[3])
        if strides is None:
            return self.opaque_all(op)
        masks = {
            k: op.get_attr(k)
            for k in ("ellipsis_mask", "new_axis_mask", "shrink_axis_mask")
        }
        a, b = self.t.axes(inp), self.t.axes(out)
        a_shape, b_shape = inp.shape.as_list(), out.shape.as_list()
        n_spec = len(np.ravel(strides))
        n_real = sum(1 for k in range(n_spec) if not (masks["new_axis_mask"] >> k) & 1)
        i = j = 0
        pairs = []
        for k in range(n_spec):
            if (masks["ellipsis_mask"] >> k) & 1:
                span = len(a) - (n_real - 1)
                for _ in range(span):
                    pairs.append((i, j, 1))
                    i += 1
                    j += 1
            elif (masks["new_axis_mask"] >> k) & 1:
                j += 1
            elif (masks["shrink_axis_mask"] >> k) & 1:
                if a[i] is not None:
                    self.g.mark_opaque(
                        a[i], f"op {op.name} takes one index of this axis"
                    )
                i += 1
            else:
                pairs.append((i, j, int(np.ravel(strides)[k])))
                i += 1
                j += 1
        while i < len(a):
            pairs.append((i, j, 1))
            i += 1
            j += 1
        for i, j, stride in pairs:
            if j >= len(b):
                return self.opaque_all(op)
            if a_shape[i] == b_shape[j] and stride == 1:
                self.link(a[i], b[j], op)
            else:
                reason = f"op {op.name} slices this axis"
                for e in (a[i], b[j]):
                    if e is not None:
                        self.g.mark_opaque(e, reason)

    def concat(self, op):
        values, axis_t = op.inputs[:-1], op.inputs[-1]
        out = op.outputs[0]
        axis = _static(axis_t)
        if axis is None:
            return self.opaque_all(op)
        axis = _norm_axis(int(axis), out.shape.rank)
        o = self.t.axes(out)
        reason = f"op {op.name} concatenates along this axis"
        for v in values:
            axes = self.t.axes(v)
            for k, e in enumerate(axes):
                if k == axis:
                    if len(values) == 1:
                        self.link(e, o[k], op)
                    elif e is not None:
                        self.g.mark_opaque(e, reason)
                else:
                    self.link(e, o[k], op)
        if o[axis] is not None and len(values) > 1:
            self.g.mark_opaque(o[axis], reason)

    def pack(self, op):
        out = op.outputs[0]
        axis = _norm_axis(op.get_attr("axis"), out.shape.rank)
        o = [e for k, e in enumerate(self.t.axes(out)) if k != axis]
        for v in op.inputs:
            for x, y in zip(self.t.axes(v), o, strict=False):
                self.link(x, y, op)

    def unpack(self, op):
        inp = op.inputs[0]
        axis = _norm_axis(op.get_attr("axis"), inp.shape.rank)
        a = [e for k, e in enumerate(self.t.axes(inp)) if k != axis]
        if self.t.axes(inp)[axis] is not None:
            self.g.mark_opaque(
                self.t.axes(inp)[axis], f"op {op.name} unstacks this axis"
            )
        for o in op.outputs:
            for x, y in zip(a, self.t.axes(o), strict=False):
                self.link(x, y, op)

    def split(self, op):
        if op.type == "Split":
            axis_t, value = op.inputs[0], op.inputs[1]
        else:
            value, axis_t = op.inputs[0], op.inputs[2]
        axis = _static(axis_t)
        if axis is None:
            return self.opaque_all(op)
        axis = _norm_axis(int(axis), value.shape.rank)
        a = self.t.axes(value)
        reason = f"op {op.name} splits this axis"
        for o in op.outputs:
            for k, (x, y) in enumerate(zip(a, self.t.axes(o), strict=False)):
                if k == axis and len(op.outputs) > 1:
                    for e in (x, y):
                        if e is not None:
                            self.g.mark_opaque(e, reason)
                else:
                    self.link(x, y, op)


def _flat_specs(inputs):
    def spec(x):
        x = np.asarray(x)
        return tf.TensorSpec(x.shape, tf.as_dtype(x.dtype))

    return tf.nest.map_structure(spec, inputs)


def trace_model(model, inputs):
    """Traces `model(inputs, training=False)` and groups the coupled axes.

    Args:
        model: A built Keras model (TensorFlow backend).
        inputs: One batch of inputs (array or dict of arrays); its shapes fix
            the shapes of the trace.

    Returns:
        A `Trace`.
    """
    specs = _flat_specs(inputs)
    function = tf.compat.v1.wrap_function(lambda x: model(x, training=False), [specs])
    graph = function.graph
    # The call's arguments come first in the graph's inputs, then captures
    # (variables and constants the model closes over).
    feeds = list(graph.inputs[: len(tf.nest.flatten(specs))])
    handles = {}
    for v in model.weights:
        handles.setdefault(id(v.value.handle), v)
    variables, resources = [], {}
    for external, internal in graph.captures:
        v = handles.get(id(external))
        if v is not None:
            resources[internal.name] = len(variables)
            variables.append(v)
    outputs = tf.nest.flatten(function.outputs)
    trace = Trace(function, feeds, outputs, variables)
    _Walker(trace, resources).run(graph)
    return trace


def layer_of_op(op_name):
    """The Keras layer path in a graph op name, for messages.

    `"model_1/block_0_1/attention_1/einsum/Einsum"` -> `"model/block_0/attention/einsum"`
    (the `_1` suffixes are the graph's, not the layers').
    """
    parts = [re.sub(r"_1$", "", p) for p in op_name.split("/")[:-1]]
    return "/".join(parts)
