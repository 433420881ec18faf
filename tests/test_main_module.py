"""Whether worker processes may re-import the caller's ``__main__`` (execution.main_module)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types

import pytest

from segpipe.execution.main_module import main_reimport_is_safe


def _script_module(tmp_path, source: str) -> types.ModuleType:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(source))
    module = types.ModuleType("__main__")
    module.__file__ = str(path)
    module.__spec__ = None  # python script.py
    return module


@pytest.mark.parametrize(
    ("source", "safe"),
    [
        ("import segpipe\nsegpipe.segment('a.svs', 'a.zarr')\n", False),
        ("def main():\n    pass\n\nif __name__ == '__main__':\n    main()\n", True),
        ("if '__main__' == __name__:\n    pass\n", True),  # either way round
        ("if __name__ != '__main__':\n    pass\n", False),
        ("if __name__ == '__mp_main__':\n    pass\n", False),
        ("def f():\n    if __name__ == '__main__':\n        pass\n", False),  # not top level
        ("if __name__ == '__main__' and True:\n    pass\n", False),  # not a plain guard
        ("this is not python\n", False),
        # too deep for the parser (its MemoryError), not for planning: unguarded
        ("x = " + "-" * 200_000 + "1\nif __name__ == '__main__':\n    pass\n", False),
    ],
    ids=lambda value: value[:40] if isinstance(value, str) else None,
)
def test_a_scripts_guard_is_read_from_its_source(tmp_path, source, safe):
    assert main_reimport_is_safe(_script_module(tmp_path, source)) is safe


def test_no_source_file_is_nothing_to_re_import(tmp_path):
    interactive = types.ModuleType("__main__")  # python -c, a REPL, a notebook's kernel
    interactive.__spec__ = None
    assert main_reimport_is_safe(interactive)
    gone = _script_module(tmp_path, "")
    gone.__file__ = str(tmp_path / "deleted.py")
    assert not main_reimport_is_safe(gone), "unreadable: assumed unguarded"


def test_python_dash_m_reads_the_module_spawn_would_import(tmp_path):
    (tmp_path / "plain.py").write_text("print('run')\n")
    (tmp_path / "guarded.py").write_text("if __name__ == '__main__':\n    print('run')\n")
    for name, safe in (("plain", False), ("guarded", True)):
        module = types.ModuleType("__main__")
        module.__spec__ = types.SimpleNamespace(name=name, origin=str(tmp_path / f"{name}.py"))
        assert main_reimport_is_safe(module) is safe
    package_main = types.ModuleType("__main__")  # python -m pkg: spawn skips pkg.__main__
    package_main.__spec__ = types.SimpleNamespace(name="pkg.__main__", origin="/nowhere")
    assert main_reimport_is_safe(package_main)


@pytest.mark.parametrize("guarded", [False, True])
def test_a_real_script_and_what_spawn_does_with_it(tmp_path, guarded):
    """The reason: a spawned child runs an unguarded script's top level again, its run too
    (which there fails to start its own child), a guarded one's not; the check says so in
    that script."""
    body = (
        "import multiprocessing, sys\n"
        "from segpipe.execution.main_module import main_reimport_is_safe\n"
        "def main():\n"
        "    print('safe', main_reimport_is_safe(), flush=True)\n"
        "    ctx = multiprocessing.get_context('spawn')\n"
        "    p = ctx.Process(target=print, args=('child',))\n"
        "    p.start(); p.join()\n"
    )
    body += "if __name__ == '__main__':\n    main()\n" if guarded else "main()\n"
    script = tmp_path / "script.py"
    script.write_text(body)
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    ).stdout
    assert f"safe {guarded}" in out
    assert out.count("safe") == (1 if guarded else 2), out
