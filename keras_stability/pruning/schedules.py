"""Pruning schedules: when to prune and to what sparsity.

A schedule is any callable `step -> (should_prune, sparsity)`, the protocol of
TF-MOT's `PruningSchedule`. TF-MOT's `PolynomialDecay` and `ConstantSparsity`
are plain TensorFlow and are accepted as they are (they are re-exported by
`keras_stability.pruning`, imported lazily). Nothing here imports TF-MOT: a
schedule is recognised by what it returns, not by its class.
"""

from keras import ops

__all__ = ["call_schedule", "validate_schedule"]


def _structure_error(schedule, result):
    return ValueError(
        "Invalid value for argument `pruning_schedule`. Expected a callable "
        "`step -> (should_prune, sparsity)` returning a boolean scalar and a "
        f"float scalar. Received: pruning_schedule={schedule!r} returning {result!r}"
    )


def call_schedule(schedule, step):
    """Calls `schedule(step)` and checks the structure of what it returns.

    Runs in graph mode too (inside the compiled train step); the checks are on
    the Python structure and static shapes only.

    Args:
        schedule: Callable `step -> (should_prune, sparsity)`.
        step: Integer scalar tensor, the pruning step.

    Returns:
        Tuple `(should_prune, sparsity)`: a boolean scalar tensor and a float32
        scalar tensor.

    Raises:
        ValueError: If the schedule does not return a pair of scalars.
    """
    result = schedule(step)
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise _structure_error(schedule, result)
    should_prune, sparsity = result
    try:
        should_prune = ops.cast(should_prune, "bool")
        sparsity = ops.cast(sparsity, "float32")
    except (TypeError, ValueError) as e:
        raise _structure_error(schedule, result) from e
    if tuple(should_prune.shape) != () or tuple(sparsity.shape) != ():
        raise _structure_error(schedule, result)
    return should_prune, sparsity


def _probe_steps(schedule):
    steps = {0, 1}
    for name in ("begin_step", "end_step"):
        value = getattr(schedule, name, None)
        if isinstance(value, int) and value >= 0:
            steps.add(value)
    return sorted(steps)


def validate_schedule(schedule):
    """Checks a schedule eagerly, at construction time.

    Calls it at a few steps (0, 1 and, if it has them, `begin_step` and
    `end_step`) and checks the structure and that the sparsity is in [0, 1).

    Args:
        schedule: Callable `step -> (should_prune, sparsity)`.

    Returns:
        The schedule, unchanged.

    Raises:
        ValueError: If `schedule` is not callable, returns the wrong structure
            or a sparsity outside [0, 1).
    """
    if not callable(schedule):
        raise ValueError(
            "Invalid value for argument `pruning_schedule`. Expected a callable "
            "`step -> (should_prune, sparsity)` such as "
            "`keras_stability.pruning.PolynomialDecay(...)`. "
            f"Received: pruning_schedule={schedule!r}"
        )
    for step in _probe_steps(schedule):
        _, sparsity = call_schedule(
            schedule, ops.convert_to_tensor(step, dtype="int64")
        )
        value = float(ops.convert_to_numpy(sparsity))
        if not 0.0 <= value < 1.0:
            raise ValueError(
                "Invalid value for argument `pruning_schedule`. Expected a "
                "sparsity in [0, 1) at every step. Received: "
                f"pruning_schedule={schedule!r} giving sparsity={value} at step={step}"
            )
    return schedule
