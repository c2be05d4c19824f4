"""Quiet start-up for the command line.

TensorFlow's C++ runtime writes start-up lines (oneDNN, CUDA probing, CPU
features) to stderr when it is imported. The command line hides them; a
program that merely imports the library keeps TensorFlow's own behaviour.
This module must not import TensorFlow.
"""

import os
import sys

_CLI_MODULE = "keras_stability"


def launched_as_cli():
    """Whether this interpreter was started as `python -m keras_stability`.

    While `-m` locates the module, `sys.argv[0]` is `"-m"`; `sys.orig_argv`
    holds the interpreter's own arguments.
    """
    if not sys.argv or sys.argv[0] != "-m":
        return False
    argv = list(getattr(sys, "orig_argv", []))
    try:
        target = argv[argv.index("-m") + 1]
    except (ValueError, IndexError):
        return False
    return target == _CLI_MODULE or target.startswith(_CLI_MODULE + ".")


def quiet_tensorflow_startup():
    """Imports TensorFlow with its C++ start-up log lines silenced.

    Does nothing when the user already chose `TF_CPP_MIN_LOG_LEVEL` or when
    TensorFlow is already imported.
    """
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ or "tensorflow" in sys.modules:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    # Lines logged before absl is initialised ignore TF_CPP_MIN_LOG_LEVEL:
    # hide file descriptor 2 for the duration of the import only.
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
