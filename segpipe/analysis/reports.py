"""What ``segpipe info`` and ``segpipe query`` report about a result, as plain dictionaries."""

from __future__ import annotations

import os
from typing import Any

from segpipe.analysis.objects import object_table
from segpipe.analysis.regions import Region, class_areas, class_index, threshold_mask
from segpipe.results import (
    class_pixels,
    is_complete,
    open_result,
    read_meta,
    result_levels,
    tiles_done,
)

__all__ = ["describe", "region_report"]


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """What ``segpipe info RESULT`` shows: completeness, levels, classes, pixel size, areas,
    provenance. Works on an incomplete result (``complete`` False, ``tiles_done`` counted)."""
    meta = read_meta(path)
    ident = meta["identity"]
    names = list(meta["class_names"])
    counts = class_pixels(path)
    done = tiles_done(path)
    px = meta.get("pixel_size_um")
    total = max(1, int(counts.sum()))
    return {
        "path": str(path),
        "complete": is_complete(path),
        "tiles_done": int(done.sum()),
        "tiles_total": int(done.size),
        "shape": list(ident["shape"]),
        "levels": [list(s) for s in result_levels(path)],
        "pixel_size_um": px,
        "crs": ident.get("crs"),
        "probability_dtype": ident.get("probability_dtype"),
        "classes": [
            {
                "name": name,
                "pixels": int(counts[i]),
                "fraction": float(counts[i]) / total,
                "area_um2": float(counts[i]) * px**2 if px else None,
            }
            for i, name in enumerate(names)
        ],
        "provenance": meta,
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
