"""argparse types shared by the subcommands."""

import argparse


def positive_int(text):
    """argparse `type=` for a positive integer."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value
