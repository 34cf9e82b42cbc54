"""The `>>>` examples in the package's docstrings run and give what they show."""

import doctest
import importlib
import pkgutil

import pytest

import prefix_kernels

MODULES = sorted(m.name for m in pkgutil.walk_packages(prefix_kernels.__path__, "prefix_kernels."))


OPTIONAL = {"prefix_kernels.integrations.vllm": "vllm"}  # modules that need an engine of their own environment


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    if name in OPTIONAL:
        pytest.importorskip(OPTIONAL[name], reason=f"{name} needs {OPTIONAL[name]}, not installed here")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_every_public_name_is_documented():
    for name in prefix_kernels.__all__:
        obj = getattr(prefix_kernels, name)
        assert obj.__doc__ and obj.__doc__.strip(), name
        for attr, member in vars(obj).items() if isinstance(obj, type) else ():
            if callable(member) and not attr.startswith("_"):
                assert getattr(member, "__doc__", None), f"{name}.{attr} has no docstring"
