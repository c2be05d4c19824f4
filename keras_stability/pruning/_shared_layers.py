"""Layers owned by two models of one graph, and the inlining that fixes them.

A keras-hub `CausalLM` is a functional model that calls its backbone (a
nested functional model) and then calls the backbone's `token_embedding`
again, in reverse, as its LM head: one layer with two owners, the backbone
and the outer graph. Keras writes such a layer's variables once, but
`load_model` builds the outer graph's layers from its config and the nested
model's from its own, so the layer comes back as two objects and one gets no
variables ("Layer 'token_embedding' expected 1 variables, but received 0").
Plain Keras models built that way fail alike. A layer called several times
within one graph (several nodes, one owner) saves and loads as one layer.

`inline_shared_submodels` rebuilds a functional model's graph with each
nested functional model that owns such a layer replaced by its own layers
(the same objects, called on the same tensors), so every shared layer has
one owner; `shared_layers` finds what is left.
"""

import keras

from keras_stability._keras_internals import flatten_layers
from keras_stability._keras_internals import is_graph_model
from keras_stability._keras_internals import run_through_graph


def _sublayers(layer):
    """The layers `layer` owns directly (its config or code creates them)."""
    return flatten_layers(layer, include_self=False, recursive=False)


def _owners(model):
    """`{id(layer): (layer, [owners])}` for every layer inside `model`."""
    owners = {}
    for parent in flatten_layers(model):
        for child in _sublayers(parent):
            entry = owners.setdefault(id(child), (child, []))
            if all(parent is not other for other in entry[1]):
                entry[1].append(parent)
    return owners


def shared_layers(model):
    """The layers inside `model` owned by more than one layer or model.

    Returns:
        A list of `(layer, owners)`, in `model`'s layer order.
    """
    return [entry for entry in _owners(model).values() if len(entry[1]) > 1]


def _to_inline(model):
    """The ids of the nested functional models that own (at any depth) a
    layer also owned outside them."""
    owners = _owners(model)
    result = set()
    for layer in flatten_layers(model, include_self=False):
        if not is_graph_model(layer) or isinstance(layer, keras.Sequential):
            continue
        inside = {id(sub) for sub in flatten_layers(layer)}
        if any(
            id(owner) not in inside
            for sub in flatten_layers(layer, include_self=False)
            for owner in owners[id(sub)][1]
        ):
            result.add(id(layer))
    return result


def inline_shared_submodels(model):
    """The outputs of `model`'s graph with its shared-layer submodels inlined.

    Replays `model`'s graph on `model.inputs`. A nested functional model
    that owns a layer also owned outside it is not called as one layer: its
    own graph is replayed in its place (recursively), with the same layer
    objects, so each of them ends up owned by the graph that calls it.
    Other layers and nested models are called as they are.

    Args:
        model: A functional Keras model.

    Returns:
        `(outputs, inlined)`: the outputs (in `model.output`'s structure) of
        the new graph from `model.input`, and the names of the inlined
        models (empty, with `outputs` `None`, when there are none).

    Raises:
        ValueError: If a nested model to inline was called with anything
            but its inputs (masks, `training`, other arguments).
    """
    to_inline = _to_inline(model)
    if not to_inline:
        return None, []
    inlined = []

    def operation_fn(operation):
        if id(operation) not in to_inline:
            return operation
        return lambda *args, **kwargs: call_inlined(operation, args, kwargs)

    def call_inlined(submodel, args, kwargs):
        # Keras passes `mask` (all None here: the inputs carry no mask) to
        # every layer it can; anything else would change the nested call.
        extra = sorted(
            k
            for k, v in kwargs.items()
            if any(x is not None for x in keras.tree.flatten(v))
        )
        if len(args) != 1 or extra:
            raise ValueError(
                f"Cannot inline the nested model `{submodel.name}`, which "
                f"shares layers with the graph around it: it is called with "
                f"arguments other than its inputs ({len(args)} positional, "
                f"keywords {extra})."
            )
        keras.tree.assert_same_structure(args[0], submodel.input)
        inlined.append(submodel.name)
        return run_through_graph(submodel, keras.tree.flatten(args[0]), operation_fn)

    outputs = run_through_graph(model, model.inputs, operation_fn)
    return outputs, inlined
