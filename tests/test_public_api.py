"""``import segpipe`` is enough: subpackages load on first use, without importing them first."""

import subprocess
import sys

import torch

import segpipe


def test_models_build_after_a_bare_import():
    net = segpipe.models.build("unet", class_names=("background", "tissue", "nucleus"))
    assert isinstance(net, torch.nn.Module)
    assert tuple(net.class_names) == ("background", "tissue", "nucleus")


def test_a_bare_import_does_not_load_torch():
    """In a fresh process: this one has torch loaded already."""
    code = "import sys, segpipe; assert 'torch' not in sys.modules; print(segpipe.__version__)"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == segpipe.__version__


def test_the_modules_the_readme_names_load_after_a_bare_import():
    """The README's ``segpipe.progress.reporting(listener)`` raised AttributeError after a bare
    ``import segpipe``: every ``segpipe.<module>.`` it names must load. In a fresh process."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    named = sorted(set(re.findall(r"\bsegpipe\.([a-z_]+)\.[a-z_]+", readme)))
    assert "progress" in named
    for name in named:  # each alone: loading one loads others as a side effect
        code = f"import segpipe; segpipe.{name}"
        run = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
        )
        assert run.returncode == 0, run.stderr
