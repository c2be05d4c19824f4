"""`Residual`: a residual branch with normalization placement and branch scaling."""

import keras
from keras import ops

from keras_stability._checks import check_choice
from keras_stability._checks import check_number
from keras_stability._checks import check_positive_int

__all__ = ["Residual", "deepnorm_constants", "make_norm"]

NORMS = ("pre", "post", None)
SCALES = (None, "rezero", "layerscale", "deepnorm")
NORM_TYPES = ("layer", "rms")


def deepnorm_constants(depth):
    """DeepNorm's residual and initialisation constants for `depth` layers.

    DeepNet (Wang et al., 2022) computes `x_{l+1} = LN(alpha * x_l + G(x_l))`
    and scales the initialisation of the branch weights by `beta`. For an
    encoder-only or decoder-only stack of `depth` layers,
    `alpha = (2 * depth) ** 0.25` and `beta = (8 * depth) ** -0.25`.

    Args:
        depth: Number of residual layers in the stack, a positive integer.

    Returns:
        Tuple `(alpha, beta)` of Python floats.

    Raises:
        ValueError: If `depth` is not a positive integer.

    Example:

    >>> deepnorm_constants(8)
    (2.0, 0.3535533905932738)

    Reference:
        Wang et al., "DeepNet: Scaling Transformers to 1,000 Layers", 2022.
    """
    depth = check_positive_int("depth", depth)
    return (2.0 * depth) ** 0.25, (8.0 * depth) ** -0.25


@keras.saving.register_keras_serializable(
    package="keras_stability", name="MaskedRMSNormalization"
)
class _MaskedRMSNormalization(keras.layers.RMSNormalization):
    """`keras.layers.RMSNormalization` that hands a padding mask on.

    It normalizes each position alone, as `LayerNormalization` does, which
    Keras lets pass the mask; Keras' own drops it, and the attention after
    it then attended to the padded keys.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True


def make_norm(norm_type, epsilon, name=None, dtype=None):
    """Keras' `LayerNormalization` or `RMSNormalization` over the last axis.

    `dtype` is the owning layer's policy, so a `dtype=` given to that layer
    (other than the global policy) reaches its normalization too. Both hand
    a padding mask on to the layer after them.
    """
    if norm_type == "rms":
        return _MaskedRMSNormalization(epsilon=epsilon, name=name, dtype=dtype)
    return keras.layers.LayerNormalization(epsilon=epsilon, name=name, dtype=dtype)


@keras.saving.register_keras_serializable(package="keras_stability")
class Residual(keras.layers.Layer):
    """Wraps a layer or sub-model as a residual branch `x + scale * block(x)`.

    Deep stacks train when every block starts close to the identity. This
    wrapper adds the skip connection around any `block` whose output has the
    shape of its input, places the normalization before the branch
    (`norm="pre"`: `x + s * block(norm(x))`), after the sum
    (`norm="post"`: `norm(a * x + s * block(x))`) or nowhere (`norm=None`),
    and scales the branch:

    - `scale="rezero"`: `s` is one learned scalar that starts at 0, so with
      `norm="pre"` or `norm=None` the layer is exactly the identity at
      initialisation (ReZero).
    - `scale="layerscale"`: `s` is a learned per-channel vector that starts
      at `layerscale_init` (LayerScale, CaiT).
    - `scale="deepnorm"`: the skip is multiplied by the constant
      `a = (2 * depth) ** 0.25` (DeepNorm; meant for `norm="post"`). The
      matching down-scaling of the branch initialisation by
      `beta = (8 * depth) ** -0.25` is left to the block's initializers;
      `deepnorm_constants(depth)` returns both numbers.
    - `scale=None`: `s = 1`.

    Args:
        block: A Keras layer or model whose output shape equals its input
            shape.
        norm: `"pre"`, `"post"` or `None`. Defaults to `"pre"`.
        scale: `None`, `"rezero"`, `"layerscale"` or `"deepnorm"`.
            Defaults to `None`.
        norm_type: `"layer"` (`keras.layers.LayerNormalization`) or `"rms"`
            (`keras.layers.RMSNormalization`). Defaults to `"layer"`.
        layerscale_init: Initial value of the LayerScale vector, > 0.
            Defaults to `1e-4`.
        depth: Number of residual layers in the whole stack; required by
            `scale="deepnorm"`, and `None` otherwise. Defaults to `None`.
        epsilon: Epsilon of the normalization. Defaults to `1e-6`.
        **kwargs: Base `Layer` arguments (`name`, `dtype`, ...).

    Raises:
        ValueError: On an unknown `norm`, `scale` or `norm_type`, a
            non-positive `layerscale_init`, a missing `depth` for DeepNorm
            (or one given without it),
            and, at build time, a `block` that changes the feature shape.

    Example:

    >>> block = keras.Sequential([keras.layers.Dense(32, activation="relu"),
    ...                           keras.layers.Dense(16)])
    >>> layer = Residual(block, norm="pre", scale="rezero")
    >>> x = keras.ops.ones((2, 16))
    >>> bool(keras.ops.all(layer(x) == x))
    True

    Reference:
        Bachlechner et al., "ReZero is All You Need", 2020;
        Touvron et al., "Going deeper with Image Transformers" (LayerScale),
        2021; Wang et al., "DeepNet: Scaling Transformers to 1,000 Layers",
        2022.
    """

    def __init__(
        self,
        block,
        norm="pre",
        scale=None,
        norm_type="layer",
        layerscale_init=1e-4,
        depth=None,
        epsilon=1e-6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(block, keras.layers.Layer):
            raise ValueError(
                "Invalid value for argument `block`. Expected a Keras layer or "
                f"model. Received: block={block!r}"
            )
        self.norm = check_choice("norm", norm, NORMS)
        self.scale = check_choice("scale", scale, SCALES)
        self.norm_type = check_choice("norm_type", norm_type, NORM_TYPES)
        self.layerscale_init = check_number(
            "layerscale_init", layerscale_init, low=0.0, low_open=True
        )
        self.epsilon = check_number("epsilon", epsilon, low=0.0, low_open=True)
        if scale == "deepnorm" and depth is None:
            raise ValueError(
                "Invalid value for argument `depth`. Expected the number of "
                "residual layers of the stack (a positive integer) when "
                "scale='deepnorm'. Received: depth=None"
            )
        if scale != "deepnorm" and depth is not None:
            raise ValueError(
                "Invalid value for argument `depth`. Expected None: only "
                "scale='deepnorm' uses it (the DeepNorm constant). Received: "
                f"depth={depth!r} with scale={scale!r}"
            )
        self.depth = None if depth is None else check_positive_int("depth", depth)
        self.block = block
        self.norm_layer = (
            None
            if norm is None
            else make_norm(
                norm_type, self.epsilon, name="norm", dtype=self.dtype_policy
            )
        )
        self._skip_scale = (
            deepnorm_constants(self.depth)[0] if scale == "deepnorm" else 1.0
        )
        self.supports_masking = True

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if self.norm_layer is not None:
            self.norm_layer.build(input_shape)
        if not self.block.built:
            self.block.build(input_shape)
        output_shape = self._block_output_shape(input_shape)
        if tuple(output_shape)[1:] != input_shape[1:]:
            raise ValueError(
                "Invalid value for argument `block`. Expected a layer that keeps "
                f"the feature shape {input_shape[1:]} (its output is added to its "
                f"input); end the block with a projection to {input_shape[-1]} "
                f"features. Received: block={self.block.name!r} with output "
                f"shape {tuple(output_shape)}"
            )
        if self.scale == "rezero":
            self.branch_scale = self.add_weight(
                shape=(), initializer="zeros", name="rezero_alpha"
            )
        elif self.scale == "layerscale":
            self.branch_scale = self.add_weight(
                shape=(input_shape[-1],),
                initializer=keras.initializers.Constant(self.layerscale_init),
                name="layerscale_gamma",
            )
        else:
            self.branch_scale = None

    def _block_output_shape(self, input_shape):
        try:
            return self.block.compute_output_shape(input_shape)
        except NotImplementedError:
            spec = self.block.compute_output_spec(
                keras.KerasTensor(input_shape, dtype=self.compute_dtype)
            )
            return spec.shape

    def call(self, inputs, training=None):
        branch = inputs
        if self.norm == "pre":
            branch = self.norm_layer(branch)
        branch = self.block(branch, training=training)
        if self.branch_scale is not None:
            branch = branch * ops.cast(self.branch_scale, branch.dtype)
        skip = inputs
        if self._skip_scale != 1.0:
            skip = skip * ops.cast(self._skip_scale, skip.dtype)
        outputs = skip + branch
        if self.norm == "post":
            outputs = self.norm_layer(outputs)
        return outputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "block": keras.saving.serialize_keras_object(self.block),
                "norm": self.norm,
                "scale": self.scale,
                "norm_type": self.norm_type,
                "layerscale_init": self.layerscale_init,
                "depth": self.depth,
                "epsilon": self.epsilon,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["block"] = keras.saving.deserialize_keras_object(config["block"])
        return cls(**config)
