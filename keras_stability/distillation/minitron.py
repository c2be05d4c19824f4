"""`prune_and_distill`: NVIDIA's Minitron recipe in one call.

Shrink a trained transformer LM to a target size with
`keras_stability.pruning.shrink_transformer` (heads, FFN units, hidden
channels and blocks ranked by their activations on a calibration slice of
the training inputs), then recover its quality by distilling from the
unpruned model with the `Distiller` (logit-only KL, the paper's best
choice, with the hard-label term off by default).
"""

import keras
from keras import tree

from keras_stability._checks import check_positive_int
from keras_stability._checks import invalid
from keras_stability.distillation.distiller import Distiller
from keras_stability.distillation.distiller import _check_model
from keras_stability.distillation.distiller import _check_optimizer
from keras_stability.distillation.schedules import check_alpha
from keras_stability.distillation.schedules import check_temperature

__all__ = ["prune_and_distill"]


def _rows(x):
    leaves = tree.flatten(x)
    if not leaves or not all(hasattr(a, "shape") and len(a.shape) >= 1 for a in leaves):
        raise invalid(
            "x",
            type(x).__name__,
            "in-memory token ids (an array, or a dict of arrays such as keras-hub's "
            '`{"token_ids", "padding_mask"}`), samples first',
        )
    return leaves[0].shape[0]


def prune_and_distill(
    teacher,
    x,
    y=None,
    num_heads=None,
    intermediate_dim=None,
    hidden_dim=None,
    num_layers=None,
    calibration_samples=1024,
    block_importance="cosine",
    epochs=1,
    batch_size=32,
    optimizer="adam",
    alpha=0.0,
    temperature=1.0,
    sample_weight=None,
    **fit_kwargs,
):
    """Shrinks a trained transformer LM, then distills it from the original.

    Minitron's recipe: the first `calibration_samples` rows of `x` rank
    heads, FFN units, hidden channels and blocks by their activations
    (`shrink_transformer`); the pruned model is then trained as the student
    of the unpruned `teacher` on `x` with the `Distiller`: by default on the
    KL divergence between their next-token distributions alone
    (`alpha=0`, `temperature=1`), which the paper found better than adding
    the hard-label loss. `teacher` is left unchanged (its `trainable` flag
    too).

    Args:
        teacher: A trained model that `shrink_transformer` accepts: our char
            LM (`build_char_transformer`) or a keras-hub `CausalLM` such as
            `GPT2CausalLM` (with `preprocessor=None`).
        x: In-memory inputs, samples first: token ids `(batch, sequence)`,
            or a dict such as `{"token_ids", "padding_mask"}`.
        y: Next-token labels `(batch, sequence)`, or `None` to distill on the
            inputs alone (needed with `alpha > 0` or `block_importance="loss"`).
            Defaults to `None`.
        num_heads: Query heads to keep per block, or `None`. Defaults to `None`.
        intermediate_dim: FFN size to keep, or `None`. Defaults to `None`.
        hidden_dim: Hidden (residual stream) size to keep, or `None`.
            Defaults to `None`.
        num_layers: Blocks to keep, or `None`. Defaults to `None`.
        calibration_samples: Rows of `x` used to rank what to remove
            (Minitron uses 1024). Defaults to `1024`.
        block_importance: `"cosine"` or `"loss"` (see
            `shrink_transformer`). Defaults to `"cosine"`.
        epochs: Epochs of distillation. Defaults to `1`.
        batch_size: Batch size of distillation. Defaults to `32`.
        optimizer: Optimizer (instance or name) of the student. Defaults to
            `"adam"`.
        alpha: Weight of the hard-label loss, in `[0, 1]`; `0` is pure
            distillation. Defaults to `0.0`.
        temperature: Softmax temperature of the KL term. Defaults to `1.0`.
        sample_weight: Per-token weights `(batch, sequence)`, e.g. the
            padding mask, applied to both terms. Defaults to `None`.
        **fit_kwargs: Passed to `Distiller.fit` (`validation_data`,
            `callbacks`, `verbose`, `cache_teacher_outputs`, ...).

    Returns:
        `(student, history)`: the shrunk and distilled model (an ordinary
        Keras model of the teacher's kind, not compiled) and the `History`
        of the distillation.

    Raises:
        ValueError: On a bad argument: `teacher` not a built Keras model,
            sizes or a model kind that `shrink_transformer` rejects (its
            message names `model`), `alpha > 0` without `y`.

    Example:

    ```python
    student, history = prune_and_distill(
        teacher, x_train, num_heads=2, intermediate_dim=128, num_layers=2,
        epochs=2, validation_data=(x_val, y_val),
    )
    student.save("student.keras")
    ```

    Reference:
        Muralidharan et al., "Compact Language Models via Pruning and
        Knowledge Distillation" (Minitron), 2024, arXiv:2407.14679.
    """
    from keras_stability.pruning import shrink_transformer

    _check_model("teacher", teacher)
    n = _rows(x)
    calibration_samples = check_positive_int("calibration_samples", calibration_samples)
    epochs = check_positive_int("epochs", epochs)
    batch_size = check_positive_int("batch_size", batch_size)
    alpha = check_alpha(alpha)
    temperature = check_temperature(temperature)
    optimizer = _check_optimizer(optimizer)
    if alpha > 0 and y is None:
        raise invalid("alpha", alpha, "0 when no labels `y` are given")

    take = min(calibration_samples, n)
    calibration = tree.map_structure(lambda a: a[:take], x)
    if y is not None:
        calibration = (calibration, y[:take])
    student = shrink_transformer(
        teacher,
        num_heads=num_heads,
        intermediate_dim=intermediate_dim,
        hidden_dim=hidden_dim,
        num_layers=num_layers,
        data=calibration,
        block_importance=block_importance,
        batch_size=min(16, take),
    )

    trainable = teacher.trainable
    try:
        distiller = Distiller(student, teacher)
        distiller.compile(
            optimizer=optimizer,
            student_loss_fn=keras.losses.SparseCategoricalCrossentropy(
                from_logits=True
            ),
            alpha=alpha,
            temperature=temperature,
        )
        history = distiller.fit(
            x,
            y,
            batch_size=batch_size,
            epochs=epochs,
            sample_weight=sample_weight,
            **fit_kwargs,
        )
    finally:
        teacher.trainable = trainable
    return student, history
