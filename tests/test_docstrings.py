"""Every public class and function of the layer package has a docstring, and every field of its
dataclasses is documented where help() shows it (the class docstring's Attributes)."""
import dataclasses
import importlib
import inspect

import pytest

LAYER_MODULES = ("mos.config", "mos.layer", "mos.outputs", "mos.experts", "mos.routing", "mos.inputs", "mos.encoders", "mos.boosting",
                 "mos.delong")


def _public(module):
    for name, value in vars(module).items():
        if name.startswith("_") or not (inspect.isclass(value) or inspect.isfunction(value)):
            continue
        if getattr(value, "__module__", None) == module.__name__:
            yield name, value


@pytest.mark.parametrize("module_name", LAYER_MODULES)
def test_every_public_name_has_a_docstring(module_name):
    module = importlib.import_module(module_name)
    assert inspect.getdoc(module), module_name
    missing = [name for name, value in _public(module) if not (value.__doc__ or "").strip()]
    assert not missing, f"{module_name}: no docstring on {missing}"


@pytest.mark.parametrize("module_name", LAYER_MODULES)
def test_every_dataclass_field_is_documented(module_name):
    module = importlib.import_module(module_name)
    for name, value in _public(module):
        if not dataclasses.is_dataclass(value):
            continue
        doc = value.__doc__ or ""
        undocumented = [field.name for field in dataclasses.fields(value) if f"{field.name}" not in doc]
        assert not undocumented, f"{module_name}.{name}: fields not in the docstring: {undocumented}"
