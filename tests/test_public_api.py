"""``import segpipe`` is enough: subpackages load on first use, without importing them first."""

import subprocess
import sys

import pytest
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


@pytest.mark.parametrize("value", ["no", "False", 0, None])
def test_overwrite_that_is_not_a_bool_is_refused_before_anything_is_replaced(tmp_path, value):
    """overwrite="no" (from a config file, an environment variable) is truthy: it replaced a
    result, and a user's GeoJSON file, it was meant to keep."""
    from segpipe.analysis.vectors import export_geojson
    from segpipe.atomic import check_overwrite
    from segpipe.io.ingest import ingest
    from segpipe.training.output import check_output

    kept = tmp_path / "annotations.geojson"
    kept.write_text("my annotations")
    calls = [
        lambda: segpipe.segment(tmp_path / "in.tif", tmp_path / "r.zarr", "x.pt", overwrite=value),
        lambda: ingest(tmp_path / "in.tif", tmp_path / "i.zarr", overwrite=value),
        lambda: export_geojson(tmp_path / "r.zarr", kept, overwrite=value),
        lambda: check_output(tmp_path / "m.pt", overwrite=value),
        lambda: check_overwrite(value),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=f"overwrite must be True or False, got {value!r}"):
            call()
    assert kept.read_text() == "my annotations"


def test_overwrite_of_numpy_and_min_area_of_any_real_are_taken():
    """A value out of numpy or pandas (np.True_, np.int64) is a bool or a number alike."""
    import numpy as np

    from segpipe.atomic import check_overwrite

    assert check_overwrite(np.True_) is True and check_overwrite(np.False_) is False
