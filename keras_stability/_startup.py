"""Quiet start-up for the command line, and the name it was called by.

TensorFlow's C++ runtime writes start-up lines (oneDNN, CUDA probing, CPU
features) to stderr when it is imported. The command line, launched either as
`python -m keras_stability` or as the `keras-stability` console script, hides
them; a program that merely imports the library keeps TensorFlow's own
behaviour. `keras_stability/__init__.py` asks this module before it imports
anything that imports TensorFlow, so this module must not import TensorFlow
(nor anything from `keras_stability`).
"""

import os
import sys

MODULE = "keras_stability"
CONSOLE_SCRIPT = "keras-stability"
# Interpreter options that take their value as the next argument.
_OPTIONS_WITH_VALUE = ("-W", "-X", "--check-hash-based-pycs")


def _module_run_by_interpreter():
    """The module named by the interpreter's `-m`, or `None`.

    Read from `sys.orig_argv` (the interpreter's own arguments): `sys.argv[0]`
    is `"-m"` only while the module is being located, then its file path.
    """
    argv = list(getattr(sys, "orig_argv", []))
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "-m":
            return argv[i + 1] if i + 1 < len(argv) else None
        if arg.startswith("-m"):  # `python -mkeras_stability`
            return arg[2:]
        if arg in _OPTIONS_WITH_VALUE:
            i += 2
            continue
        if arg == "-c" or arg == "-" or not arg.startswith("-"):
            return None  # a command, stdin or a script: no `-m`
        i += 1
    return None


def launched_as_module():
    """Whether this interpreter was started as `python -m keras_stability[.x]`."""
    target = _module_run_by_interpreter()
    return target is not None and (target == MODULE or target.startswith(MODULE + "."))


def launched_as_console_script():
    """Whether this interpreter runs the `keras-stability` console script.

    pip's launcher is a file named `keras-stability` (`keras-stability.exe`
    or `keras-stability-script.py` on Windows) whose path is `sys.argv[0]`.
    """
    if not sys.argv or not sys.argv[0]:
        return False
    name = os.path.basename(sys.argv[0])
    for suffix in (".exe", "-script.pyw", "-script.py"):
        name = name.removesuffix(suffix)
    return name == CONSOLE_SCRIPT


def launched_as_cli():
    """Whether this interpreter was started as the library's command line."""
    return launched_as_module() or launched_as_console_script()


def program_name():
    """How the command line names itself in usage and error lines.

    `"keras-stability"` when run as the console script, else
    `"python -m keras_stability"` (also when `main()` is called from Python).
    """
    return CONSOLE_SCRIPT if launched_as_console_script() else f"python -m {MODULE}"


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
