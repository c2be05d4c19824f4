"""Every private Keras name the library uses, and every patch it makes, in one place.

Keras 3 keeps a few things we need outside its public API (`keras.src`). They
are imported here and nowhere else, so a Keras upgrade has one file to check,
and `tests/test_keras_internals.py` pins each of them (its existence and, for
patched functions, a digest of its source) so an upstream change fails a test
instead of a user's run.

Patches (functions of Keras' that the library replaces or wraps) also live
here, each with the Keras behaviour it works around and how it is undone.
"""

import keras
from keras.src.utils import file_utils  # noqa: F401  (gfile-aware exists/rmtree/join)
from keras.src.utils import io_utils

# Keras versions whose private code this module was written against.
TESTED_KERAS_VERSIONS = ("3.15",)


def print_msg(message, line_break=True):
    """Keras' `print_msg`: prints through absl logging when Keras is set to,
    else to stdout, like Keras' own callbacks (no public alias exists)."""
    io_utils.print_msg(message, line_break=line_break)


def keras_version_tested():
    """Whether the installed Keras is a version this module was checked against."""
    return keras.__version__.startswith(TESTED_KERAS_VERSIONS)
