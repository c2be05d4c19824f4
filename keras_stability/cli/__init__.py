"""Command line entry points: `python -m keras_stability <command>`."""
