"""Whether worker processes may start from this one: multiprocessing's spawn (Dask's nannies)
runs the caller's ``__main__`` script again in each child, as ``__mp_main__``, so a plain
script whose run is not under an ``if __name__ == "__main__":`` guard would start the run
again in every worker (and fail there, mid-bootstrap)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["main_reimport_is_safe"]


def main_reimport_is_safe(main: ModuleType | None = None) -> bool:
    """Whether spawned processes re-import ``main`` (default: ``__main__``) harmlessly: it has
    no source file (an interactive session, a notebook: nothing is re-imported), it is a
    package's ``__main__`` (``python -m pkg``: spawn skips it), or its source has a top-level
    ``if __name__ == "__main__":`` block. Source that cannot be read or parsed: False.

    Any such block will do: a script that also starts a run at its top level, outside its
    guard, would have each worker start that run again while it starts."""
    main = main if main is not None else sys.modules.get("__main__")
    if main is None:
        return True
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", None)
    if name is not None and (name == "__main__" or name.endswith(".__main__")):
        return True
    path = getattr(spec, "origin", None) if name is not None else getattr(main, "__file__", None)
    if path is None:
        return True
    try:
        tree = ast.parse(Path(path).read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError, MemoryError, RecursionError):
        return False  # MemoryError: the parser's stack, on a deeply nested expression
    return any(isinstance(node, ast.If) and _is_main_test(node.test) for node in tree.body)


def _is_main_test(test: ast.expr) -> bool:
    # __name__ == "__main__", either way round
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1):
        return False
    if not isinstance(test.ops[0], ast.Eq):
        return False
    sides = {_name_or_text(test.left), _name_or_text(test.comparators[0])}
    return sides == {"name:__name__", "text:__main__"}


def _name_or_text(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return f"name:{node.id}"
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return f"text:{node.value}"
    return ""
