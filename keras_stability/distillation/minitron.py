"""`prune_and_distill`: NVIDIA's Minitron recipe in one call.

Shrink a trained transformer LM to a target size with
`keras_stability.pruning.shrink_transformer` (heads, FFN units, hidden
channels and blocks ranked by their activations on a calibration slice of
the training inputs), then recover its quality by distilling from the
unpruned model with the `Distiller` (logit-only KL, the paper's best
choice, with the hard-label term off by default). The kept blocks can be
named (`keep_blocks`) or chosen by the paper's lightweight retraining: the
candidates with the lowest loss right after removal are each distilled
for a few steps and the one with the lowest validation loss goes on
(`block_candidates`, `search_steps`).
"""

import keras
import numpy as np
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


def _model_input_count(model):
    """How many inputs `model` takes as a list/tuple, 1 for a single tensor or
    a dict (keras-hub's `{"token_ids", "padding_mask"}`), `None` if unknown."""
    try:
        structure = model.input
    except (AttributeError, ValueError):
        try:
            structure = model.inputs  # a Sequential has `inputs` only
        except (AttributeError, ValueError):
            return None
        return 1 if len(structure) == 1 else len(structure)
    return len(structure) if isinstance(structure, (list, tuple)) else 1


def _check_x(x, teacher):
    """Refuses `(x, y)`/`(x, y, sample_weight)` packed into `x`, before any work.

    `shrink_transformer(data=...)` takes such a tuple, but `prune_and_distill`
    takes the labels and weights as arguments of their own.
    """
    if not isinstance(x, (tuple, list)) or len(x) not in (2, 3):
        return
    expected = _model_input_count(teacher)
    if expected is None or expected == len(x):
        return
    packed = "(x, y)" if len(x) == 2 else "(x, y, sample_weight)"
    raise ValueError(
        "Invalid value for argument `x`. Expected the inputs of "
        f"'{teacher.name}' alone (an array of token ids, or a dict such as "
        'keras-hub\'s `{"token_ids", "padding_mask"}`), samples first; pass the '
        "labels and weights separately: `prune_and_distill(teacher, x, y=y, "
        "sample_weight=sample_weight, ...)`. Received: x=a "
        f"{type(x).__name__} of {len(x)} elements (like {packed}), while "
        f"'{teacher.name}' takes "
        + ("a single input" if expected == 1 else f"{expected} inputs")
    )


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
    keep_blocks=None,
    block_candidates=None,
    search_steps=None,
    search_restart=False,
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
            or a dict such as `{"token_ids", "padding_mask"}`. The inputs
            alone: unlike `shrink_transformer`'s `data`, not an
            `(x, y, sample_weight)` tuple (pass `y=` and `sample_weight=`).
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
        keep_blocks: Indices of the blocks to keep, or `None` (see
            `shrink_transformer_plan`). Defaults to `None`.
        block_candidates: Choose the kept blocks by lightweight retraining
            (Minitron's architecture search), or `None` to rank them by
            `block_importance`. Every subset of `num_layers` blocks is
            built and its loss measured on the calibration rows right after
            removal; the `block_candidates` subsets with the lowest loss are
            each distilled for `search_steps` steps (the same batches for
            every candidate, drawn from the rows of `x` after the first
            `calibration_samples`, each candidate with a fresh copy of
            `optimizer`) and scored by the distillation loss (`alpha`,
            `temperature`) on the calibration rows, which the search does not
            train on. The lowest wins. Needs `y`, `num_layers` below the
            model's blocks, no `keep_blocks`, and rows of `x` beyond
            `calibration_samples`. Defaults to `None`.
        search_steps: Distillation steps of each candidate, with
            `block_candidates`. The search costs
            `block_candidates * search_steps` steps on top of the `epochs`
            of the final distillation. Defaults to `None`.
        search_restart: With `block_candidates`: if `False`, the winner
            keeps its `search_steps` of training and its optimizer (its
            learning-rate schedule goes on from step `search_steps`) and is
            distilled for `epochs` more; if `True`, it is rebuilt from the
            teacher and distilled for `epochs` with `optimizer`. Defaults to
            `False`.
        **fit_kwargs: Passed to `Distiller.fit` (`validation_data`,
            `callbacks`, `verbose`, `cache_teacher_outputs`, ...); the search
            gets `verbose` only.

    Returns:
        `(student, history)`: the shrunk and distilled model (an ordinary
        Keras model of the teacher's kind, not compiled) and the `History`
        of the (final) distillation. `history.shrink_plan` is the plan the
        student was cut by, as `shrink_transformer_plan` returns it (the kept
        blocks in `["blocks"]["keep"]`: the search's winner with
        `block_candidates`). With `block_candidates`,
        `history.block_search` is a dict: `"candidates"` (the kept block
        indices of each candidate, lowest calibration loss first),
        `"calibration_loss"` (each right after removal),
        `"validation_loss"` (each after `search_steps`) and `"keep"` (the
        winner's).

    Raises:
        ValueError: On a bad argument: `teacher` not a built Keras model,
            `x` an `(x, y)` or `(x, y, sample_weight)` tuple (for a model
            with a single input),
            sizes or a model kind that `shrink_transformer` rejects (its
            message names `model`), `alpha > 0` without `y`, `keep_blocks`
            not distinct indices of the teacher's blocks or not
            `num_layers` of them, `block_candidates` or `search_steps` not a
            positive integer or given without the other, or the search's
            needs above unmet.

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
    from keras_stability.pruning import transformer_shrink as shrink

    _check_model("teacher", teacher)
    _check_x(x, teacher)
    n = _rows(x)
    calibration_samples = check_positive_int("calibration_samples", calibration_samples)
    epochs = check_positive_int("epochs", epochs)
    batch_size = check_positive_int("batch_size", batch_size)
    alpha = check_alpha(alpha)
    temperature = check_temperature(temperature)
    optimizer = _check_optimizer(optimizer)
    if alpha > 0 and y is None:
        raise invalid("alpha", alpha, "0 when no labels `y` are given")
    requested = shrink._check_sizes(num_heads, intermediate_dim, hidden_dim, num_layers)
    keep_blocks, requested["num_layers"] = shrink._check_keep_blocks(
        keep_blocks, num_layers
    )
    block_candidates = check_positive_int(
        "block_candidates", block_candidates, allow_none=True
    )
    search_steps = check_positive_int("search_steps", search_steps, allow_none=True)
    if not isinstance(search_restart, bool):
        raise invalid("search_restart", search_restart, "True or False")
    if (block_candidates is None) != (search_steps is None):
        raise invalid(
            "search_steps" if block_candidates is None else "block_candidates",
            search_steps if block_candidates is None else block_candidates,
            "a positive integer given together with "
            + ("`block_candidates`" if block_candidates is None else "`search_steps`"),
        )

    take = min(calibration_samples, n)
    calibration = tree.map_structure(lambda a: a[:take], x)
    if y is not None:
        calibration = (calibration, y[:take])
    if block_candidates is not None:
        _check_search(block_candidates, keep_blocks, y, requested, take, n)
    analysis = shrink._Analysis(teacher, calibration, block_importance, min(16, take))
    keep_blocks = analysis.check_keep_blocks(keep_blocks)
    plan = analysis.plan(analysis.target_sizes(requested), keep_blocks)

    def distiller_for(student, opt):
        distiller = Distiller(student, teacher)
        distiller.compile(
            optimizer=opt,
            student_loss_fn=keras.losses.SparseCategoricalCrossentropy(
                from_logits=True
            ),
            alpha=alpha,
            temperature=temperature,
        )
        return distiller

    trainable = teacher.trainable
    try:
        search = None
        distiller = None
        if block_candidates is not None:
            if plan["sizes"]["num_layers"] >= len(plan["blocks"]["names"]):
                raise invalid(
                    "num_layers",
                    num_layers,
                    f"fewer blocks than the teacher's {len(plan['blocks']['names'])} "
                    "with `block_candidates`",
                )
            search, distiller = _search_blocks(
                analysis,
                plan,
                distiller_for,
                optimizer,
                x,
                y,
                sample_weight,
                take,
                block_candidates,
                search_steps,
                batch_size,
                fit_kwargs.get("verbose", "auto"),
            )
            keep = np.array(search["keep"])
            plan = dict(plan, blocks=dict(plan["blocks"], keep=keep))
        if distiller is None or search_restart:
            distiller = distiller_for(analysis.apply(plan), optimizer)
        history = distiller.fit(
            x,
            y,
            batch_size=batch_size,
            epochs=epochs,
            sample_weight=sample_weight,
            **fit_kwargs,
        )
        history.shrink_plan = plan
        if search is not None:
            history.block_search = search
    finally:
        teacher.trainable = trainable
    return distiller.student, history


def _check_search(block_candidates, keep_blocks, y, requested, take, n):
    """What the block search needs, checked before any model is built."""
    if keep_blocks is not None:
        raise invalid(
            "block_candidates",
            block_candidates,
            "`None` when `keep_blocks` names the blocks",
        )
    if y is None:
        raise invalid(
            "block_candidates",
            block_candidates,
            "`None` when no labels `y` are given (the candidates are ranked by loss)",
        )
    if requested["num_layers"] is None:
        raise invalid(
            "block_candidates",
            block_candidates,
            "`None` when `num_layers` is not given (there are no blocks to choose)",
        )
    if take >= n:
        raise invalid(
            "block_candidates",
            block_candidates,
            f"`None` when `x` has no rows after the {take} calibration rows "
            "(the search trains on those and validates on the calibration rows)",
        )


def _search_blocks(
    analysis,
    plan,
    distiller_for,
    optimizer,
    x,
    y,
    sample_weight,
    take,
    block_candidates,
    search_steps,
    batch_size,
    verbose,
):
    """Minitron's lightweight retraining: the candidate with the lowest
    validation loss after `search_steps`, and its distiller."""
    ranked = analysis.block_subsets_by_loss(plan)[:block_candidates]
    n = _rows(x)
    rest = n - take
    need = search_steps * batch_size
    order = (
        np.concatenate([np.random.permutation(rest) for _ in range(-(-need // rest))])[
            :need
        ]
        + take
    )

    def rows(a, idx):
        return None if a is None else tree.map_structure(lambda v: v[idx], a)

    train = [rows(a, order) for a in (x, y, sample_weight)]
    val = [rows(a, np.arange(take)) for a in (x, y, sample_weight)]
    best = None
    losses = []
    for keep, _ in ranked:
        candidate = dict(plan, blocks=dict(plan["blocks"], keep=keep))
        opt = optimizer.__class__.from_config(optimizer.get_config())
        distiller = distiller_for(analysis.apply(candidate), opt)
        distiller.fit(
            train[0],
            train[1],
            sample_weight=train[2],
            batch_size=batch_size,
            epochs=1,
            shuffle=False,
            verbose=verbose,
        )
        loss = distiller.evaluate(
            val[0],
            val[1],
            sample_weight=val[2],
            batch_size=batch_size,
            verbose=0,
            return_dict=True,
        )["loss"]
        losses.append(float(loss))
        if best is None or loss < best[0]:
            best = (loss, keep, distiller)
    search = {
        "candidates": [[int(i) for i in keep] for keep, _ in ranked],
        "calibration_loss": [float(loss) for _, loss in ranked],
        "validation_loss": losses,
        "keep": [int(i) for i in best[1]],
    }
    return search, best[2]
