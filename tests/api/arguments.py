"""The API-wide argument harness: one `Case` per public callable.

A `Case` names a public callable, how to call it with valid arguments, and the
bad values each argument must reject. Bad values come from two places:

- derived from the argument's default (`derived_bad_values`): a bool default
  must reject `"False"`, `0`, `1` and `None`; a number default must reject a
  string, `True`, NaN and infinity; an integer default must also reject `2.5`;
  a string default must reject `123`;
- listed in the case (`bad`), for ranges and for arguments without a default.

`test_arguments.py` calls every public callable with every bad value and
asserts a `ValueError` whose message names the argument in backticks, in
Keras' form. `test_every_public_callable_has_a_case` asserts every name in
every subpackage's `__all__` has a `Case` (or an `EXEMPT` entry saying why),
and that every argument of every case is exercised or skipped with a reason.
"""

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any

_MISSING = inspect.Parameter.empty


@dataclasses.dataclass
class Case:
    """How to call one public callable with good and bad arguments.

    Attributes:
        target: The public class or function (its signature is read).
        kwargs: Valid keyword arguments for the required parameters, or a
            zero-argument function returning them (for models and other
            objects that must be fresh per call).
        call: What to call instead of `target` (e.g. a bound method on a
            fresh object: `lambda **kw: make().compile(**kw)`); its
            signature is still read from `signature_of` or `target`.
        signature_of: Whose signature lists the arguments, when it is not
            `target` (e.g. `Distiller.compile`).
        bad: Extra bad values per argument (ranges, wrong kinds).
        good: Values per argument that the derived list would call bad but
            that the callable accepts on purpose (e.g. `None` meaning "off").
        skip: Arguments not exercised, each with the reason.
        id: Test id; defaults to the target's qualified name.
        config: Whether to run the config round trip (`get_config`,
            `from_config`, `serialize_keras_object`) on `call(**kwargs)`.
    """

    target: Any
    kwargs: Any = dataclasses.field(default_factory=dict)
    call: Callable | None = None
    signature_of: Any = None
    bad: dict = dataclasses.field(default_factory=dict)
    good: dict = dataclasses.field(default_factory=dict)
    skip: dict = dataclasses.field(default_factory=dict)
    id: str | None = None
    config: bool = False

    def name(self):
        if self.id:
            return self.id
        owner = self.signature_of or self.target
        return getattr(owner, "__qualname__", repr(owner))

    def parameters(self):
        sig = inspect.signature(self.signature_of or self.target)
        return [
            p
            for p in sig.parameters.values()
            if p.name not in ("self", "cls")
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]

    def valid_kwargs(self):
        return dict(self.kwargs()) if callable(self.kwargs) else dict(self.kwargs)

    def make(self, **overrides):
        kwargs = {**self.valid_kwargs(), **overrides}
        return (self.call or self.target)(**kwargs)

    def bad_values(self):
        """Yields `(argument, bad value)` for every argument not skipped."""
        for p in self.parameters():
            if p.name in self.skip:
                continue
            values = list(self.bad.get(p.name, []))
            if p.default is not _MISSING:
                values += derived_bad_values(p.default)
            good = self.good.get(p.name, [])
            for v in _unique(values):
                if not any(_same(v, g) for g in good):
                    yield p.name, v

    def uncovered(self):
        """Arguments with no bad value and no skip reason."""
        covered = {name for name, _ in self.bad_values()} | set(self.skip)
        return [p.name for p in self.parameters() if p.name not in covered]


def derived_bad_values(default):
    """Bad values implied by an argument's default value's kind."""
    if isinstance(default, bool):
        return ["False", "no", 0, 1, None]
    if isinstance(default, int):
        return ["1", 2.5, True, math.nan]
    if isinstance(default, float):
        return ["1", True, math.nan, math.inf]
    if isinstance(default, str):
        return [123, ["a"]]
    return []


def _same(a, b):
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _unique(values):
    out = []
    for v in values:
        if not any(_same(v, o) for o in out):
            out.append(v)
    return out
