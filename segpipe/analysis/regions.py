"""Questions about a region of a result, answered lazily and chunk by chunk.

Everything takes a result path (or an opened level, :func:`segpipe.open_result`) and works on
its Dask chunks, so a gigapixel mask is never whole in memory:

- :func:`class_areas`: pixels, area and fraction per class, over the image or a region;
- :func:`threshold_mask`: ``probabilities.sel(class=name) > p`` as a lazy boolean image.

Areas here come from the coordinates (:func:`pixel_area`), so they are in the result's own
units and hold for any region and level; the finished run's whole-image areas in µm² come
from its counts through :func:`segpipe.results.class_areas_um2`, and the two agree on level 0.

Regions are ``(x0, y0, x1, y1)`` in the result's coordinates (microns; CRS units for a
georeferenced input; pixels of the source's level 0 when the pixel size is unknown), GeoJSON
bbox order. A region holds the pixels whose centres lie in ``[x0, x1)`` and ``[y0, y1)``,
half-open like numpy slicing, so a 50 µm wide region at 0.5 µm/px holds 100 pixels and two
abutting regions share none (xarray's ``ds.sel(x=slice(x0, x1))`` keeps both ends). A region
thinner than a pixel keeps the pixel it lies in.
"""

from __future__ import annotations

import os

import numpy as np
import xarray as xr

from segpipe.results import ResultMeta, open_result

__all__ = [
    "Region",
    "as_dataset",
    "class_areas",
    "class_index",
    "coordinate_step",
    "pixel_area",
    "region_slice",
    "select_region",
    "threshold_mask",
]

Region = tuple[float, float, float, float]  # (x0, y0, x1, y1), coordinate units


def as_dataset(result: str | os.PathLike | xr.Dataset | xr.DataTree, level: int) -> xr.Dataset:
    """``result`` itself if it is an opened level (a Dataset, or a level of
    ``open_result(path, tree=True)``), else its ``level`` opened."""
    if isinstance(result, xr.DataTree):
        if not result.has_data:  # the whole tree: which level is not said
            raise TypeError(
                "pass a result's path, a level Dataset, or a level of its tree "
                "(open_result(path, tree=True)['1']), not the whole tree"
            )
        return result.to_dataset()
    return result if isinstance(result, xr.Dataset) else open_result(result, level)


def coordinate_step(coord: xr.DataArray) -> float:
    """Spacing of a regular coordinate (signed: y of a north-up georeferenced image falls).

    A coordinate of one pixel has no spacing of its own: a result's levels (as stored, so
    with plain xarray too) and a region of :func:`select_region` carry theirs in the
    ``step`` attribute (else 1).
    """
    if coord.size >= 2:
        return float(coord[1] - coord[0])
    return float(coord.attrs.get("step", 1.0))


def pixel_area(ds: xr.Dataset) -> float:
    """Area of one pixel of ``ds`` in its coordinate units squared (µm², CRS units², or 1).

    >>> pixel_area(xr.Dataset(coords={"y": [10.0, 8.0], "x": [0.0, 0.5, 1.0]}))
    1.0
    """
    return abs(coordinate_step(ds["y"]) * coordinate_step(ds["x"]))


def region_slice(centres: np.ndarray, lo: float, hi: float, step: float) -> slice:
    """Index range of the regular, monotonic ``centres`` that lie in ``[lo, hi)``; when none
    does, the pixel (of width ``|step|``) that holds the middle of ``[lo, hi]``, if any.

    >>> centres = np.arange(6) * 0.5
    >>> region_slice(centres, 0.5, 1.5, 0.5), region_slice(centres, 0.6, 0.7, 0.5)
    (slice(1, 3, None), slice(1, 2, None))
    >>> region_slice(centres[::-1], 0.5, 1.5, -0.5)  # falling (north-up y): same pixels
    slice(3, 5, None)
    """
    n = centres.size
    ascending = centres if step >= 0 else centres[::-1]
    i0, i1 = np.searchsorted(ascending, [lo, hi], side="left")
    if i0 == i1:
        # Thinner than a pixel between two centres: the pixel whose footprint holds it.
        i0 = int(np.floor(((lo + hi) / 2 - ascending[0]) / abs(step) + 0.5)) if n else 0
        i1 = i0 + 1 if 0 <= i0 < n else i0
    i0, i1 = int(np.clip(i0, 0, n)), int(np.clip(i1, 0, n))
    return slice(i0, i1) if step >= 0 else slice(n - i1, n - i0)


def select_region(ds: xr.Dataset, region: Region | None) -> xr.Dataset:
    """The pixels of ``ds`` whose centres lie in ``region`` ``(x0, y0, x1, y1)``, half-open:
    ``x0 <= x < x1`` and ``y0 <= y < y1`` (a region thinner than a pixel: the pixel it lies in).

    >>> ds = xr.Dataset(coords={"y": np.arange(4) * 0.5, "x": np.arange(6) * 0.5})
    >>> select_region(ds, (0.5, 0.0, 1.5, 0.6)).sizes
    Frozen({'y': 2, 'x': 2})
    """
    if region is None:
        return ds
    x0, y0, x1, y1 = (float(v) for v in region)
    if not (x0 <= x1 and y0 <= y1):
        raise ValueError(f"region {region} must be (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1")
    # Georeferenced results count y downwards from the north: region_slice takes either order.
    sy, sx = coordinate_step(ds["y"]), coordinate_step(ds["x"])
    out = ds.isel(
        y=region_slice(ds["y"].values, y0, y1, sy), x=region_slice(ds["x"].values, x0, x1, sx)
    )
    # A region one pixel high or wide keeps its level's spacing: its pixels' area.
    out = out.assign_coords(y=out["y"].assign_attrs(step=sy), x=out["x"].assign_attrs(step=sx))
    if out.sizes["y"] == 0 or out.sizes["x"] == 0:
        units = ds["x"].attrs.get("units", "")
        raise ValueError(
            f"region {region} holds no pixel of the result, whose centres span x "
            f"{float(ds.x[0])}..{float(ds.x[-1])} and y {float(ds.y[0])}..{float(ds.y[-1])} "
            f"{units}"
        )
    return out


def class_index(ds: xr.Dataset, class_name: str) -> int:
    """Index of ``class_name`` along ``ds``'s ``class`` axis; a ValueError naming the classes
    when there is no such class."""
    names = [str(c) for c in ds["class"].values]
    if class_name not in names:
        raise ValueError(f"no class {class_name!r} in this result; classes: {', '.join(names)}")
    return names.index(class_name)


def class_areas(
    result: str | os.PathLike | xr.Dataset,
    *,
    region: Region | None = None,
    level: int = 0,
) -> xr.Dataset:
    """Pixels, area and fraction of each class of the mask, lazily.

    Returns a Dataset over ``class`` with ``pixels`` (int), ``area`` (``units`` attribute:
    ``micrometer**2``, or ``pixel**2``) and ``fraction`` (of the region's pixels). Call
    ``.compute()`` (or ``.values``) to reduce the chunks in parallel (inside
    :func:`segpipe.results.naming_damage` for an error naming the result where a chunk cannot
    be read). Georeferenced results give areas in the CRS's units (``metre**2``).
    """
    ds = select_region(as_dataset(result, level), region)
    classes = ds["class"]
    ids = xr.DataArray(np.arange(classes.size), dims="class", coords={"class": classes})
    unit = ds["x"].attrs.get("units", "pixel")
    # Counts, not classes: none of the mask's CF flag attributes (xarray would keep them).
    with xr.set_options(keep_attrs=False):
        pixels = (ds["mask"] == ids).sum(("y", "x"))
        area = pixels * pixel_area(ds)
        fraction = pixels / (ds.sizes["y"] * ds.sizes["x"])
    pixels.attrs = {"long_name": "pixels of the class"}
    area.attrs = {"long_name": "area of the class", "units": f"{unit}**2"}
    fraction.attrs = {"long_name": "fraction of the region's pixels in the class", "units": "1"}
    return xr.Dataset({"pixels": pixels, "area": area, "fraction": fraction}, attrs=ds.attrs)


def threshold_mask(
    result: str | os.PathLike | xr.Dataset,
    class_name: str,
    threshold: float,
    *,
    region: Region | None = None,
    level: int = 0,
) -> xr.DataArray:
    """Lazy (y, x) bool: where ``class_name``'s probability exceeds ``threshold``."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a probability in [0, 1], got {threshold}")
    ds = select_region(as_dataset(result, level), region)
    class_index(ds, class_name)
    probability = ds["probabilities"].sel({"class": class_name}, drop=True)
    with xr.set_options(keep_attrs=False):  # a bool image, not a probability
        # In float64: NumPy compares a float16 array with the threshold rounded to float16
        # (0.3 becomes 0.30005), which leaves out the pixels stored between the two.
        value = probability.astype(np.float64)
        if _stored_dtype(ds) == "uint8":
            # Stored as codes k of k/255, read as float32, which rounds most k/255 up: a code
            # of exactly 0.8 (204) was "above 0.8". Compared as the exact k/255 instead.
            value = (value * 255).round() / 255
        out = value > threshold
    out.attrs = {"long_name": f"{class_name} probability above {threshold}"}
    return out.rename(f"{class_name}>{threshold}")


def _stored_dtype(ds: xr.Dataset) -> str | None:
    """How ``ds``'s probabilities are stored: as its result says (a result written before
    SegmentConfig in its identity alone), or for a Dataset of ``xarray.open_zarr``, which
    carries no segpipe attribute, its encoding."""
    if "segpipe" in ds.attrs:
        return ResultMeta.from_attrs(ds.attrs["segpipe"]).config.probability_dtype
    dtype = ds["probabilities"].encoding.get("dtype")
    return None if dtype is None else str(np.dtype(dtype))
