"""The examples in segpipe's docstrings run and show what they say (``>>>``, doctest): the
docs' claims are checked as the code changes, not only when they were written."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import segpipe

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(segpipe.__path__, "segpipe.")
    if not m.name.endswith("__main__")  # running it is running the CLI
)


@pytest.mark.parametrize("name", ["segpipe", *MODULES])
def test_the_docstring_examples_hold(name: str) -> None:
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, report=False)
    assert result.failed == 0, f"{result.failed} of {name}'s examples fail (printed above)"


def test_the_examples_are_found() -> None:
    """A finder that finds nothing would pass every module."""
    found = sum(
        len(t.examples)
        for name in MODULES
        for t in doctest.DocTestFinder().find(importlib.import_module(name))
    )
    assert found > 100
