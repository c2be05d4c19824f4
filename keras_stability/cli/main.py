"""`python -m keras_stability` (or `keras-stability`): the command line.

Each subcommand lives in its own module with two functions:
`add_arguments(parser)` and `run(args) -> int` (the exit code). Register new
subcommands in `COMMANDS`, in the order `--help` lists them.
"""

import argparse
import importlib

from keras_stability import _startup
from keras_stability._startup import program_name

# name -> (module, one-line help). `demo` comes first.
COMMANDS = {
    "demo": (
        "keras_stability.cli.demo",
        "Train the plain Keras example (fixed) and show the library on it.",
    ),
    "diagnose": (
        "keras_stability.cli.diagnose",
        "Train a saved model a few steps and report per-layer gradient health.",
    ),
}


def build_parser(prog=None):
    """The argument parser; `prog` defaults to the name the user called."""
    parser = argparse.ArgumentParser(
        prog=prog or program_name(),
        description=(
            "keras-stability: stable training and smaller models for Keras 3."
        ),
    )
    from keras_stability.version import __version__

    parser.add_argument("--version", action="version", version=__version__)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name, (module, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(sub)
        sub.set_defaults(_module=module)
    return parser


def main(argv=None):
    """Parses `argv` (defaults to `sys.argv[1:]`) and runs the subcommand."""
    args = build_parser().parse_args(argv)
    # Parsed without TensorFlow (`--help` and usage errors answer at once):
    # now it and the package's parts, with TensorFlow's start-up lines
    # silenced when this is the command line.
    if _startup.launched_as_cli():
        _startup.quiet_tensorflow_startup()
    importlib.import_module("keras_stability")._import_parts()
    return importlib.import_module(args._module).run(args)
