"""What an eager network's own code is, as text, for fingerprints: the weights and ``repr`` of a
network leave out its ``forward``, so an edited one (another activation, a skip taken out)
fingerprinted the same and a re-run returned the old network's result as complete.

Layers torch defines are taken as torch's version says them; every other class a network is
made of (the user's, MONAI's, segmentation_models.pytorch's) by the code of its functions as
it runs (bytecode, names and constants: the same code in another Python version reads as
other code, and is computed again), with the module-level functions and constants they name
and the functions they close over.
"""

from __future__ import annotations

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


def _torch_or_builtin(obj: type | types.FunctionType) -> bool:
    """Whether a class or function is torch's or Python's own."""
    module = obj.__module__ or ""
    return module in ("torch", "builtins") or module.startswith("torch.")


def _class_code(cls: type) -> str:
    """The code of each function ``cls`` defines (methods, properties, static and class
    methods), as it runs (not its file, which may have been edited since it was imported),
    with what each reads of its module: functions and constants (``forward`` calling a
    module-level ``act``, reading ``SCALE``). A warning when there is none to read."""
    parts = []
    for name in sorted(cls.__dict__):
        function = _function_of(cls.__dict__[name])
        if function is not None:
            parts.append(f"{name}: {_code_text(function.__code__)}{_globals_text(function)}")
            parts.append(_closure_text(function))
    if not parts and "forward" in cls.__dict__:
        warnings.warn(
            f"{_path(cls)}: its forward's code cannot be read, so the model fingerprint does "
            "not see edits to it: a re-run after one may keep an old result",
            stacklevel=2,
        )
    return "\n".join(p for p in parts if p)


def _function_of(value: Any) -> types.FunctionType | None:
    """The Python function behind a class attribute, None for anything else."""
    if isinstance(value, staticmethod | classmethod):
        value = value.__func__
    elif isinstance(value, property):
        value = value.fget
    return value if isinstance(value, types.FunctionType) else None


def _globals_text(function: types.FunctionType) -> str:
    """The module-level functions (their code) and plain constants (their value) that
    ``function``'s code names, one level deep; modules, classes and torch's functions are
    left out (their code is theirs: a library's version)."""
    found = []
    for name in sorted(_names(function.__code__)):
        if name not in function.__globals__:
            continue  # a builtin, an attribute
        value = function.__globals__[name]
        if isinstance(value, types.FunctionType) and not _torch_or_builtin(value):
            found.append(f"{name}={_code_text(value.__code__)}")
        elif _is_plain(value):
            found.append(f"{name}={value!r}")
    return f" reads {found}" if found else ""


def _is_plain(value: Any) -> bool:
    """A constant whose ``repr`` is its value (no object's address, no set's order)."""
    if isinstance(value, tuple | list):
        return all(_is_plain(v) for v in value)
    return isinstance(value, bool | int | float | complex | str | bytes | type(None))


def _names(code: types.CodeType) -> set[str]:
    """The global and attribute names ``code`` and the code nested in it use."""
    nested = (c for c in code.co_consts if isinstance(c, types.CodeType))
    return set(code.co_names).union(*(_names(c) for c in nested))


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
