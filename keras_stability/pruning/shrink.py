"""Structured pruning: remove whole Dense units and Conv filters.

Masks make weights zero but not fewer, so a masked model is no faster.
`shrink` builds a new, smaller model: it drops the least important output
units (Dense) or filters (Conv) of a layer together with the matching input
slices of every layer that consumes them and the BatchNormalization
parameters in between. Channels joined by a residual `Add` (or another
element-wise merge) are one group, ranked and dropped together.

The channel analysis walks the functional graph: every tensor's last axis
belongs to a "channel group"; Dense/Conv start a new group, per-channel
layers (activations, dropout, pooling, BatchNormalization, padding) pass it
on, element-wise merges join groups, `Flatten` spreads a group over the
spatial positions for the Dense after it. A group is shrunk when all its
channels come from Dense/Conv layers and none of them is a model output or
a model input.
"""

import math
import warnings

import keras
import numpy as np

from keras_stability import _keras_internals
from keras_stability._checks import check_choice
from keras_stability._checks import check_number
from keras_stability.pruning.masks import unit_scores

__all__ = ["shrink", "shrink_plan"]

_PRODUCERS = (
    keras.layers.Dense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
)
_CONV_TRANSPOSE = (
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
)
_PASS_THROUGH = (
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
    keras.layers.MaxPooling1D,
    keras.layers.MaxPooling2D,
    keras.layers.MaxPooling3D,
    keras.layers.AveragePooling1D,
    keras.layers.AveragePooling2D,
    keras.layers.AveragePooling3D,
    keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalAveragePooling3D,
    keras.layers.GlobalMaxPooling1D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.GlobalMaxPooling3D,
    keras.layers.ZeroPadding1D,
    keras.layers.ZeroPadding2D,
    keras.layers.ZeroPadding3D,
    keras.layers.Cropping1D,
    keras.layers.Cropping2D,
    keras.layers.Cropping3D,
    keras.layers.UpSampling1D,
    keras.layers.UpSampling2D,
    keras.layers.UpSampling3D,
)
# Activations applied to each channel on its own: a channel can be removed
# through them. Any other (softmax, log_softmax, glu and sparsemax mix the
# channels of a tensor; a custom callable may) stops a group: slicing
# through a softmax renormalises the kept units, and the smaller model would
# no longer compute what the unit-masked one does.
_ELEMENTWISE_ACTIVATIONS = frozenset(
    {
        "celu",
        "elu",
        "exponential",
        "gelu",
        "hard_shrink",
        "hard_sigmoid",
        "hard_silu",
        "hard_swish",
        "hard_tanh",
        "leaky_relu",
        "linear",
        "log_sigmoid",
        "mish",
        "relu",
        "relu6",
        "selu",
        "sigmoid",
        "silu",
        "soft_shrink",
        "softplus",
        "softsign",
        "sparse_plus",
        "sparse_sigmoid",
        "squareplus",
        "swish",
        "tanh",
        "tanh_shrink",
        "threshold",
    }
)
_MERGE = (
    keras.layers.Add,
    keras.layers.Subtract,
    keras.layers.Maximum,
    keras.layers.Minimum,
    keras.layers.Average,
    keras.layers.Multiply,
)


class _Groups:
    """Union-find over channel groups with what each group touches."""

    def __init__(self):
        self.parent = []
        self.info = []

    def new(self, channels, blocked=None):
        self.parent.append(len(self.parent))
        self.info.append(
            {
                "channels": channels,
                "producers": [],
                "consumers": [],  # (layer, spatial) ; spatial > 1 after Flatten
                "norms": [],
                "blocked": blocked,  # reason it cannot shrink (input/output)
                "unsupported": None,  # name of a layer that cannot be sliced
            }
        )
        return len(self.parent) - 1

    def find(self, g):
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a, b):
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        ia, ib = self.info[a], self.info[b]
        for key in ("producers", "consumers", "norms"):
            ia[key] += ib[key]
        ia["blocked"] = ia["blocked"] or ib["blocked"]
        ia["unsupported"] = ia["unsupported"] or ib["unsupported"]
        self.parent[b] = a
        return a

    def get(self, g):
        return self.info[self.find(g)]


def _graph(model):
    if isinstance(model, keras.Sequential):
        graph = getattr(model, "_functional", None)
        if graph is None:
            raise ValueError(
                "Invalid value for argument `model`. Expected a built Sequential "
                f"model with an `Input`. Received: model={model.name!r}"
            )
        return graph
    if isinstance(model, keras.Model) and hasattr(model, "_nodes_by_depth"):
        return model
    raise ValueError(
        "Invalid value for argument `model`. Expected a Sequential or functional "
        f"Keras model. Received: model={getattr(model, 'name', model)!r} of type "
        f"{type(model).__name__}"
    )


def _channels_last(layer):
    return getattr(layer, "data_format", "channels_last") == "channels_last"


def _analyse(model):
    graph = _graph(model)
    groups = _Groups()
    tensor_group = {}  # id(KerasTensor) -> (group, spatial)
    uses = {}
    for nodes in graph._nodes_by_depth.values():
        for node in nodes:
            uses[id(node.operation)] = uses.get(id(node.operation), 0) + 1

    def group_of(tensor, layer):
        key = id(tensor)
        if key not in tensor_group:  # e.g. a constant: treat as an input
            tensor_group[key] = (groups.new(tensor.shape[-1], blocked="input"), 1)
        return tensor_group[key]

    for depth in sorted(graph._nodes_by_depth, reverse=True):
        for node in graph._nodes_by_depth[depth]:
            layer = node.operation
            ins, outs = node.input_tensors, node.output_tensors
            if node.is_input:
                for t in outs:
                    tensor_group[id(t)] = (groups.new(t.shape[-1], blocked="input"), 1)
                continue
            in_groups = [group_of(t, layer) for t in ins]
            # A layer called more than once would need one slicing per call.
            supported = (
                _channels_last(layer) and len(outs) == 1 and uses[id(layer)] == 1
            )
            if (
                isinstance(layer, _PRODUCERS)
                and supported
                and getattr(layer, "groups", 1) == 1
            ):
                g, spatial = in_groups[0]
                groups.get(g)["consumers"].append((layer, spatial))
                new = groups.new(outs[0].shape[-1])
                groups.get(new)["producers"].append(layer)
                mixing = _mixing_activation(layer)
                if mixing is not None:
                    groups.get(new)["unsupported"] = (
                        f"layer {layer.name!r} (its activation {mixing!r} mixes "
                        "the channels)"
                    )
                tensor_group[id(outs[0])] = (new, 1)
                continue
            if isinstance(layer, keras.layers.BatchNormalization) and supported:
                axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
                g, spatial = in_groups[0]
                if axis in (-1, len(ins[0].shape) - 1) and spatial == 1:
                    groups.get(g)["norms"].append(layer)
                    tensor_group[id(outs[0])] = (g, 1)
                    continue
            elif (
                isinstance(layer, _PASS_THROUGH)
                and supported
                and len(ins) == 1
                and _mixing_activation(layer) is None
            ):
                tensor_group[id(outs[0])] = in_groups[0]
                continue
            elif isinstance(layer, _MERGE) and supported:
                if len({s for _, s in in_groups}) == 1 and all(
                    t.shape[-1] == ins[0].shape[-1] for t in ins
                ):
                    g = in_groups[0][0]
                    for other, _ in in_groups[1:]:
                        g = groups.union(g, other)
                    tensor_group[id(outs[0])] = (g, in_groups[0][1])
                    continue
            elif isinstance(layer, keras.layers.Flatten) and supported:
                g, spatial = in_groups[0]
                shape = ins[0].shape
                if all(d is not None for d in shape[1:]):
                    tensor_group[id(outs[0])] = (g, spatial * math.prod(shape[1:-1]))
                    continue
            # Anything else: its inputs' channels cannot be sliced through it.
            what = f"layer {layer.name!r}"
            mixing = _mixing_activation(layer)
            if mixing is not None:
                what += f" (its activation {mixing!r} mixes the channels)"
            elif uses[id(layer)] > 1:
                what += " (called more than once)"
            for g, _ in in_groups:
                info = groups.get(g)
                info["unsupported"] = info["unsupported"] or what
            for t in outs:
                tensor_group[id(t)] = (
                    groups.new(t.shape[-1], blocked="unsupported"),
                    1,
                )

    for t in graph.outputs:
        g, _ = tensor_group[id(t)]
        info = groups.get(g)
        info["blocked"] = info["blocked"] or "output"
    roots = sorted({groups.find(g) for g in range(len(groups.parent))})
    return [groups.info[r] for r in roots]


def _mixing_activation(layer):
    """The name of `layer`'s activation if it is not applied per channel, else `None`."""
    activation = getattr(layer, "activation", None)
    if activation is None:
        return None
    name = getattr(activation, "__name__", None) or type(activation).__name__
    return None if name in _ELEMENTWISE_ACTIVATIONS else name


def _check_fraction(fraction, criterion):
    fraction = check_number("fraction", fraction, low=0.0, high=1.0, high_open=True)
    criterion = check_choice("criterion", criterion, ("l1", "l2"))
    return fraction, criterion


def shrink_plan(model, fraction, criterion="l1"):
    """Which channels `shrink` keeps, without building the smaller model.

    Args:
        model: A built Sequential or functional model.
        fraction: Fraction in [0, 1) of the channels of each shrinkable group
            to remove (rounded; at least one channel stays).
        criterion: `"l1"` or `"l2"` norm of each unit's incoming weights,
            summed over the layers of a group. Defaults to `"l1"`.

    Returns:
        List of dicts, one per shrinkable group: `"producers"` (layer names),
        `"consumers"` (layer names), `"norms"` (BatchNormalization names),
        `"channels"` (count before) and `"keep"` (sorted kept indices).

    Raises:
        ValueError: For a bad argument, a model that is not Sequential or
            functional, or a group of channels that reaches a layer that
            cannot be sliced (the error names it).
    """
    fraction, criterion = _check_fraction(fraction, criterion)
    plan = []
    for info in _analyse(model):
        if not info["producers"] or info["blocked"]:
            continue
        if info["unsupported"]:
            raise ValueError(
                "Invalid value for argument `model`. Expected the outputs of "
                f"{[p.name for p in info['producers']]} to reach only Dense, Conv, "
                "BatchNormalization, per-channel and element-wise merge layers. "
                f"Received: model={model.name!r} feeding them to "
                f"{info['unsupported']}, which `shrink` cannot slice"
            )
        channels = int(info["channels"])
        scores = sum(
            _keras_internals.to_numpy(unit_scores(p.kernel, criterion)).astype(
                "float64"
            )
            for p in info["producers"]
        )
        n_keep = max(channels - int(round(fraction * channels)), 1)
        keep = np.sort(np.argsort(-scores, kind="stable")[:n_keep])
        plan.append(
            {
                "producers": [p.name for p in info["producers"]],
                "consumers": [(c.name, s) for c, s in info["consumers"]],
                "norms": [n.name for n in info["norms"]],
                "channels": channels,
                "keep": keep,
            }
        )
    return plan


def _expand(keep, channels, spatial):
    if spatial == 1:
        return keep
    return (np.arange(spatial)[:, None] * channels + keep[None, :]).reshape(-1)


def shrink(model, fraction, criterion="l1"):
    """A smaller copy of a model without its least important units and filters.

    For each channel group (see the module doc) the `round(fraction * n)`
    channels with the smallest `criterion` norm of their incoming weights are
    removed: the output units of the Dense/Conv layers that make them, the
    matching input slices of the layers that consume them and the matching
    BatchNormalization parameters. The new model computes exactly what the
    original computes when those channels' contributions to their consumers
    are zeroed (the "unit-masked" model). Fine-tune it briefly afterwards.
    A group whose channels meet an activation that mixes them (softmax,
    log_softmax, glu, sparsemax or a custom one) is an error, as is any layer
    the channels cannot be sliced through; a copy from which nothing could
    be removed comes with a warning.

    Args:
        model: A built Sequential or functional model (pruned or not).
        fraction: Fraction in [0, 1) of channels to remove from each group.
        criterion: `"l1"` or `"l2"`. Defaults to `"l1"`.

    Returns:
        A new model of the same kind with fewer parameters; `model` is left
        unchanged.

    Raises:
        ValueError: See `shrink_plan`.

    Example:

    ```python
    small = shrink(model, fraction=0.5)
    small.compile(...)
    small.fit(...)  # a short fine-tune
    ```
    """
    plan = shrink_plan(model, fraction, criterion)
    removed = sum(group["channels"] - len(group["keep"]) for group in plan)
    if fraction > 0 and removed == 0:
        why = (
            f"with fraction={fraction:g}, round(fraction * channels) is 0 for "
            f"each of its {len(plan)} groups"
            if plan
            else "no group of its channels can be shrunk (every Dense/Conv "
            "output reaches a model output, or comes from a layer called more "
            "than once)"
        )
        warnings.warn(
            f"`shrink` removed nothing from model {model.name!r}: {why}. The "
            "copy returned is the same size.",
            stacklevel=2,
        )
    out_keep, in_keep, norm_keep = {}, {}, {}
    for group in plan:
        for name in group["producers"]:
            out_keep[name] = group["keep"]
        for name, spatial in group["consumers"]:
            in_keep[name] = _expand(group["keep"], group["channels"], spatial)
        for name in group["norms"]:
            norm_keep[name] = group["keep"]

    def clone_layer(layer):
        config = layer.get_config()
        if layer.name in out_keep:
            key = "units" if isinstance(layer, keras.layers.Dense) else "filters"
            config[key] = len(out_keep[layer.name])
        return layer.__class__.from_config(config)

    small = keras.models.clone_model(model, clone_function=clone_layer)
    for layer in model.layers:
        if not layer.weights:
            continue
        new_layer = small.get_layer(layer.name)
        values = [_keras_internals.to_numpy(w) for w in layer.weights]
        if layer.name in out_keep or layer.name in in_keep:
            kernel = values[0]
            if layer.name in in_keep:
                kernel = np.take(kernel, in_keep[layer.name], axis=-2)
            if layer.name in out_keep:
                kernel = np.take(kernel, out_keep[layer.name], axis=-1)
                values[1:] = [
                    np.take(v, out_keep[layer.name], axis=-1) for v in values[1:]
                ]
            values[0] = kernel
        elif layer.name in norm_keep:
            values = [np.take(v, norm_keep[layer.name], axis=-1) for v in values]
        new_layer.set_weights(values)
    return small
