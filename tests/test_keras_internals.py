"""Pins every private Keras name the library relies on (`keras_stability._keras_internals`)."""

import inspect

from keras_stability import _keras_internals


def test_installed_keras_is_a_tested_version():
    assert _keras_internals.keras_version_tested()


def test_print_msg_signature_is_the_one_we_call():
    from keras.src.utils import io_utils

    params = list(inspect.signature(io_utils.print_msg).parameters)
    assert params[:2] == ["message", "line_break"]


def test_print_msg_prints(capsys):
    _keras_internals.print_msg("hello from the library")
    assert "hello from the library" in capsys.readouterr().out


def test_file_utils_has_what_backup_uses():
    for name in ("exists", "rmtree", "join"):
        assert callable(getattr(_keras_internals.file_utils, name))
