"""Pruning schedules: when to prune and to what sparsity.

A schedule is any callable `step -> (should_prune, sparsity)`, the protocol of
TF-MOT's `PruningSchedule`. TF-MOT's `PolynomialDecay` and `ConstantSparsity`
are plain TensorFlow and are accepted as they are (`keras_stability.pruning`
re-exports them, with Keras-style argument checks, imported lazily). Nothing
here imports TF-MOT: a schedule is recognised by what it returns, not by its
class.

What a schedule returns is checked twice: eagerly when the model is pruned
(`validate_schedule`, at a spread of steps), and in the train step, where a
sparsity outside [0, 1) is refused (the masks stay as they are) and recorded
for the host to report (`Pruner.check_schedule_output`).
"""

from keras import ops

from keras_stability import _keras_internals
from keras_stability._checks import is_integer

__all__ = [
    "call_schedule",
    "last_pruning_step",
    "next_pruning_step",
    "previous_pruning_step",
    "probe_steps",
    "steps_to_target",
    "valid_sparsity",
    "validate_schedule",
]


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


def valid_sparsity(sparsity):
    """In-graph: whether `sparsity` is in [0, 1) (NaN is not)."""
    return ops.logical_and(ops.greater_equal(sparsity, 0.0), ops.less(sparsity, 1.0))


def _int_attribute(schedule, name):
    value = getattr(schedule, name, None)
    return int(value) if is_integer(value) else None


def _pruning_steps(schedule):
    """`(begin_step, end_step, frequency)` of a TF-MOT-style schedule with an
    `end_step`, or `None` when it has no such integers (`end_step` >= 0,
    `frequency` >= 1)."""
    begin = _int_attribute(schedule, "begin_step")
    end = _int_attribute(schedule, "end_step")
    frequency = _int_attribute(schedule, "frequency")
    if begin is None or end is None or frequency is None or end < 0 or frequency < 1:
        return None
    return begin, end, frequency


def last_pruning_step(schedule):
    """The last pruning step of a TF-MOT-style schedule with an `end_step`.

    Pruning steps are `begin_step + k * frequency` (from 1); the last one
    is `end_step` only when `end_step - begin_step` is a multiple of
    `frequency`.

    Returns:
        The step, or `None` for a schedule without `begin_step`, `end_step`
        >= 0 and `frequency`, or without any pruning step.
    """
    steps = _pruning_steps(schedule)
    if steps is None:
        return None
    begin, end, frequency = steps
    last = begin + (end - begin) // frequency * frequency
    return last if last >= 1 else None


def _pruning_turns(schedule):
    """`(begin_step, end_step or None, frequency)` of a TF-MOT-style schedule.

    As `_pruning_steps`, but also for `end_step == -1` (pruning forever,
    `None` here); `None` without such integers.
    """
    begin = _int_attribute(schedule, "begin_step")
    end = _int_attribute(schedule, "end_step")
    frequency = _int_attribute(schedule, "frequency")
    if begin is None or end is None or frequency is None or frequency < 1:
        return None
    return begin, (end if end >= 0 else None), frequency


def next_pruning_step(schedule, step):
    """The first pruning step after `step` of a TF-MOT-style schedule.

    Pruning steps are `begin_step + k * frequency`, from 1 (they count
    optimizer updates), up to `end_step` unless it is -1.

    Returns:
        The step, or `None` if there is none after `step` or the schedule
        has no `begin_step`, `end_step` and `frequency`.
    """
    turns = _pruning_turns(schedule)
    if turns is None:
        return None
    begin, end, frequency = turns
    low = max(step + 1, begin, 1)
    found = begin + -(-(low - begin) // frequency) * frequency
    return None if end is not None and found > end else found


def previous_pruning_step(schedule, step):
    """The last pruning step at or before `step` (see `next_pruning_step`).

    Returns:
        The step, or `None` if there is none up to `step` or the schedule
        has no `begin_step`, `end_step` and `frequency`.
    """
    turns = _pruning_turns(schedule)
    if turns is None:
        return None
    begin, end, frequency = turns
    high = step if end is None else min(step, end)
    if high < max(begin, 1):
        return None
    found = begin + (high - begin) // frequency * frequency
    return found if found >= 1 else None


def probe_steps(schedule):
    """The steps at which `validate_schedule` calls a schedule.

    Every step from 0 to 16, powers of two and of ten up to 10**7, and
    around `begin_step` and `end_step` when the schedule has them (TF-MOT's
    schedules do).
    """
    steps = set(range(17))
    steps |= {2**k for k in range(5, 24)} | {10**k for k in range(2, 8)}
    for name in ("begin_step", "end_step"):
        value = _int_attribute(schedule, name)
        if value is not None and value >= 0:
            steps |= {max(value - 1, 0), value, value + 1}
    return sorted(steps)


def validate_schedule(schedule):
    """Checks a schedule eagerly, at construction time.

    Calls it at the steps of `probe_steps` (about 50 eager calls) and checks
    the structure and that the sparsity is in [0, 1) at each. A schedule
    that leaves the range at a step not probed is still caught in the train
    step, where its value is refused (see the module doc).

    Args:
        schedule: Callable `step -> (should_prune, sparsity)`.

    Returns:
        The schedule, unchanged.

    Raises:
        ValueError: If `schedule` is not callable, fails, returns the wrong
            structure or a sparsity outside [0, 1).
    """
    if not callable(schedule):
        raise ValueError(
            "Invalid value for argument `pruning_schedule`. Expected a callable "
            "`step -> (should_prune, sparsity)` such as "
            "`keras_stability.pruning.PolynomialDecay(...)`. "
            f"Received: pruning_schedule={schedule!r}"
        )
    for step in probe_steps(schedule):
        try:
            _, sparsity = call_schedule(
                schedule, ops.convert_to_tensor(step, dtype="int64")
            )
        except ValueError:
            raise
        except Exception as e:  # the user's callable failed: say where
            raise ValueError(
                "Invalid value for argument `pruning_schedule`. Expected a "
                "callable that works at every step. Received: "
                f"pruning_schedule={schedule!r} raising {type(e).__name__}: {e} "
                f"at step={step}"
            ) from e
        value = float(_keras_internals.to_numpy(sparsity))
        if not 0.0 <= value < 1.0:
            raise ValueError(
                "Invalid value for argument `pruning_schedule`. Expected a "
                "sparsity in [0, 1) at every step. Received: "
                f"pruning_schedule={schedule!r} giving sparsity={value} at step={step}"
            )
    _check_prunes_at_all(schedule)
    return schedule


def _check_prunes_at_all(schedule):
    """Raises for a TF-MOT-style schedule with no pruning step at all.

    Pruning steps count optimizer updates from 1 (as TF-MOT's do), so with
    `begin_step=0` the first one is `frequency`; TF-MOT's default
    `frequency=100` with `end_step=20` never prunes, silently in TF-MOT.
    """
    steps = _pruning_steps(schedule)
    if steps is None:
        return
    begin, end, frequency = steps
    first = begin if begin >= 1 else frequency
    if first > end:
        raise ValueError(
            "Invalid value for argument `pruning_schedule`. Expected a schedule "
            "with a pruning step between `begin_step` and `end_step`: pruning "
            f"steps count optimizer updates from 1, so with begin_step={begin}, "
            f"end_step={end} and frequency={frequency} the first would be step "
            f"{first}, after end_step, and the model would never be pruned. "
            "Use a smaller `frequency` (at most `end_step`) or a larger "
            f"`end_step`. Received: pruning_schedule={schedule!r}"
        )


def sparsity_at(schedule, step):
    """The schedule's sparsity at `step`, as a Python float (host)."""
    _, sparsity = call_schedule(schedule, ops.convert_to_tensor(step, dtype="int64"))
    return float(_keras_internals.to_numpy(sparsity))


def steps_to_target(schedule):
    """Where a TF-MOT-style schedule reaches its target sparsity.

    For a schedule with `end_step >= 0` (`PolynomialDecay`, a bounded
    `ConstantSparsity`) that is `end_step`; for `end_step == -1`
    (`ConstantSparsity` forever) the first pruning step, `begin_step`, or
    `frequency` when `begin_step` is 0 (pruning steps count from 1).

    Args:
        schedule: A pruning schedule.

    Returns:
        `(step, target_sparsity, what)` with `what` naming the step and the
        arguments that set it (for messages), or `None` for a schedule
        without `begin_step` / `end_step` attributes (a plain callable).
    """
    begin = _int_attribute(schedule, "begin_step")
    end = _int_attribute(schedule, "end_step")
    if begin is None or end is None:
        return None
    if end >= 0:
        step, what = end, "its `end_step`"
    else:
        frequency = _int_attribute(schedule, "frequency") or 1
        step = begin if begin >= 1 else frequency
        what = "its first pruning step, from `begin_step` and `frequency`"
    return step, sparsity_at(schedule, step), what
