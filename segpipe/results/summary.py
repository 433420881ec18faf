"""What a finished run did, and the shares and areas of its mask's classes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from segpipe.results.schema import ResultMeta

__all__ = ["RunSummary", "class_areas_um2", "class_fractions", "coordinate_areas"]


@dataclass(frozen=True)
class RunSummary:
    """What a finished run did: tiles, time and per-class pixel counts of the mask."""

    tiles_total: int
    tiles_computed: int  # the result's computed tiles, by whichever runs (not background)
    tiles_skipped: int  # of those, the ones this run found done by an earlier, resumed one
    windows: int  # this run's, as the two below
    seconds: float
    megapixels_per_second: float
    class_pixels: tuple[int, ...]  # (C,) pixels of each class in the mask
    # Foreground masks (config.foreground): tiles with no foreground are not computed and read
    # as class 0 (counted in class_pixels); foreground_pixels is None when there was no mask.
    tiles_background: int = 0
    foreground_pixels: int | None = None

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> RunSummary:
        """The summary a result's ``segpipe`` attribute holds (flat keys, as written).
        ValueError where it counts other classes than the result names (an attribute edited:
        ``info`` dropped a class, and its fractions summed to 96%)."""
        counts, ident = [int(n) for n in attrs["class_pixels"]], attrs.get("identity") or {}
        if (names := ident.get("class_names")) is not None and len(counts) != len(names):
            raise ValueError(f"class_pixels counts {len(counts)} classes, not {len(names)}")
        return cls(
            tiles_total=int(attrs["tiles_total"]),
            tiles_computed=int(attrs["tiles_computed"]),
            tiles_skipped=int(attrs["tiles_skipped"]),
            windows=int(attrs.get("windows", 0)),
            seconds=float(attrs["seconds"]),
            megapixels_per_second=float(attrs["megapixels_per_second"]),
            class_pixels=tuple(counts),
            tiles_background=int(attrs.get("tiles_background", 0)),
            foreground_pixels=attrs.get("foreground_pixels"),
        )

    @property
    def class_fraction(self) -> tuple[float, ...]:
        """(C,) share of the mask's pixels per class."""
        return class_fractions(self.class_pixels)


def class_fractions(class_pixels: Sequence[int] | np.ndarray) -> tuple[float, ...]:
    """(C,) share of each class in ``class_pixels`` (all zeros when no pixel is counted).

    >>> class_fractions([1, 0, 3])
    (0.25, 0.0, 0.75)
    """
    counts = np.asarray(class_pixels, dtype=np.int64)
    return tuple((counts / max(1, int(counts.sum()))).tolist())


def class_areas_um2(
    class_pixels: Sequence[int] | np.ndarray, pixel_size_um: float | None
) -> tuple[float, ...] | None:
    """(C,) area of each class in square microns; None when the pixel size is unknown.

    >>> class_areas_um2([4, 0, 8], 0.5)
    (1.0, 0.0, 2.0)
    """
    if not pixel_size_um:
        return None
    return tuple(float(n) * pixel_size_um**2 for n in class_pixels)


def coordinate_areas(
    class_pixels: Sequence[int] | np.ndarray, meta: ResultMeta
) -> tuple[tuple[float, ...], str] | None:
    """(C,) area of each class in the units of ``meta``'s result's coordinates, and those
    units (``"micrometer**2"``, a CRS's ``"metre**2"``); None in pixel coordinates."""
    from segpipe.results.layout import pixel_grid

    try:
        grid = pixel_grid(meta)
    except ValueError:  # a CRS this PROJ cannot read (rasterio's CRSError): no units known
        return None
    if grid.units == "pixel":
        return None
    pixel = abs(grid.step[0] * grid.step[1])
    return tuple(float(n) * pixel for n in class_pixels), f"{grid.units}**2"
