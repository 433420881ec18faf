"""The demo slide: a synthetic H&E scan written as a tiled pyramidal OME-TIFF, with its truth."""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import cast

import zarr

from segpipe.io.readers import open_image
from segpipe.io.writers import write_pyramidal_tiff
from segpipe.synthetic import tissue_slide

__all__ = ["DemoSlide", "make_demo_slide"]

_DEFAULT_PIXEL_SIZE_UM = 0.5


@dataclass(frozen=True)
class DemoSlide:
    image: Path  # pyramidal OME-TIFF, (Y, X, 3) uint8
    truth: Path  # Zarr array (y, x) uint8 class labels
    pixel_size_um: float
    class_names: tuple[str, ...]


def make_demo_slide(
    directory: str | os.PathLike,
    *,
    size: int = 8192,
    seed: int = 0,
    pixel_size_um: float = _DEFAULT_PIXEL_SIZE_UM,
    tissue_fraction: float | None = None,
) -> DemoSlide:
    """Generate a ``size`` x ``size`` synthetic slide into ``directory`` (reused if present).

    ``tissue_fraction`` (0-1] sets the share of tissue, glass elsewhere (default: 45-65 %,
    drawn from the seed); see :func:`segpipe.synthetic.tissue_slide`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # The name is the cache key, so it holds every parameter exactly. Names made before stay
    # valid: the default pixel size adds nothing, a whole percent of tissue reads "-tissue30".
    stem = f"synthetic-{size}px-seed{seed}"
    if pixel_size_um != _DEFAULT_PIXEL_SIZE_UM:
        stem += f"-{_exact(pixel_size_um)}um"
    if tissue_fraction is not None:
        stem += f"-tissue{_exact(tissue_fraction, 100)}"
    image, truth = directory / f"{stem}.ome.tif", directory / f"{stem}.truth.zarr"
    # The image is renamed into place last: if it exists, the truth is complete too. One made
    # at another pixel size under a default name (before pixel sizes were in names) is redone.
    # One run makes it, another waits and takes it: two at once deleted each other's truth.
    with _waiting_lock(directory / f".{stem}.lock"):
        if not image.exists() or not _is_at(image, pixel_size_um):
            _generate(image, truth, size, seed, pixel_size_um, tissue_fraction)
    names = tuple(cast(list[str], zarr.open_array(truth, mode="r").attrs["class_names"]))
    return DemoSlide(image, truth, pixel_size_um, names)


@contextlib.contextmanager
def _waiting_lock(path: Path) -> Iterator[None]:
    """Hold ``path`` locked (flock), waiting for another holder; released on exit or death.
    A folder that takes no lock file takes no slide either: a made one is read unlocked."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _generate(
    image: Path,
    truth: Path,
    size: int,
    seed: int,
    pixel_size_um: float,
    tissue_fraction: float | None,
) -> None:
    """Write the slide's truth, then its image, renamed into place last."""
    slide = tissue_slide(
        size, seed=seed, pixel_size_um=pixel_size_um, tissue_fraction=tissue_fraction
    )
    labels = zarr.create_array(
        truth,
        shape=slide.labels.shape,
        chunks=(1024, 1024),
        dtype="uint8",
        dimension_names=("y", "x"),
        overwrite=True,
    )
    labels[...] = slide.labels
    labels.attrs["class_names"] = list(slide.class_names)
    partial = image.with_name(image.name + ".partial")
    write_pyramidal_tiff(partial, slide.image, pixel_size_um=pixel_size_um)
    os.replace(partial, image)


def _exact(value: float, scale: int = 1) -> str:
    """``value * scale`` in decimal, exactly: from the float's shortest repr, so two floats
    never share a name (rounding 0.301 and 0.304 to percent did).

    >>> _exact(0.301, 100), _exact(0.3, 100), _exact(1.0, 100), _exact(0.25)
    ('30.1', '30', '100', '0.25')
    """
    return format((Decimal(repr(float(value))) * scale).normalize(), "f")


def _is_at(image: Path, pixel_size_um: float) -> bool:
    """Whether the OME-TIFF ``image`` says it has ``pixel_size_um`` pixels."""
    found = open_image(image).pixel_size_um
    return found is not None and math.isclose(found, pixel_size_um, rel_tol=1e-6)
