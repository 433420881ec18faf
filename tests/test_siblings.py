"""segpipe.io.siblings: the hidden ``.<name>.<kind>-*`` entries a run keeps beside a local
store or file, found by their literal name whatever characters it holds."""

import numpy as np
import pytest

from segpipe.io.siblings import siblings
from segpipe.io.writers import write_pyramidal_tiff

# Each matches res1.tif as a glob pattern.
GLOB_NAMES = ["res[1].tif", "res[1A].tif", "res*.tif", "res?.tif"]


@pytest.mark.parametrize("name", GLOB_NAMES)
def test_the_siblings_of_a_name_with_glob_characters_are_its_own_only(tmp_path, name):
    """Read as a pattern, ``.res[1].tif.writing-*`` found another file's scratch
    (``.res1.tif.writing-*``) and not its own."""
    mine = tmp_path / f".{name}.writing-0123456789ab"
    theirs = tmp_path / ".res1.tif.writing-ba9876543210"
    other_kind = tmp_path / f".{name}.deleting-0123456789ab"
    for path in (mine, theirs, other_kind):
        path.mkdir()
    assert siblings(tmp_path / name, "writing") == [mine]
    assert siblings(tmp_path / "res1.tif", "writing") == [theirs]


@pytest.mark.parametrize("name", GLOB_NAMES)
def test_a_write_clears_its_own_killed_scratch_and_not_a_neighbours(tmp_path, name):
    """A writer clears what a killed writer of its file left; the scratch of another file's
    live writer, which a pattern matched, was deleted under it instead."""
    mine = tmp_path / f".{name}.writing-killed01"
    theirs = tmp_path / ".res1.tif.writing-live0002"
    for scratch in (mine, theirs):
        scratch.mkdir()
        (scratch / "level1.npy").write_bytes(b"x" * 100)
    write_pyramidal_tiff(
        tmp_path / name, np.zeros((64, 64, 3), np.uint8), pixel_size_um=1.0, tile=64
    )
    assert not mine.exists()
    assert (theirs / "level1.npy").read_bytes() == b"x" * 100
