"""What an eager network's own code is, as text, for fingerprints: the weights and ``repr`` of a
network leave out its ``forward``, so an edited one (another activation, a skip taken out)
fingerprinted the same and a re-run returned the old network's result as complete.

Layers torch defines are taken as torch's version says them; every other class a network is
made of (the user's, MONAI's, segmentation_models.pytorch's) by its source, else by the
bytecode of its ``forward``, and by the functions its ``forward`` closes over.
"""

from __future__ import annotations

import inspect
import types
import warnings
from typing import Any

from torch import nn

__all__ = ["eager_code"]


def eager_code(module: nn.Module) -> str:
    """Class path and ``repr`` of ``module``, then the code of each class not torch's among
    its submodules and their bases (sorted by class path, each once)."""
    head = f"{_path(type(module))}\n{module!r}"
    classes = {
        _path(cls): cls
        for sub in module.modules()
        for cls in type(sub).__mro__
        if not _torch_or_builtin(cls)
    }
    codes = [f"{path}:\n{_class_code(classes[path])}" for path in sorted(classes)]
    return "\n".join([head, *codes])


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _torch_or_builtin(cls: type) -> bool:
    module = cls.__module__ or ""
    return module in ("torch", "builtins") or module.startswith("torch.")


def _class_code(cls: type) -> str:
    """The class's source, else its ``forward``'s bytecode; and what that closes over.
    A warning when neither can be read: edits to that class go unseen."""
    forward = cls.__dict__.get("forward")
    closure = _closure_text(forward) if isinstance(forward, types.FunctionType) else ""
    try:
        return inspect.getsource(cls) + closure
    except (OSError, TypeError):  # defined in exec'd code, a C extension, a lost file
        pass
    if isinstance(forward, types.FunctionType):
        return _code_text(forward.__code__) + closure
    if forward is None:  # its forward is a base's, whose own code is included
        return ""
    warnings.warn(
        f"{_path(cls)}: neither its source nor its forward's code can be read, so the model "
        "fingerprint does not see edits to it: a re-run after one may keep an old result",
        stacklevel=2,
    )
    return ""


def _code_text(code: types.CodeType) -> str:
    """Bytecode, names and constants, nested functions' alike; no memory addresses (a code
    object's ``repr`` has one, which would change the fingerprint every run)."""
    consts = [_const_text(c) for c in code.co_consts]
    return f"{code.co_code.hex()}|{code.co_names}|{consts}"


def _const_text(value: Any) -> str:
    if isinstance(value, types.CodeType):
        return _code_text(value)
    if isinstance(value, frozenset):  # its order follows the string hash seed of the run
        return repr(sorted(map(_const_text, value)))
    return repr(value)


def _closure_text(function: types.FunctionType) -> str:
    """What ``function`` closes over, by name and code: a ``forward`` made in a function (one
    class, another activation each time) reads the same in its source."""
    parts = []
    for cell in function.__closure__ or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, bool | int | float | str | type(None)):
            parts.append(repr(value))
        elif isinstance(value, types.FunctionType):
            parts.append(f"{value.__module__}.{value.__qualname__}:{_code_text(value.__code__)}")
        else:  # a builtin, a class: its name (an object's repr may hold its address)
            name = getattr(value, "__qualname__", None) or type(value).__qualname__
            parts.append(f"{getattr(value, '__module__', '')}.{name}")
    return f"\ncloses over: {parts}" if parts else ""
