"""Argument cases for distribute (see `tests/api/arguments.py`)."""

CASES = []
EXEMPT = {}
