"""What ``segpipe info`` and ``segpipe query`` report about a result, as plain dictionaries."""

from __future__ import annotations

import os
from typing import Any

from segpipe.analysis.objects import object_table
from segpipe.analysis.regions import Region, class_areas, class_index, threshold_mask
from segpipe.results import (
    class_areas_um2,
    class_fractions,
    class_pixels,
    coordinate_areas,
    naming_damage,
    open_result,
    read_meta,
    result_levels,
    tiles_done,
)

__all__ = ["describe", "region_report"]


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """What ``segpipe info RESULT`` shows: completeness, levels, classes, pixel size, areas,
    provenance. Works on an incomplete result (``complete`` False, ``tiles_done`` counted).

    Class pixels are the tiles written so far (all of them for a complete result), so areas
    go through :func:`segpipe.results.class_areas_um2` like the finished run's; ``provenance``
    is the result's ``segpipe`` attribute (JSON), as :meth:`ResultMeta.to_attrs` writes it.
    """
    meta = read_meta(path)
    with naming_damage(path):
        counts = class_pixels(path)
        done = tiles_done(path)
    areas = class_areas_um2(counts, meta.pixel_size_um)
    in_units, units = coordinate_areas(counts, meta) or (None, None)
    fractions = class_fractions(counts)
    return {
        "path": str(path),
        "complete": meta.complete,
        "tiles_done": int(done.sum()),
        "tiles_total": int(done.size),
        "shape": list(meta.shape),
        "levels": [list(s) for s in result_levels(path)],
        "pixel_size_um": meta.pixel_size_um,
        "crs": meta.crs,
        "area_units": units,  # of each class's "area": µm², or a CRS's units²
        "probability_dtype": meta.config.probability_dtype,
        "classes": [
            {
                "name": name,
                "pixels": int(counts[i]),
                "fraction": fractions[i],
                "area_um2": areas[i] if areas is not None else None,
                "area": in_units[i] if in_units is not None else None,
            }
            for i, name in enumerate(meta.class_names)
        ],
        "provenance": meta.to_attrs(),
    }


def region_report(
    path: str | os.PathLike,
    *,
    class_name: str | None = None,
    region: Region | None = None,
    level: int = 0,
    threshold: float | None = None,
    objects: bool = False,
    connectivity: int = 1,
) -> dict[str, Any]:
    """What ``segpipe query`` prints: class areas over ``region`` (all classes, or one), and
    with ``objects`` the object count and table of ``class_name``."""
    with naming_damage(path):
        return _region_report(path, class_name, region, level, threshold, objects, connectivity)


def _region_report(
    path: str | os.PathLike,
    class_name: str | None,
    region: Region | None,
    level: int,
    threshold: float | None,
    objects: bool,
    connectivity: int,
) -> dict[str, Any]:
    ds = open_result(path, level)
    areas = class_areas(ds, region=region).compute()
    if class_name is not None:
        class_index(ds, class_name)
        areas = areas.sel({"class": [class_name]})
    unit = areas["area"].attrs["units"]
    report: dict[str, Any] = {
        "path": str(path),
        "level": level,
        "region": list(region) if region else None,
        "area_units": unit,
        "classes": [
            {
                "name": str(c),
                "pixels": int(areas["pixels"].sel({"class": c})),
                "area": float(areas["area"].sel({"class": c})),
                "fraction": float(areas["fraction"].sel({"class": c})),
            }
            for c in areas["class"].values
        ],
    }
    if threshold is not None:
        if class_name is None:
            raise ValueError("a probability threshold needs a class (--class NAME)")
        above = threshold_mask(ds, class_name, threshold, region=region)
        n = int(above.sum().compute())
        report["threshold"] = {"class": class_name, "threshold": threshold, "pixels": n}
    if objects:
        if class_name is None:
            raise ValueError("objects are counted for one class (--class NAME)")
        table = object_table(
            ds, class_name, region=region, threshold=threshold, connectivity=connectivity
        )
        report["objects"] = {"class": class_name, "count": len(table)}
        report["object_table"] = table.to_dict(orient="records")
    return report
