"""ProbSAMLib's public API at the package level: the lazily imported names (PEP 562 ``__getattr__``) are the
objects their modules define, and a name the package does not have is an AttributeError as for any module."""

import importlib

import pytest

import ProbSAMLib


def test_every_lazy_name_is_the_object_of_its_module():
    """``ProbSAMLib.<name>`` for each name of the lazy table resolves to that module's own object (not a copy
    or a wrapper), and ``from ProbSAMLib import <name>`` gives the same object."""
    assert ProbSAMLib._LAZY, "the lazy table is empty"
    for name, module in ProbSAMLib._LAZY.items():
        expected = getattr(importlib.import_module(module), name)
        assert getattr(ProbSAMLib, name) is expected, name
        namespace = {}
        exec(f"from ProbSAMLib import {name}", namespace)  # noqa: S102 (a fixed name from the table)
        assert namespace[name] is expected, name


def test_an_unknown_name_is_an_attribute_error_naming_it():
    """A name in neither the module nor the lazy table raises AttributeError with the usual message, so
    ``hasattr``/``getattr(..., default)`` behave as for any module and ``from ProbSAMLib import x`` fails
    with ImportError instead of importing something else."""
    with pytest.raises(AttributeError, match=r"module 'ProbSAMLib' has no attribute 'no_such_name'"):
        ProbSAMLib.no_such_name  # noqa: B018
    assert not hasattr(ProbSAMLib, "sample_mask")  # a near miss of sample_masks is not resolved to it
    assert getattr(ProbSAMLib, "no_such_name", "default") == "default"
    with pytest.raises(ImportError, match="no_such_name"):
        exec("from ProbSAMLib import no_such_name", {})  # noqa: S102
