"""Argument cases for callbacks, clipping and optimizers (see `tests/api/arguments.py`)."""

CASES = []
EXEMPT = {}
