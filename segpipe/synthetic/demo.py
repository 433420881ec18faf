"""The demo slide: a synthetic H&E scan written as a tiled pyramidal OME-TIFF, with its truth."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import zarr

from segpipe.io.writers import write_pyramidal_tiff
from segpipe.synthetic import tissue_slide

__all__ = ["DemoSlide", "make_demo_slide"]


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
    pixel_size_um: float = 0.5,
    tissue_fraction: float | None = None,
) -> DemoSlide:
    """Generate a ``size`` x ``size`` synthetic slide into ``directory`` (reused if present).

    ``tissue_fraction`` (0-1] sets the share of tissue, glass elsewhere (default: 45-65 %,
    drawn from the seed); see :func:`segpipe.synthetic.tissue_slide`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"synthetic-{size}px-seed{seed}"
    if tissue_fraction is not None:
        stem += f"-tissue{round(100 * tissue_fraction)}"
    image, truth = directory / f"{stem}.ome.tif", directory / f"{stem}.truth.zarr"
    # The image is renamed into place last: if it exists, the truth is complete too.
    if not image.exists():
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
    names = tuple(cast(list[str], zarr.open_array(truth, mode="r").attrs["class_names"]))
    return DemoSlide(image, truth, pixel_size_um, names)
