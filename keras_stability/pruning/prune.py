"""`prune_low_magnitude`: magnitude pruning for Keras 3 models and layers."""

import functools
import re
import warnings

import keras
import numpy as np

from keras_stability import _keras_internals
from keras_stability._checks import check_int
from keras_stability._checks import check_layer
from keras_stability.pruning import masks as masks_lib
from keras_stability.pruning.pruner import MaskConstraint
from keras_stability.pruning.pruner import Pruner
from keras_stability.pruning.pruner import check_pruning_arguments
from keras_stability.pruning.pruner import find_pruner
from keras_stability.pruning.pruner import reset_train_function

__all__ = ["prunable_weights", "prune_low_magnitude"]

# The weights TF-MOT prunes (its `prune_registry`), by Keras 3 class.
PRUNABLE = (
    (keras.layers.Dense, ("kernel",)),
    (keras.layers.EinsumDense, ("kernel",)),
    (keras.layers.Embedding, ("embeddings",)),
    (keras.layers.SeparableConv1D, ("pointwise_kernel",)),
    (keras.layers.SeparableConv2D, ("pointwise_kernel",)),
    (keras.layers.DepthwiseConv1D, ("kernel",)),
    (keras.layers.DepthwiseConv2D, ("kernel",)),
    (keras.layers.Conv1D, ("kernel",)),
    (keras.layers.Conv2D, ("kernel",)),
    (keras.layers.Conv3D, ("kernel",)),
    (keras.layers.Conv1DTranspose, ("kernel",)),
    (keras.layers.Conv2DTranspose, ("kernel",)),
    (keras.layers.Conv3DTranspose, ("kernel",)),
    (keras.layers.SimpleRNNCell, ("kernel", "recurrent_kernel")),
    (keras.layers.GRUCell, ("kernel", "recurrent_kernel")),
    (keras.layers.LSTMCell, ("kernel", "recurrent_kernel")),
)


def check_filters(filters):
    """Checks `filters` (see `prune_low_magnitude`); returns it normalised.

    Returns:
        `None`, a tuple of compiled patterns, or the callable.

    Raises:
        ValueError: Naming `filters`, for another type, an empty list or a
            pattern that is not a valid regular expression.
    """
    if filters is None or callable(filters):
        return filters
    patterns = (filters,) if isinstance(filters, str) else filters
    if (
        not isinstance(patterns, (list, tuple))
        or not patterns
        or not all(isinstance(p, str) for p in patterns)
    ):
        raise ValueError(
            "Invalid value for argument `filters`. Expected None, a regex string, "
            "a non-empty list of regex strings or a callable `layer -> bool`. "
            f"Received: filters={filters!r}"
        )
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise ValueError(
                "Invalid value for argument `filters`. Expected valid regular "
                f"expressions. Received: filters={filters!r} ({pattern!r}: {error})"
            ) from None
    return tuple(compiled)


def _selected(filters, layer, variable):
    if filters is None:
        return True
    if callable(filters):
        return bool(filters(layer))
    return any(pattern.search(variable.path) for pattern in filters)


def prunable_weights(to_prune, filters=None):
    """The weights `prune_low_magnitude` would prune, in trainable-variable order.

    Args:
        to_prune: A built Keras layer or model.
        filters: `None` (every prunable weight), or which of them to keep,
            as in `prune_low_magnitude`. Defaults to `None`.

    Returns:
        List of variables: kernels of Dense, EinsumDense (and so the
        projections of MultiHeadAttention), Conv*, Embedding and recurrent
        cells; other weights (biases, normalisation) are left alone.

    Raises:
        ValueError: If `to_prune` is not a built Keras layer or model, or
            `filters` is not valid.
    """
    check_layer("to_prune", to_prune, built=True)
    return _prunable(to_prune, check_filters(filters))


def _prunable(to_prune, filters, among=None):
    """`prunable_weights` with `filters` already checked; `among`: the
    variables they are taken from, in their order (the trainable ones by
    default; `sparsity_report` counts frozen and quantized kernels too)."""
    found = []
    seen = set()
    for layer in _keras_internals.flatten_layers(to_prune):
        for cls, names in PRUNABLE:
            if isinstance(layer, cls):
                for name in names:
                    variable = getattr(layer, name, None)
                    if (
                        variable is not None
                        and id(variable) not in seen
                        and _selected(filters, layer, variable)
                    ):
                        seen.add(id(variable))
                        found.append(variable)
                break
    among = to_prune.trainable_variables if among is None else among
    order = {id(v): i for i, v in enumerate(among)}
    found = [v for v in found if id(v) in order]
    return sorted(found, key=lambda v: order[id(v)])


def prune_low_magnitude(
    to_prune,
    pruning_schedule=None,
    sparsity_m_by_n=None,
    block_size=(1, 1),
    block_pooling_type="AVG",
    global_ranking=False,
    filters=None,
    initial_step=0,
    pruning_policy=None,
):
    """Prunes a Keras 3 model or layer by weight magnitude during training.

    The Keras 3 counterpart of `tfmot.sparsity.keras.prune_low_magnitude`,
    with the same mask rule (keep the `round(size * (1 - sparsity))` largest
    magnitudes), schedules and N:M option. It works on Sequential, functional
    and subclassed models and on single layers, and needs no callback and no
    wrapper layers: the model is pruned **in place** (and returned). Masks and
    the pruning step are variables; they are updated inside the compiled
    train step, right after each optimizer update, where every pruned weight
    is multiplied by its mask (see `keras_stability.pruning.pruner`).

    Call it after the model is built and before `fit` (inside the
    `strategy.scope()` if the model was made in one). Compile as usual; a
    model that has trained already has its train step traced again at the
    next `fit` (a model that trains it from outside, e.g. a Distiller whose
    student it is, must be compiled again). No callback is needed:
    `UpdatePruningStep` is accepted for code ported from TF-MOT, and
    training is the same without it. With it or `PruningSummaries` in
    `fit`, a warning says when the `fit` is too short for the schedule to
    reach its target sparsity (e.g. `end_step=1000` in a 50-step `fit`);
    `strip_pruning` warns likewise if the target was not reached.

    The step and masks are not saved with the weights, the optimizer's
    `iterations` is: a run restored with its optimizer
    (`keras.callbacks.BackupAndRestore`, or `load_weights` into the
    compiled model once its optimizer is built) continues its pruning step
    from there and its masks from the restored zeros, when the train step
    is first traced. Weights loaded without the optimizer's count get a
    warning that the schedule starts over.

    Args:
        to_prune: A built Keras model, or a Keras layer. A layer that is
            not built yet is pruned when it is built, as in TF-MOT's
            `Sequential([prune_low_magnitude(Dense(20), ...), ...])`; that
            must be before training (give the model an input shape).
        pruning_schedule: A TF-MOT schedule (`PolynomialDecay`,
            `ConstantSparsity`) or any callable `step -> (should_prune,
            sparsity)`. The step counts optimizer updates, from 1. `None`
            for TF-MOT's default, `ConstantSparsity(0.5, begin_step=0)`
            (50% every 100 steps, the first at step 100), or with
            `sparsity_m_by_n` for N:M masks computed once at step 1, as
            TF-MOT computes them. Defaults to `None`.
        sparsity_m_by_n: `None`, or `(m, n)` to zero the `m` smallest of every
            `n` consecutive weights along the input axis (2:4 for sparse
            tensor cores), on the schedule's pruning steps. The schedule's
            sparsity is then ignored. Defaults to `None`.
        block_size: `(height, width)` blocks pruned together, for 2-D weights.
            Defaults to `(1, 1)`.
        block_pooling_type: `"AVG"` or `"MAX"` pooling of a block's
            magnitudes. Defaults to `"AVG"`.
        global_ranking: If `True`, rank all pruned weights of the model
            together (one threshold) instead of layer by layer. Defaults to
            `False`.
        filters: Which of the prunable weights to prune: `None` for all of
            them; a regex string or a list of them, searched (`re.search`)
            in each weight's `path` (e.g. `"block_0/attention/query/kernel"`,
            which holds the names of every enclosing layer, so `"^block_"`
            selects all the sublayers of the blocks, and `"(query|key)"`
            every Q and K projection); or a callable `layer -> bool` given
            the layer that owns the weight (as `Model.quantize(filters=...)`
            is, which matches layer names only). The other weights stay
            dense and are not ranked with the pruned ones. LLM pruning
            (SparseGPT, Wanda) prunes the linears of the transformer blocks
            and keeps the embeddings and the output layer dense. Defaults to
            `None`.
        initial_step: The pruning step to start from: `0` for a new
            pruning run; to continue one from a saved model (TF-MOT's
            "checkpoint and deserialize"), the step it had reached, which is
            the reloaded optimizer's `iterations` when pruning started with
            a fresh optimizer: `prune_low_magnitude(loaded, schedule,
            initial_step=loaded.optimizer.iterations)`. A `.keras` file holds
            the masked weights (their zeros become the masks again) but not
            the step; from `0` the schedule would start over, back at its
            initial sparsity. A non-negative integer or an integer scalar
            variable. Defaults to `0`.
        pruning_policy: Only `None`: TF-MOT's argument (e.g.
            `PruneForLatencyOnXNNPack()`, for TFLite's XNNPACK sparse
            kernels) is accepted so that ported code fails with a clear
            error; choose the pruned weights with `filters` instead.
            Defaults to `None`.

    Returns:
        `to_prune`, now pruned.

    Raises:
        ValueError: For an invalid argument, an unbuilt or already pruned
            model, or a model with nothing to prune (for a layer not built
            yet, those checks run when it is built).

    Example:

    ```python
    schedule = keras_stability.pruning.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=0.8, begin_step=0, end_step=1000)
    model = prune_low_magnitude(model, schedule)
    # or only the linears of the transformer blocks, ranked together:
    # prune_low_magnitude(model, schedule, filters="^block_", global_ranking=True)
    model.compile(...)
    model.fit(...)
    model = strip_pruning(model)
    ```
    """
    check_layer("to_prune", to_prune)
    if pruning_policy is not None:
        raise ValueError(
            "Invalid value for argument `pruning_policy`. Expected None: there "
            "are no pruning policies here (TF-MOT's `PruneForLatencyOnXNNPack` "
            "targets TFLite's XNNPACK sparse inference); choose the weights to "
            "prune with `filters=` (a regex on weight paths or a callable "
            "`layer -> bool`). Received: "
            f"pruning_policy={pruning_policy!r}"
        )
    if pruning_schedule is None:
        # TF-MOT's default (its guide prunes with `prune_low_magnitude(model)`).
        # TF-MOT computes N:M masks once, at step 1, whatever the schedule;
        # its 2:4 guide passes no schedule: prune at step 1 only, as it does.
        from keras_stability.pruning._tfmot import tfmot_schedule_class

        constant = tfmot_schedule_class("ConstantSparsity")
        if sparsity_m_by_n is None:
            pruning_schedule = constant(0.5, begin_step=0)
        else:
            pruning_schedule = constant(0.5, begin_step=1, end_step=1)
    (
        sparsity_m_by_n,
        block_size,
        block_pooling_type,
        global_ranking,
    ) = check_pruning_arguments(
        pruning_schedule,
        sparsity_m_by_n,
        block_size,
        block_pooling_type,
        global_ranking,
    )
    filters = check_filters(filters)
    initial_step = _check_initial_step(initial_step)
    options = dict(
        pruning_schedule=pruning_schedule,
        sparsity_m_by_n=sparsity_m_by_n,
        block_size=block_size,
        block_pooling_type=block_pooling_type,
        global_ranking=global_ranking,
        filters=filters,
        initial_step=initial_step,
    )
    if not to_prune.built and not isinstance(to_prune, keras.Model):
        # TF-MOT's `Sequential([prune_low_magnitude(Dense(...)), ...])`: a
        # layer without weights yet is pruned as soon as it is built.
        _prune_when_built(to_prune, options)
        return to_prune
    check_layer("to_prune", to_prune, built=True)
    _prune_built(to_prune, **options)
    return to_prune


def _prune_when_built(layer, options):
    build = layer.build  # Keras' build wrapper (it sets `built`)

    # `wraps`: Keras reads the signature of `build` to pass the shapes.
    @functools.wraps(build)
    def build_then_prune(*args, **kwargs):
        build(*args, **kwargs)
        layer.build = build
        import tensorflow as tf

        if tf.inside_function():
            # Built in the first traced train step (a model without an
            # input shape): variables made here would not be the model's.
            raise ValueError(
                "Invalid value for argument `to_prune`. Expected a layer built "
                "before training (in a model with a `keras.Input` or an "
                "`input_shape`), or a built model. Received: "
                f"to_prune={layer.name!r}, first built inside a traced train "
                "step. Give the model an input shape, or build it and prune "
                "it with `prune_low_magnitude(model, filters=...)`."
            )
        _prune_built(layer, **options)

    layer.build = build_then_prune


def _prune_built(
    to_prune,
    pruning_schedule,
    sparsity_m_by_n,
    block_size,
    block_pooling_type,
    global_ranking,
    filters,
    initial_step,
):
    """`prune_low_magnitude` of a built layer or model, arguments checked."""
    if find_pruner(to_prune) is not None:
        raise ValueError(
            "Invalid value for argument `to_prune`. Expected a model that is not "
            f"pruned yet. Received: to_prune={to_prune.name!r}, already pruned "
            "(call `strip_pruning` first)"
        )
    variables = _prunable(to_prune, filters)
    _warn_lora_layers(to_prune)
    available = _prunable(to_prune, None) if not variables else variables
    if not variables and available:
        raise ValueError(
            "Invalid value for argument `filters`. Expected filters that select "
            "at least one prunable weight. Received: filters="
            f"{_shown(filters)} on {to_prune.name!r}, whose prunable weights are "
            + ", ".join(repr(v.path) for v in available[:5])
            + (f" and {len(available) - 5} more" if len(available) > 5 else "")
        )
    if not variables:
        raise ValueError(
            "Invalid value for argument `to_prune`. Expected a model or layer with "
            "prunable weights (Dense, EinsumDense, Conv, Embedding or recurrent "
            f"kernels). Received: to_prune={to_prune.name!r} with none"
        )
    input_axes = _input_axes(to_prune, variables)
    for variable, axis in zip(variables, input_axes, strict=True):
        shape = tuple(variable.shape)
        if block_size != (1, 1) and len(shape) != 2:
            raise ValueError(
                "Invalid value for argument `block_size`. Expected (1, 1) for a "
                f"model with weights that are not 2-D. Received: block_size={block_size} "
                f"with weight {variable.path!r} of shape={shape}"
            )
        if sparsity_m_by_n is not None and (
            len(shape) < 2 or shape[axis] % sparsity_m_by_n[1]
        ):
            raise ValueError(
                "Invalid value for argument `sparsity_m_by_n`. Expected `n` to "
                f"divide the input axis ({axis}) of every pruned weight. Received: "
                f"sparsity_m_by_n={sparsity_m_by_n} with weight {variable.path!r} "
                f"of shape={shape}"
            )
        if isinstance(variable.constraint, MaskConstraint):
            raise ValueError(
                "Invalid value for argument `to_prune`. Expected weights not "
                f"pruned by another model. Received: weight {variable.path!r}"
            )
    pruner = Pruner(
        variables,
        pruning_schedule,
        sparsity_m_by_n=sparsity_m_by_n,
        block_size=block_size,
        block_pooling_type=block_pooling_type,
        global_ranking=global_ranking,
        input_axes=input_axes,
        initial_step=initial_step,
    )
    optimizer = getattr(to_prune, "optimizer", None)
    if optimizer is not None and getattr(optimizer, "built", False):
        pruner.start_iterations = int(_keras_internals.to_numpy(optimizer.iterations))
    if not initial_step:
        _warn_if_resuming(to_prune, variables)
    # A train step traced before has no mask constraints: trace it again.
    reset_train_function(to_prune)


def _check_initial_step(value):
    if isinstance(value, keras.Variable) or keras.ops.is_tensor(value):
        if tuple(value.shape) == () and "int" in str(value.dtype):
            value = int(_keras_internals.to_numpy(value))
    return check_int(
        "initial_step",
        value,
        low=0,
        what="a non-negative integer or an integer scalar variable such as "
        "`model.optimizer.iterations`",
    )


def _warn_if_resuming(to_prune, variables):
    # A reloaded pruned model (TF-MOT's checkpoint-and-reload) comes back
    # compiled, with its optimizer's step count and zeros in its kernels.
    optimizer = getattr(to_prune, "optimizer", None)
    if optimizer is None or not getattr(optimizer, "built", False):
        return
    iterations = int(_keras_internals.to_numpy(optimizer.iterations))
    size = sum(int(np.prod(v.shape)) for v in variables)
    zeros = sum(int(np.sum(_keras_internals.to_numpy(v) == 0)) for v in variables)
    if iterations and zeros / max(size, 1) >= 0.01:
        warnings.warn(
            f"`prune_low_magnitude`: {to_prune.name!r} has an optimizer that "
            f"has taken {iterations} steps and its prunable weights are "
            f"{zeros / size:.0%} zeros, as a pruned model reloaded to continue "
            "pruning has. The pruning step starts at 0, so the schedule starts "
            "over (at its initial sparsity, which can bring pruned weights "
            "back). To continue the run, pass "
            "`initial_step=model.optimizer.iterations`.",
            stacklevel=4,  # the caller of `prune_low_magnitude`
        )


def _input_axes(to_prune, variables):
    """The input axis of each weight (N:M groups): -2, or an `EinsumDense`'s own."""
    axes = {}
    for layer in _keras_internals.flatten_layers(to_prune):
        kernel = getattr(layer, "kernel", None)
        if isinstance(layer, keras.layers.EinsumDense) and kernel is not None:
            axes[id(kernel)] = masks_lib.einsum_input_axis(layer.equation)
    return [axes.get(id(v), -2) for v in variables]


def _shown(filters):
    if callable(filters):
        return repr(filters)
    patterns = [p.pattern for p in filters]
    return repr(patterns[0] if len(patterns) == 1 else patterns)


def _warn_lora_layers(to_prune):
    # With Keras' `enable_lora` the layer's `kernel` is a computed tensor
    # (frozen weight + low-rank delta), not a variable, so `prunable_weights`
    # finds nothing to mask there; say so instead of pruning silently less.
    lora = [
        layer.path
        for layer in _keras_internals.flatten_layers(to_prune)
        if getattr(layer, "lora_enabled", False)
    ]
    if lora:
        shown = ", ".join(lora[:3]) + (
            f" and {len(lora) - 3} more" if len(lora) > 3 else ""
        )
        warnings.warn(
            f"`prune_low_magnitude` does not prune the {len(lora)} LoRA layers "
            f"({shown}): their kernel is the frozen pretrained weight plus a "
            "dense low-rank delta (`enable_lora`), which masking the frozen "
            "weight would not make sparse. Prune before `enable_lora`.",
            stacklevel=3,
        )
