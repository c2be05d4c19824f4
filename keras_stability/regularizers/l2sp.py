"""`L2SP`: regularize fine-tuned weights toward their pretrained values."""

import keras
from keras import ops

from keras_stability._checks import check_bool
from keras_stability._checks import check_layer
from keras_stability._checks import check_number
from keras_stability._checks import invalid

__all__ = ["L2SP", "l2sp_penalty"]


def l2sp_penalty(weights, reference, alpha):
    """`alpha * sum((weights - reference) ** 2)`: the L2-SP term of one tensor.

    Args:
        weights: Tensor, the current weights.
        reference: Tensor of the same shape, the anchor `w0`.
        alpha: Strength, a number >= 0.

    Returns:
        Scalar tensor.

    Raises:
        ValueError: If `alpha` is not a number >= 0.
    """
    alpha = check_number("alpha", alpha, low=0.0)
    weights = ops.convert_to_tensor(weights)
    reference = ops.cast(reference, weights.dtype)
    return ops.cast(alpha, weights.dtype) * ops.sum(ops.square(weights - reference))


def _lora_delta(lora_a, lora_b, scale):
    """`scale * lora_a @ lora_b`: what LoRA adds to a frozen kernel.

    Keras' `enable_lora(rank)` on `Dense`, `EinsumDense` and `Embedding`
    computes the effective kernel as `kernel + (lora_alpha / rank) *
    matmul(lora_a, lora_b)`; this is the second term.

    Args:
        lora_a: Tensor `(..., rank)`.
        lora_b: Tensor `(rank, out)`.
        scale: `lora_alpha / rank`, a number.

    Returns:
        Tensor of the kernel's shape.
    """
    lora_a = ops.convert_to_tensor(lora_a)
    return ops.cast(scale, lora_a.dtype) * ops.matmul(
        lora_a, ops.cast(lora_b, lora_a.dtype)
    )


def _lora_parts(layer):
    """`(frozen kernel, lora_a, lora_b, scale)` of a LoRA-enabled layer, else `None`."""
    if not getattr(layer, "lora_enabled", False):
        return None
    if isinstance(layer, keras.layers.Embedding):
        base, a, b = layer._embeddings, layer.lora_embeddings_a, layer.lora_embeddings_b
    else:
        base, a, b = layer._kernel, layer.lora_kernel_a, layer.lora_kernel_b
    return base, a, b, layer.lora_alpha / layer.lora_rank


@keras.saving.register_keras_serializable(package="keras_stability")
class L2SP(keras.regularizers.Regularizer):
    """Penalizes the distance of backbone weights to their pretrained values.

    Fine-tuning with plain L2 pulls pretrained weights toward zero, forgetting
    what pretraining learned. L2-SP pulls them toward the starting point
    instead and keeps plain L2 for the new layers (the head), which have no
    starting point worth keeping:

        alpha * sum((w - w0) ** 2)   for an anchored (backbone) weight,
        beta * sum(w ** 2)           for any other weight.

    `w0` is the value of each weight when it was anchored: when `attach`
    ran ("at construction" of the fine-tuning model), or at the start of
    every `fit` if the callback from `anchor_callback()` is passed to `fit`.
    The anchors live in non-trainable variables held by this regularizer;
    they are not part of `get_config` and are not saved with the model, nor
    are the terms `attach` sets on the variables: a reloaded model has no
    regularization term at all until `attach` runs again, so call it before
    resuming fine-tuning. The plain-L2 term is Keras' own
    `keras.regularizers.L2`.

    **LoRA.** On a layer where Keras' `enable_lora(rank)` ran (`Dense`,
    `EinsumDense`, `Embedding`) the kernel is frozen at its pretrained value
    `w0` and the effective weight is `w0 + delta` with
    `delta = (lora_alpha / rank) * lora_a @ lora_b`. L2-SP's
    `||w - w0||^2` is then exactly `||delta||^2`, so `attach` pulls the
    merged delta toward zero (`alpha`, or `beta` outside the backbone): the
    term is set on `lora_b` and computed from both factors; `lora_a` gets
    no term of its own, and the frozen kernel none (it cannot move). This
    anchor is the frozen kernel, so re-anchoring (`anchor_callback`) does
    not move it. Keras saves a LoRA layer with the delta merged into the
    kernel (and the factors zeroed), so after a reload the anchor is the
    fine-tuned weight.

    `alpha` and `beta` may come from a Keras Tuner `hp`
    (`L2SP(alpha=hp.Float("alpha", 1e-5, 1e-1, sampling="log"))`) or be
    plain floats.

    Args:
        alpha: Strength toward the anchors, >= 0. Defaults to `0.01`.
        beta: Plain L2 strength for weights without an anchor, >= 0.
            Defaults to `0.0001`.

    Raises:
        ValueError: If `alpha` or `beta` is negative or not a number.

    Example:

    >>> backbone = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16)])
    >>> model = keras.Sequential([backbone, keras.layers.Dense(3)])
    >>> reg = L2SP(alpha=0.01, beta=0.001)
    >>> model = reg.attach(model, backbone=backbone)
    >>> [round(float(loss), 6) for loss in model.losses][:1]  # backbone: at anchor
    [0.0]
    >>> len(model.losses)  # backbone kernel (L2-SP) + head kernel (plain L2)
    2

    Reference:
        Li, Grandvalet and Davoine, "Explicit Inductive Bias for Transfer
        Learning with Convolutional Networks" (L2-SP), ICML 2018.
    """

    def __init__(self, alpha=0.01, beta=0.0001):
        self.alpha = check_number("alpha", alpha, low=0.0)
        self.beta = check_number("beta", beta, low=0.0)
        self._plain = keras.regularizers.L2(self.beta)
        self._anchors = {}
        self._lora = {}

    def __call__(self, x):
        lora = self._lora.get(id(x))
        if lora is not None and lora[0] is x:
            _, lora_a, scale, strength = lora
            delta = _lora_delta(lora_a, x, scale)
            return ops.cast(strength, delta.dtype) * ops.sum(ops.square(delta))
        entry = self._anchors.get(id(x))
        if entry is None or entry[0] is not x:
            return self._plain(x)
        return l2sp_penalty(x, entry[1], self.alpha)

    def anchor(self, variables):
        """Records the current values of `variables` as their reference `w0`.

        Calling it again re-records (assigns) the values of variables already
        anchored, so a traced training step keeps working.

        Args:
            variables: Iterable of Keras variables.
        """
        for variable in variables:
            entry = self._anchors.get(id(variable))
            if entry is not None and entry[0] is variable:
                entry[1].assign(variable)
                continue
            reference = keras.Variable(
                ops.convert_to_tensor(variable),
                trainable=False,
                dtype=variable.dtype,
                name=f"{variable.name}_l2sp_anchor",
            )
            self._anchors[id(variable)] = (variable, reference)

    def is_anchored(self, variable):
        """Whether `variable` is pulled toward an anchor (else plain L2).

        For a LoRA `lora_b` factor: whether its delta is pulled toward zero.
        """
        lora = self._lora.get(id(variable))
        if lora is not None and lora[0] is variable:
            return True
        entry = self._anchors.get(id(variable))
        return entry is not None and entry[0] is variable

    def attach(self, model, backbone=None, include_biases=False):
        """Sets this regularizer on the weights of `model` and anchors the backbone.

        Every trainable kernel of `model` (weights with two or more
        dimensions; biases too if `include_biases`) that has no regularizer
        yet gets this one. The weights of `backbone` (all of `model` if
        `None`) are anchored at their current values. If `model` was already
        fit or evaluated, its train and test functions are traced again so
        the next `fit` counts the new terms (no recompiling needed).

        Args:
            model: The fine-tuning model (built).
            backbone: Layer or model whose weights are the pretrained ones, or
                `None` for the whole `model`. Defaults to `None`.
            include_biases: Also regularize 1-D weights (biases, norm scales).
                Defaults to `False`.

        Returns:
            `model`, for chaining.

        Raises:
            ValueError: If `model` is not a built Keras layer or model (an
                unbuilt model has no weights to regularize or anchor), or
                `backbone` is not a built part of `model`.
        """
        _check_built("model", model)
        include_biases = check_bool("include_biases", include_biases)
        if backbone is not None:
            _check_built("backbone", backbone)
        source = model if backbone is None else backbone
        backbone_ids = {id(v) for v in source.weights}
        if backbone is not None and not backbone_ids & {id(v) for v in model.weights}:
            raise invalid(
                "backbone",
                backbone.name,
                f"a layer or model inside `model` ({model.name!r}) whose "
                "weights are the pretrained ones; it shares no weight with it",
            )
        known = (len(self._anchors), len(self._lora))
        newly_set = False
        # LoRA layers: the delta of the factors is the distance to `w0`.
        skip = set()
        for layer in model._flatten_layers(include_self=True, recursive=True):
            parts = _lora_parts(layer)
            if parts is None:
                continue
            base, lora_a, lora_b, scale = parts
            skip.update((id(base), id(lora_a), id(lora_b)))
            if lora_b.regularizer is None:
                lora_b.regularizer = self
                newly_set = True
            if lora_b.regularizer is self:
                strength = self.alpha if id(base) in backbone_ids else self.beta
                self._lora[id(lora_b)] = (lora_b, lora_a, scale, strength)
        selected = []
        for variable in model.weights:
            if id(variable) in skip:
                continue
            if not variable.trainable and id(variable) not in backbone_ids:
                continue
            if len(variable.shape) < 2 and not include_biases:
                continue
            if variable.regularizer is None:
                variable.regularizer = self
                newly_set = True
            if variable.regularizer is self and id(variable) in backbone_ids:
                selected.append(variable)
        self.anchor(selected)
        if newly_set or known != (len(self._anchors), len(self._lora)):
            _retrace(model)
        return model

    def anchor_callback(self, model=None, backbone=None, include_biases=False):
        """A callback that re-anchors the backbone at the start of every `fit`.

        Args:
            model: Model to attach to; the model being fit if `None`.
                Defaults to `None`.
            backbone: As in `attach`. Defaults to `None`.
            include_biases: As in `attach`. Defaults to `False`.

        Returns:
            A `keras.callbacks.Callback`.

        Raises:
            ValueError: If `model` or `backbone` is not a Keras layer or
                model (or `None`), or `include_biases` is not a bool.
        """
        check_layer("model", model, allow_none=True)
        check_layer("backbone", backbone, allow_none=True)
        include_biases = check_bool("include_biases", include_biases)
        return _L2SPAnchor(self, model, backbone, include_biases)

    def get_config(self):
        return {"alpha": self.alpha, "beta": self.beta}


def _retrace(model):
    """Has `model`'s already-traced train and test functions traced again.

    They hold the regularization losses of when they were traced, so a
    regularizer set after a `fit` or `evaluate` would not count otherwise.
    """
    for kind in ("train", "test"):
        if getattr(model, f"{kind}_function", None) is not None:
            getattr(model, f"make_{kind}_function")(force=True)


def _check_built(name, layer):
    check_layer(name, layer, built=True)
    if not layer.weights:
        raise invalid(name, layer.name, "a layer or model with weights to regularize")


class _L2SPAnchor(keras.callbacks.Callback):
    """Calls `L2SP.attach` in `on_train_begin` (the values at `fit` start)."""

    def __init__(self, regularizer, model, backbone, include_biases):
        super().__init__()
        self._regularizer = regularizer
        self._target = model
        self._backbone = backbone
        self._include_biases = include_biases

    def on_train_begin(self, logs=None):
        self._regularizer.attach(
            self._target if self._target is not None else self.model,
            backbone=self._backbone,
            include_biases=self._include_biases,
        )
