"""Public docstrings are of the length Keras uses and document every argument."""

import inspect
import re

import keras
import pytest

import keras_stability
from tests.api.test_arguments import SUBPACKAGES


def _public():
    for package in SUBPACKAGES:
        module = getattr(keras_stability, package)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                yield f"{package}.{name}", obj


PUBLIC = dict(_public())


def _keras_longest_callback_docstring():
    """Lines of the longest class docstring in `keras.callbacks`
    (`ModelCheckpoint`'s, 161 lines in Keras 3.15)."""
    return max(
        len(inspect.getdoc(obj).splitlines())
        for obj in vars(keras.callbacks).values()
        if inspect.isclass(obj) and inspect.getdoc(obj)
    )


def test_the_bound_is_keras_own():
    # The bound below is measured on the installed Keras, not chosen here.
    assert 100 <= _keras_longest_callback_docstring() <= 300


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_docstring_is_no_longer_than_keras_longest_callback(name):
    doc = inspect.getdoc(PUBLIC[name])
    assert doc, f"{name} has no docstring"
    lines = len(doc.splitlines())
    assert lines <= _keras_longest_callback_docstring(), (
        f"{name}'s docstring has {lines} lines; Keras' longest callback "
        f"docstring has {_keras_longest_callback_docstring()}: put the detail "
        "in the module that holds it and point to it"
    )


def _documented_arguments(doc):
    """Names documented in the `Args:` section of a Google-style docstring."""
    match = re.search(r"^Args:\n((?:[ \t]+.*\n|\n)+)", doc + "\n", re.MULTILINE)
    if match is None:
        return set()
    block = match.group(1)
    indent = min(
        len(line) - len(line.lstrip()) for line in block.splitlines() if line.strip()
    )
    return {
        m.group(1)
        for m in re.finditer(rf"^ {{{indent}}}\**(\w+)[^\n:]*:", block, re.MULTILINE)
    }


CALLBACKS = {
    name: obj
    for name, obj in PUBLIC.items()
    if inspect.isclass(obj) and issubclass(obj, keras.callbacks.Callback)
}


@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_callback_docstring_documents_every_argument(name):
    cls = CALLBACKS[name]
    arguments = {
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    documented = _documented_arguments(inspect.getdoc(cls))
    assert arguments <= documented, (
        f"{name}: not in its Args: {sorted(arguments - documented)}"
    )
