"""The package's shape: every module imports, imports point only down the layers, no circles,
no private names imported across modules, no module grown past the size we read comfortably."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import segpipe

PACKAGE = Path(segpipe.__file__).parent

# Lowest first; a module may import from its own layer and the layers before it.
LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "segpipe.version",
        "segpipe.config",
        "segpipe.palette",
        "segpipe.faults",
        "segpipe.progress",
        "segpipe.atomic",
    ),
    ("segpipe.geometry",),
    ("segpipe.models",),
    ("segpipe.io",),
    ("segpipe.synthetic",),
    ("segpipe.results",),
    # `import segpipe` is the public facade over segment/open_result/ingest/open_image.
    ("segpipe.execution", "segpipe"),
    ("segpipe.analysis",),
    ("segpipe.training",),
    ("segpipe.archive",),
    ("segpipe.flows",),
    ("segpipe.cli", "segpipe.query", "segpipe.vectors", "segpipe.__init__"),
)
MAX_LINES = 420


def _modules() -> dict[str, Path]:
    mods = {"segpipe.__init__": PACKAGE / "__init__.py"}
    for info in pkgutil.walk_packages([str(PACKAGE)], "segpipe."):
        path = PACKAGE.joinpath(*info.name.split(".")[1:])
        mods[info.name] = path / "__init__.py" if info.ispkg else path.with_suffix(".py")
    return mods


MODULES = _modules()


def _layer(name: str) -> int:
    """Rank of a module: the layer whose entry is its longest dotted prefix."""
    best, rank = -1, -1
    for i, entries in enumerate(LAYERS):
        for entry in entries:
            if (name == entry or name.startswith(entry + ".")) and len(entry) > best:
                best, rank = len(entry), i
    if rank < 0:
        raise AssertionError(f"{name} is in no layer of tests/test_layout.py::LAYERS")
    return rank


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _imports(module: str, path: Path) -> list[tuple[str, str, bool]]:
    """(imported module, imported name or "", at module level) for each segpipe import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        at_top = id(node) in top
        if isinstance(node, ast.Import):
            out += [(a.name, "", at_top) for a in node.names if a.name.split(".")[0] == "segpipe"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = _package_of(module, path).split(".")
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "segpipe":
                continue
            for alias in node.names:
                target = f"{base}.{alias.name}"
                # `from segpipe.archive import catalog` imports the submodule, not the package.
                out.append((target if target in MODULES else base, alias.name, at_top))
    return out


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name: str) -> None:
    importlib.import_module(name.removesuffix(".__init__") or "segpipe")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down_the_layers(name: str) -> None:
    rank = _layer(name)
    upward = [target for target, _, _ in _imports(name, MODULES[name]) if _layer(target) > rank]
    assert not upward, f"{name} (layer {rank}) imports from higher layers: {upward}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_name_is_imported_across_modules(name: str) -> None:
    private = [
        f"{target}.{imported}"
        for target, imported, _ in _imports(name, MODULES[name])
        if imported.startswith("_") and imported != "__version__"
    ]
    assert not private, f"{name} imports private names of other modules: {private}"


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (module -> modules it imports at load time), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (found := visit(name)):
            return found
    return None


def test_no_import_circles() -> None:
    # Module-level imports only: a function-level import runs after both modules loaded.
    # A package's __init__ importing its submodules is how it re-exports; a circle appears
    # when a submodule imports its own package back.
    graph = {
        name: {t for t, _, top in _imports(name, path) if top and t in MODULES and t != name}
        for name, path in MODULES.items()
    }
    circle = _circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def test_the_layout_checks_can_fail() -> None:
    assert _layer("segpipe.geometry.tiling") < _layer("segpipe.execution.tasks")
    assert _layer("segpipe.cli.segment") == len(LAYERS) - 1
    with pytest.raises(AssertionError, match="in no layer"):
        _layer("somewhere.else")
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _circle({"a": {"b"}, "b": set()}) is None
    # An import of a package's submodule resolves to the submodule, not the package.
    archive = MODULES["segpipe.archive.process"]
    targets = {t for t, _, _ in _imports("segpipe.archive.process", archive)}
    assert "segpipe.archive.catalog" in targets
    assert "segpipe.archive" not in targets


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_readable(name: str) -> None:
    lines = len(MODULES[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it by concern"
