"""Every bad value of every public argument gets a Keras-style `ValueError` naming it.

The cases live in `specs_<area>.py` beside this file, one list `CASES` and one
dict `EXEMPT` (public name -> why it takes no argument worth checking) each.
"""

import importlib
import inspect
import json
import pkgutil
import re

import keras
import pytest

import keras_stability

# Every subpackage the top-level package exposes.
SUBPACKAGES = [
    name
    for name in keras_stability.__all__
    if inspect.ismodule(getattr(keras_stability, name))
]


def _spec_modules():
    import tests.api as api

    for info in pkgutil.iter_modules(api.__path__):
        if info.name.startswith("specs_"):
            yield importlib.import_module(f"tests.api.{info.name}")


CASES = [case for module in _spec_modules() for case in module.CASES]
EXEMPT = {k: v for module in _spec_modules() for k, v in module.EXEMPT.items()}


def _value_id(value):
    # The same id in every process (pytest-xdist's workers compare theirs):
    # no memory address.
    return re.sub(r" (object )?at 0x[0-9a-fA-F]+", "", repr(value))


BAD_CALLS = [
    pytest.param(case, arg, value, id=f"{case.name()}-{arg}={_value_id(value)}")
    for case in CASES
    for arg, value in case.bad_values()
]


@pytest.mark.parametrize(("case", "arg", "value"), BAD_CALLS)
def test_bad_argument_gets_a_value_error_naming_it(case, arg, value):
    with pytest.raises(ValueError) as info:
        case.make(**{arg: value})
    message = str(info.value)
    assert f"`{arg}`" in message, message


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name())
def test_valid_arguments_are_accepted(case):
    case.make()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name())
def test_every_argument_is_exercised_or_skipped_with_a_reason(case):
    assert case.uncovered() == [], (
        f"{case.name()}: give these arguments bad values or a skip reason"
    )


def _public_callables(subpackage):
    module = importlib.import_module(f"keras_stability.{subpackage}")
    names = getattr(module, "__all__", None)
    assert names is not None, f"keras_stability.{subpackage} has no __all__"
    for name in names:
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            yield f"{subpackage}.{name}", obj


@pytest.mark.parametrize("subpackage", SUBPACKAGES)
def test_every_public_callable_has_a_case(subpackage):
    covered = {id(c.signature_of or c.target) for c in CASES} | {
        id(c.target) for c in CASES
    }
    missing = [
        qualified
        for qualified, obj in _public_callables(subpackage)
        if id(obj) not in covered and qualified not in EXEMPT
    ]
    assert missing == [], f"no argument case for {missing}"


def test_top_level_names_are_the_subpackages_and_headline_classes():
    for name in keras_stability.__all__:
        assert hasattr(keras_stability, name)


CONFIG_CASES = [c for c in CASES if c.config]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=lambda c: c.name())
def test_config_round_trip(case):
    """Keras' `run_class_serialization_test`, applied to every serializable class."""
    obj = case.make()
    config = obj.get_config()
    dumped = json.dumps(config, sort_keys=True)
    init_args = {p.name for p in case.parameters()}
    if isinstance(obj, keras.layers.Layer):
        # Layers add the base Layer's keys (name, trainable, dtype, ...).
        assert init_args <= set(config), init_args - set(config)
    else:
        assert set(config) == init_args, set(config) ^ init_args
    revived = type(obj).from_config(config)
    assert json.dumps(revived.get_config(), sort_keys=True) == dumped
    serialized = keras.saving.serialize_keras_object(obj)
    revived = keras.saving.deserialize_keras_object(serialized)
    assert type(revived) is type(obj)
    assert json.dumps(revived.get_config(), sort_keys=True) == dumped
