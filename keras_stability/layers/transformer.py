"""`StableTransformerBlock`: a decoder block with the stabilisers of large-model practice."""

import keras
from keras import ops

from keras_stability._checks import check_bool
from keras_stability._checks import check_choice
from keras_stability._checks import check_number
from keras_stability._checks import check_positive_int
from keras_stability._checks import invalid
from keras_stability.layers.residual import NORM_TYPES
from keras_stability.layers.residual import make_norm

__all__ = ["QKNormMultiHeadAttention", "StableTransformerBlock"]


def _check_activation(activation):
    """Returns the serialized activation, or raises naming `activation`."""
    try:
        function = keras.activations.get(activation)
    except (ValueError, TypeError):
        raise invalid(
            "activation", activation, "an activation name such as 'gelu' or a callable"
        ) from None
    return keras.activations.serialize(function)


@keras.saving.register_keras_serializable(package="keras_stability")
class QKNormMultiHeadAttention(keras.layers.MultiHeadAttention):
    """`keras.layers.MultiHeadAttention` that normalizes queries and keys per head.

    Query and key projections are normalized over the head dimension before
    the scaled dot product (QK-normalization). This bounds the attention
    logits, whose growth makes the softmax collapse to one-hot and the loss
    diverge in large transformers. Everything else is Keras' layer; only the
    documented extension point `_compute_attention` is overridden.

    Args:
        num_heads: Number of attention heads, a positive integer.
        key_dim: Size of each head for query and key, a positive integer.
        norm_type: `"rms"` (`keras.layers.RMSNormalization`) or `"layer"`
            (`keras.layers.LayerNormalization`). Defaults to `"rms"`.
        epsilon: Epsilon of the query and key normalizations (Keras'
            `epsilon` of `LayerNormalization` / `RMSNormalization`).
            Defaults to `1e-6`.
        **kwargs: Arguments of `keras.layers.MultiHeadAttention`.

    Raises:
        ValueError: On a non-positive `num_heads` or `key_dim`, an unknown
            `norm_type` or a non-positive `epsilon`.

    Reference:
        Dehghani et al., "Scaling Vision Transformers to 22 Billion
        Parameters", 2023; Henry et al., "Query-Key Normalization for
        Transformers", 2020.
    """

    def __init__(self, num_heads, key_dim, norm_type="rms", epsilon=1e-6, **kwargs):
        num_heads = check_positive_int("num_heads", num_heads)
        key_dim = check_positive_int("key_dim", key_dim)
        norm_type = check_choice("norm_type", norm_type, NORM_TYPES)
        epsilon = check_number("epsilon", epsilon, low=0.0, low_open=True)
        super().__init__(num_heads=num_heads, key_dim=key_dim, **kwargs)
        self.norm_type = norm_type
        self.epsilon = epsilon
        self._query_norm = make_norm(
            norm_type, epsilon, name="query_norm", dtype=self.dtype_policy
        )
        self._key_norm = make_norm(
            norm_type, epsilon, name="key_norm", dtype=self.dtype_policy
        )

    def build(self, query_shape, value_shape, key_shape=None):
        super().build(query_shape, value_shape, key_shape)
        head_shape = (None, None, self._num_heads, self._key_dim)
        self._query_norm.build(head_shape)
        self._key_norm.build(head_shape)

    def _compute_attention(
        self,
        query,
        key,
        value,
        attention_mask=None,
        training=None,
        return_attention_scores=False,
        **kwargs,
    ):
        query = self._query_norm(query)
        key = self._key_norm(key)
        return super()._compute_attention(
            query,
            key,
            value,
            attention_mask,
            training,
            return_attention_scores,
            **kwargs,
        )

    def get_config(self):
        config = super().get_config()
        config.update({"norm_type": self.norm_type, "epsilon": self.epsilon})
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if "norm_epsilon" in config:  # files saved before the rename to `epsilon`
            config["epsilon"] = config.pop("norm_epsilon")
        return super().from_config(config)


@keras.saving.register_keras_serializable(package="keras_stability")
class StableTransformerBlock(keras.layers.Layer):
    """A transformer decoder block: causal self-attention and an MLP, pre-norm by default.

    With `norm="pre"` each sub-layer is `x + s * f(norm(x))`, the placement
    that lets deep stacks train without warm-up tricks; `norm="post"` gives
    the original `norm(x + f(x))`. `qk_norm=True` normalizes queries and keys
    per head (`QKNormMultiHeadAttention`); `layerscale_init` adds a learned
    per-channel scale `s` on both branches, starting at that value. The
    attention is Keras' `MultiHeadAttention`; the normalizations are Keras'
    `LayerNormalization` / `RMSNormalization`.

    Input and output: `(batch, sequence, hidden)`. A padding mask (from
    `Embedding(mask_zero=True)`) masks the attention's keys and is passed on.

    Args:
        num_heads: Number of attention heads, a positive integer.
        key_dim: Size of each head; `hidden // num_heads` if `None`.
            Defaults to `None`.
        intermediate_dim: Width of the MLP; `4 * hidden` if `None`.
            Defaults to `None`.
        dropout: Dropout rate on attention probabilities and on both
            branches, in [0, 1). Defaults to `0.0`.
        norm: `"pre"` or `"post"`. Defaults to `"pre"`.
        norm_type: `"layer"` or `"rms"`. Defaults to `"layer"`.
        qk_norm: Normalize queries and keys per head. Defaults to `False`.
        layerscale_init: Initial LayerScale value (> 0), or `None` for no
            LayerScale. Defaults to `None`.
        causal: Mask attention to future positions. Defaults to `True`.
        activation: Activation of the MLP. Defaults to `"gelu"`.
        epsilon: Epsilon of the normalizations. Defaults to `1e-6`.
        **kwargs: Base `Layer` arguments (`name`, `dtype`, ...).

    Raises:
        ValueError: On a bad argument, and at build time if `key_dim` is
            `None` and `hidden` is not divisible by `num_heads`.

    Example:

    >>> ids = keras.Input(shape=(16,), dtype="int32")
    >>> x = keras.layers.Embedding(100, 32)(ids)
    >>> x = StableTransformerBlock(num_heads=4, qk_norm=True,
    ...                            layerscale_init=1e-4)(x)
    >>> logits = keras.layers.Dense(100)(x)

    Reference:
        Xiong et al., "On Layer Normalization in the Transformer
        Architecture", 2020; Dehghani et al., "Scaling Vision Transformers to
        22 Billion Parameters", 2023; Touvron et al., "Going deeper with Image
        Transformers", 2021.
    """

    def __init__(
        self,
        num_heads,
        key_dim=None,
        intermediate_dim=None,
        dropout=0.0,
        norm="pre",
        norm_type="layer",
        qk_norm=False,
        layerscale_init=None,
        causal=True,
        activation="gelu",
        epsilon=1e-6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = check_positive_int("num_heads", num_heads)
        self.key_dim = (
            None if key_dim is None else check_positive_int("key_dim", key_dim)
        )
        self.intermediate_dim = (
            None
            if intermediate_dim is None
            else check_positive_int("intermediate_dim", intermediate_dim)
        )
        self.dropout = check_number(
            "dropout", dropout, low=0.0, high=1.0, high_open=True
        )
        self.norm = check_choice("norm", norm, ("pre", "post"))
        self.norm_type = check_choice("norm_type", norm_type, NORM_TYPES)
        self.qk_norm = check_bool("qk_norm", qk_norm)
        self.layerscale_init = (
            None
            if layerscale_init is None
            else check_number(
                "layerscale_init", layerscale_init, low=0.0, low_open=True
            )
        )
        self.causal = check_bool("causal", causal)
        self.activation = _check_activation(activation)
        self.epsilon = check_number("epsilon", epsilon, low=0.0, low_open=True)
        # A padding mask (`Embedding(mask_zero=True)`) reaches the attention
        # through the normalized input and is handed on to the next layer.
        self.supports_masking = True

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 3:
            raise ValueError(
                "Invalid input shape for `StableTransformerBlock`. Expected "
                f"(batch, sequence, hidden). Received: input_shape={input_shape}"
            )
        hidden = input_shape[-1]
        key_dim = self.key_dim
        if key_dim is None:
            if hidden % self.num_heads:
                raise ValueError(
                    "Invalid value for argument `num_heads`. Expected a divisor of "
                    f"the hidden size {hidden}, or pass `key_dim`. Received: "
                    f"num_heads={self.num_heads}"
                )
            key_dim = hidden // self.num_heads
        attention_kwargs = dict(
            num_heads=self.num_heads,
            key_dim=key_dim,
            dropout=self.dropout,
            name="attention",
            # The policy reaches the sublayers so that an int8 `.keras` file
            # (a `DTypePolicyMap` by path) reloads quantized.
            dtype=self.dtype_policy,
        )
        if self.qk_norm:
            self.attention = QKNormMultiHeadAttention(
                norm_type=self.norm_type, epsilon=self.epsilon, **attention_kwargs
            )
        else:
            self.attention = keras.layers.MultiHeadAttention(**attention_kwargs)
        self.attention.build(input_shape, input_shape)
        self.attention_norm = make_norm(
            self.norm_type, self.epsilon, name="attention_norm", dtype=self.dtype_policy
        )
        self.attention_norm.build(input_shape)
        self.mlp_norm = make_norm(
            self.norm_type, self.epsilon, name="mlp_norm", dtype=self.dtype_policy
        )
        self.mlp_norm.build(input_shape)
        self.mlp_in = keras.layers.Dense(
            self.intermediate_dim or 4 * hidden,
            activation=self.activation,
            name="mlp_in",
            dtype=self.dtype_policy,
        )
        self.mlp_in.build(input_shape)
        self.mlp_out = keras.layers.Dense(
            hidden, name="mlp_out", dtype=self.dtype_policy
        )
        self.mlp_out.build(input_shape[:-1] + (self.intermediate_dim or 4 * hidden,))
        self.branch_dropout = keras.layers.Dropout(
            self.dropout, dtype=self.dtype_policy
        )
        if self.layerscale_init is not None:
            init = keras.initializers.Constant(self.layerscale_init)
            self.attention_scale = self.add_weight(
                shape=(hidden,), initializer=init, name="attention_layerscale"
            )
            self.mlp_scale = self.add_weight(
                shape=(hidden,), initializer=init, name="mlp_layerscale"
            )
        else:
            self.attention_scale = self.mlp_scale = None

    def _branch(self, x, scale, training):
        x = self.branch_dropout(x, training=training)
        if scale is not None:
            x = x * ops.cast(scale, x.dtype)
        return x

    def call(self, inputs, training=None):
        x = inputs
        h = self.attention_norm(x) if self.norm == "pre" else x
        h = self.attention(h, h, use_causal_mask=self.causal, training=training)
        x = x + self._branch(h, self.attention_scale, training)
        if self.norm == "post":
            x = self.attention_norm(x)
        h = self.mlp_norm(x) if self.norm == "pre" else x
        h = self.mlp_out(self.mlp_in(h))
        x = x + self._branch(h, self.mlp_scale, training)
        if self.norm == "post":
            x = self.mlp_norm(x)
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "key_dim": self.key_dim,
                "intermediate_dim": self.intermediate_dim,
                "dropout": self.dropout,
                "norm": self.norm,
                "norm_type": self.norm_type,
                "qk_norm": self.qk_norm,
                "layerscale_init": self.layerscale_init,
                "causal": self.causal,
                "activation": self.activation,
                "epsilon": self.epsilon,
            }
        )
        return config
