"""How `shrink_transformer` rebuilds each kind of model from a smaller config.

Which weight axes shrink together is found from the traced graph
(`coupling`), for any model. Building the smaller model is the part that
needs to know a model's constructor: a keras-hub backbone is rebuilt from
its config with smaller `num_heads`, `intermediate_dim`, `hidden_dim` and
`num_layers`; a functional Keras model is cloned with smaller configs for
the layers whose weights shrink. Each family here says which config fields
hold those sizes, and what else its constructor derives from them.
"""

import math

import keras
import numpy as np

from keras_stability._checks import invalid

SIZE_NAMES = ("num_heads", "intermediate_dim", "hidden_dim", "num_layers")


def _tensor(x):
    return x[0] if isinstance(x, (list, tuple)) else x


class Family:
    """Base adapter: the model, the functional model holding the blocks, sizes."""

    # Query heads per unit of head pruning (grouped-query attention removes
    # whole groups that share a key/value head).
    group_size = 1

    def __init__(self, model, root):
        self.model = model
        self.root = root

    def block_io(self, block):
        """The block's input and output hidden states (Keras tensors of `root`)."""
        return _tensor(block.input), _tensor(block.output)

    def head_units(self, num_heads):
        return num_heads // self.group_size

    def ffn_units(self, intermediate_dim):
        return intermediate_dim

    def correct(self, new_model, ratio):
        """Family-specific fixes after the weights are copied (none by default)."""


# -- keras-hub backbones ---------------------------------------------------------

# Config fields of the keras-hub backbones we rebuild, and what each derives.
_HUB = {
    "GPT2Backbone": {
        "heads": "num_heads",
        "kv_heads": None,
        "ffn_factor": 1,
        "head_dim_from_hidden": True,
    },
    "GemmaBackbone": {
        "heads": "num_query_heads",
        "kv_heads": "num_key_value_heads",
        "ffn_factor": 2,  # GemmaDecoderBlock's FFN has intermediate_dim // 2 units
        "head_dim_from_hidden": False,
    },
    "LlamaBackbone": {
        "heads": "num_query_heads",
        "kv_heads": "num_key_value_heads",
        "ffn_factor": 1,
        "head_dim_from_hidden": True,
    },
}


class HubFamily(Family):
    """A keras-hub backbone (or a `CausalLM` around one) from `_HUB`."""

    def __init__(self, model, backbone):
        super().__init__(model, backbone)
        self.backbone = backbone
        self.spec = _HUB[type(backbone).__name__]
        self.blocks = list(backbone.transformer_layers)
        config = backbone.get_config()
        self.config = config
        heads = config[self.spec["heads"]]
        kv = config[self.spec["kv_heads"]] if self.spec["kv_heads"] else heads
        self.group_size = heads // kv
        self.head_dim = (
            config["hidden_dim"] // heads
            if self.spec["head_dim_from_hidden"]
            else config["head_dim"]
        )
        self.sizes = {
            "num_heads": heads,
            "intermediate_dim": config["intermediate_dim"],
            "hidden_dim": config["hidden_dim"],
            "num_layers": config["num_layers"],
        }

    def ffn_units(self, intermediate_dim):
        return intermediate_dim // self.spec["ffn_factor"]

    def check(self, sizes):
        name = type(self.backbone).__name__
        factor = self.spec["ffn_factor"]
        if sizes["intermediate_dim"] % factor:
            raise invalid(
                "intermediate_dim",
                sizes["intermediate_dim"],
                f"a multiple of {factor} ({name} gives its FFN intermediate_dim // "
                f"{factor} units)",
            )
        if sizes["num_heads"] % self.group_size:
            raise invalid(
                "num_heads",
                sizes["num_heads"],
                f"a multiple of {self.group_size}: {name} shares each key/value head "
                f"among {self.group_size} query heads, and heads are removed in "
                "those groups",
            )
        if self.spec["head_dim_from_hidden"]:
            needed = sizes["num_heads"] * self.head_dim
            if sizes["hidden_dim"] != needed:
                raise invalid(
                    "hidden_dim"
                    if sizes["hidden_dim"] != self.sizes["hidden_dim"]
                    else "num_heads",
                    sizes["hidden_dim"]
                    if sizes["hidden_dim"] != self.sizes["hidden_dim"]
                    else sizes["num_heads"],
                    f"num_heads * head_dim == hidden_dim: {name} derives head_dim = "
                    f"hidden_dim // num_heads (= {self.head_dim} now), so heads and "
                    "hidden size shrink together (e.g. "
                    f"num_heads={max(sizes['num_heads'], 1)}, "
                    f"hidden_dim={max(sizes['num_heads'], 1) * self.head_dim})",
                )

    def sample_inputs(self, batch=2):
        length = min(8, self.config.get("max_sequence_length") or 8)
        return {
            "token_ids": np.zeros((batch, length), "int32"),
            "padding_mask": np.ones((batch, length), "int32"),
        }

    def build(self, sizes, keep_blocks):
        config = dict(self.config)
        units = self.head_units(sizes["num_heads"])
        config[self.spec["heads"]] = sizes["num_heads"]
        if self.spec["kv_heads"]:
            config[self.spec["kv_heads"]] = units
        config["intermediate_dim"] = sizes["intermediate_dim"]
        config["hidden_dim"] = sizes["hidden_dim"]
        config["num_layers"] = len(keep_blocks)
        backbone = type(self.backbone).from_config(config)
        if self.model is self.backbone:
            return backbone
        return type(self.model)(backbone=backbone, preprocessor=self.model.preprocessor)

    def pairs(self, new_model, keep_blocks):
        new_backbone = getattr(new_model, "backbone", new_model)
        index = {id(b): k for k, b in enumerate(new_backbone.transformer_layers)}
        out = []
        for layer in new_backbone.layers:
            if not layer.weights:
                continue
            if id(layer) in index:
                out.append((self.blocks[keep_blocks[index[id(layer)]]], layer))
            else:
                out.append((self.backbone.get_layer(layer.name), layer))
        return out

    def correct(self, new_model, ratio):
        if type(self.backbone).__name__ != "GemmaBackbone":
            return
        backbone = new_model.backbone if hasattr(new_model, "backbone") else new_model
        old_hidden = self.sizes["hidden_dim"]
        new_hidden = backbone.hidden_dim
        if new_hidden != old_hidden:
            # Gemma scales the embeddings by sqrt(hidden_dim) and ties the
            # output projection to them: keep the blocks' inputs and the
            # logits as they were.
            c = math.sqrt(old_hidden / new_hidden)
            emb = backbone.token_embedding.embeddings
            emb.assign(emb * c)
            scale = backbone.layer_norm.scale
            scale.assign((1.0 + scale) / c - 1.0)
        if not self.config.get("query_head_dim_normalize", True):
            old = old_hidden // self.sizes["num_heads"]
            new = new_hidden // backbone.num_query_heads
            if old != new:
                for block in backbone.transformer_layers:
                    kernel = block.attention.query_dense.kernel
                    kernel.assign(kernel * math.sqrt(new / old))


# -- functional Keras models ---------------------------------------------------


def _block_classes():
    from keras_stability.layers import StableTransformerBlock

    return (StableTransformerBlock,)


class FunctionalFamily(Family):
    """A functional model of `StableTransformerBlock`s (e.g. the char LM)."""

    def __init__(self, model):
        super().__init__(model, model)
        self.blocks = [
            layer for layer in model.layers if isinstance(layer, _block_classes())
        ]
        heads = {b.num_heads for b in self.blocks}
        units = {b.mlp_in.units for b in self.blocks}
        self.head_dims = {b.name: b.attention.key_dim for b in self.blocks}
        self.sizes = {
            "num_heads": heads.pop() if len(heads) == 1 else None,
            "intermediate_dim": units.pop() if len(units) == 1 else None,
            "hidden_dim": None,  # set from the trace
            "num_layers": len(self.blocks),
        }

    def check(self, sizes):
        return None

    def sample_inputs(self, batch=2):
        shape = self.model.input_shape
        if isinstance(shape, list) or len(shape) != 2 or shape[1] is None:
            raise invalid(
                "data",
                None,
                "calibration inputs for a model whose input is not one "
                "(batch, sequence) array of a known length",
            )
        return np.zeros((batch, shape[1]), "int32")

    # Names of top-level Embedding/Dense layers whose output width is the
    # hidden size and shrinks; set by the caller before `build`.
    resized_outputs = ()

    def build(self, sizes, keep_blocks):
        """Clones the model with smaller configs and without the removed blocks."""
        from keras_stability.layers import StableTransformerBlock
        from keras_stability.models import TokenAndPositionEmbedding

        removed = {
            id(b) for k, b in enumerate(self.blocks) if k not in set(keep_blocks)
        }
        old_by_name = {layer.name: layer for layer in self.model.layers}
        hidden = sizes["hidden_dim"]

        def clone(layer):
            if not layer.weights:
                # Stateless: share it (a Lambda cannot be re-created safely).
                return layer
            config = layer.get_config()
            if isinstance(layer, StableTransformerBlock):
                config["num_heads"] = sizes["num_heads"]
                config["key_dim"] = self.head_dims[layer.name]
                config["intermediate_dim"] = sizes["intermediate_dim"]
            elif isinstance(layer, TokenAndPositionEmbedding):
                config["hidden_dim"] = hidden
            elif layer.name in self.resized_outputs:
                if isinstance(layer, keras.layers.Embedding):
                    config["output_dim"] = hidden
                elif isinstance(layer, keras.layers.Dense):
                    config["units"] = hidden
            return layer.__class__.from_config(config)

        def call(layer, *args, **kwargs):
            original = old_by_name.get(layer.name)
            if original is not None and id(original) in removed:
                return args[0]
            return layer(*args, **kwargs)

        return keras.models.clone_model(
            self.model, clone_function=clone, call_function=call
        )

    def pairs(self, new_model, keep_blocks):
        out = []
        for layer in new_model.layers:
            if layer.weights:
                out.append((self.model.get_layer(layer.name), layer))
        return out


def detect(model):
    """The `Family` of `model`, or raises the library's `ValueError`."""
    backbone = getattr(model, "backbone", None)
    candidate = backbone if backbone is not None else model
    if type(candidate).__name__ in _HUB and hasattr(candidate, "transformer_layers"):
        if backbone is not None and len(model.weights) != len(backbone.weights):
            raise invalid(
                "model",
                model.name,
                "a keras-hub task whose weights are all in its backbone",
            )
        return HubFamily(model, candidate)
    if (
        isinstance(model, keras.Model)
        and hasattr(model, "_nodes_by_depth")
        and not (isinstance(model, keras.Sequential))
    ):
        family = FunctionalFamily(model)
        if family.blocks:
            return family
    raise invalid(
        "model",
        getattr(model, "name", model),
        "a keras-hub GPT2Backbone, GemmaBackbone or LlamaBackbone (or a CausalLM "
        "around one), or a functional model of StableTransformerBlock layers "
        "(e.g. build_char_transformer)",
    )
