"""OME-Zarr 0.5 metadata: where each pyramid level lies, and the multiscales/label attributes;
and where the OME-XML of a multi-file OME-TIFF set contradicts itself (:func:`set_file_conflicts`).

Level ``k`` halves level ``k - 1`` (an odd last row or column is dropped, as
:func:`segpipe.geometry.pixels.pyramid_shapes` does), so its pixel ``i`` covers level-0 pixels
``[2**k * i, 2**k * (i + 1))`` and sits at their centre::

    level 0   | 0 | 1 | 2 | 3 |        y = s * i
    level 1   |   0   |   1   |        y = s * (2 * i + 0.5)
    level 2   |       0       |        y = s * (4 * i + 1.5)

which is OME's ``scale`` ``s * 2**k`` and ``translation`` ``s * (2**k - 1) / 2``. Ingested
images and results both describe their levels through :func:`multiscale_attributes`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from segpipe.palette import class_color, class_colors

__all__ = [
    "OME_VERSION",
    "PixelGrid",
    "label_attributes",
    "level0_placement",
    "level_coordinates",
    "multiscale_attributes",
    "ngff04_attributes",
    "omero_attributes",
    "set_file_conflicts",
]

OME_VERSION = "0.5"


def level_coordinates(n: int, level: int, pixel_size: float) -> np.ndarray:
    """Centres of the ``n`` pixels of ``level`` along one axis, in units of ``pixel_size``.

    >>> level_coordinates(3, 0, 0.5).tolist()
    [0.0, 0.5, 1.0]
    >>> level_coordinates(2, 1, 0.5).tolist()
    [0.25, 1.25]
    """
    f = 2**level
    return pixel_size * (f * np.arange(n, dtype=np.float64) + (f - 1) / 2)


@dataclass(frozen=True)
class PixelGrid:
    """Where level-0 pixel centres lie: ``origin + step * index`` per axis (y, x), in ``units``.

    Microns when the pixel size is known, the CRS's units (``step[0] < 0``: north up) for a
    georeferenced input, else pixels.

    >>> g = PixelGrid.of(0.5, None, None)
    >>> g.units, g.coordinates(1, 3, 0).tolist(), g.coordinates(1, 2, 1).tolist()
    ('micrometer', [0.0, 0.5, 1.0], [0.25, 1.25])
    """

    origin: tuple[float, float]
    step: tuple[float, float]
    units: str
    ome_unit: str | None  # OME-Zarr's name for ``units``; None for pixels
    crs_wkt: str | None = None
    transform: tuple[float, ...] | None = None  # level 0, pixel corners (a, b, c, d, e, f)

    @classmethod
    def of(
        cls,
        pixel_size_um: float | None,
        crs: str | None,
        transform: tuple[float, ...] | None,
        origin_um: tuple[float, float] = (0.0, 0.0),
    ) -> PixelGrid:
        """``origin_um``: (y, x) microns of the first pixel's centre, for an image with a
        pixel size and no georeference (a source's translation, and a coarser level's offset
        in it: see ``segpipe.results.layout.source_origin_um``)."""
        if transform is not None and crs is not None:
            from rasterio.crs import CRS

            ref = CRS.from_user_input(crs)
            a, _, c, _, e, f = transform
            # A geographic CRS's are degrees (rasterio says "unknown": it has no linear unit).
            units = "degree" if ref.is_geographic else _linear_unit(ref)
            ome = {
                "metre": "meter",
                "meter": "meter",
                "kilometre": "kilometer",
                "kilometer": "kilometer",
                "millimetre": "millimeter",
                "foot": "foot",
            }.get(units)
            # The affine maps pixel corners; coordinates are pixel centres, half a pixel in.
            return cls((f + e / 2, c + a / 2), (e, a), units, ome, ref.to_wkt(), transform)
        if pixel_size_um:
            return cls(origin_um, (pixel_size_um, pixel_size_um), "micrometer", "micrometer")
        return cls((0.0, 0.0), (1.0, 1.0), "pixel", None)

    def coordinates(self, axis: int, n: int, level: int) -> np.ndarray:
        """Centres of the ``n`` pixels of ``level`` along ``axis`` (0: y, 1: x)."""
        return self.origin[axis] + level_coordinates(n, level, self.step[axis])


# Units a local CRS may measure in, by their metres: its WKT's name for one is free text
# ("Meter", "m", even "pixel", which is segpipe's word for no georeference at all).
_UNITS_BY_METRES = {
    1.0: "metre",
    1e3: "kilometre",
    1e-3: "millimetre",
    0.3048: "foot",
    1200 / 3937: "US survey foot",
}


def _linear_unit(ref: Any) -> str:
    """The unit a projected or local (engineering) ``rasterio`` CRS measures in, "unknown"
    where it is none of :data:`_UNITS_BY_METRES`: rasterio's ``linear_units`` is "unknown"
    for a local CRS even where its WKT says ``UNIT["metre",1]``, which would leave a site
    plan's areas without a unit; its name is taken by the unit's length in metres."""
    from rasterio.errors import CRSError

    if ref.linear_units and ref.linear_units not in ("unknown", "pixel"):
        return str(ref.linear_units)
    try:
        name, metres = str(ref.units_factor[0]).lower(), float(ref.units_factor[1])
    except (CRSError, TypeError, ValueError, IndexError):
        return "unknown"
    # A factor of 1 is what a WKT writes of a unit it does not know ("pixel", "unit", "none"):
    # metres only where it says so.
    if metres == 1 and name not in ("metre", "meter", "metres", "meters", "m"):
        return "unknown"
    named = (n for m, n in _UNITS_BY_METRES.items() if abs(metres - m) <= 1e-9 * m)
    return next(named, "unknown")


def _datasets(
    paths: list[str],
    pixel_size: tuple[float, float],
    leading: int,
    origin: tuple[float, float] = (0.0, 0.0),
) -> list[dict[str, Any]]:
    out = []
    for k, path in enumerate(paths):
        step = [p * 2**k for p in pixel_size]
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": [1.0] * leading + step}]
        shift = [o + p * (2**k - 1) / 2 for o, p in zip(origin, pixel_size, strict=True)]
        if any(shift):
            transforms.append({"type": "translation", "translation": [0.0] * leading + shift})
        out.append({"path": path, "coordinateTransformations": transforms})
    return out


def level0_placement(ome: Any) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """``(pixel_size, origin)``, each (y, x), of level 0 of the first ``multiscales`` entry of
    an image's ``ome`` attributes, as :func:`multiscale_attributes` wrote them; None without."""
    try:
        transforms = ome["multiscales"][0]["datasets"][0]["coordinateTransformations"]
        of = {t["type"]: [float(v) for v in t[t["type"]][-2:]] for t in transforms}
        (sy, sx), (oy, ox) = of["scale"], of.get("translation", [0.0, 0.0])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return (sy, sx), (oy, ox)


def _axes(unit: str | None, channel: str | None) -> list[dict[str, Any]]:
    space: dict[str, Any] = {"type": "space"}
    if unit:
        space["unit"] = unit
    axes = [{"name": channel, "type": "channel"}] if channel else []
    return [*axes, {"name": "y", **space}, {"name": "x", **space}]


def multiscale_attributes(
    name: str,
    paths: list[str],
    pixel_size: tuple[float, float],
    unit: str | None,
    *,
    channel: str | None,
    method: str,
    origin: tuple[float, float] = (0.0, 0.0),
) -> dict[str, Any]:
    """One OME-Zarr 0.5 ``multiscales`` entry over ``paths`` (level 0 first).

    ``channel`` names the leading channel axis (``None`` for a (y, x) label image);
    ``pixel_size`` is level 0's (y, x), in ``unit`` (``None``: level-0 pixels, no unit), and
    ``origin`` its first pixel's centre (a translation where it is not 0).
    """
    return {
        "name": name,
        "axes": _axes(unit, channel),
        "datasets": _datasets(paths, pixel_size, 1 if channel else 0, origin),
        "type": method,
        "metadata": {
            "description": f"{method} of 2x2 blocks; an odd last row or column is dropped"
        },
    }


def label_attributes(
    name: str,
    paths: list[str],
    pixel_size: tuple[float, float],
    unit: str | None,
    class_names: Sequence[str],
    origin: tuple[float, float] = (0.0, 0.0),
    method: str = "mode",
) -> dict[str, Any]:
    """The ``ome`` attribute of label image ``labels/<name>`` whose levels lie at ``paths``
    (relative to its group, level 0 first, each the ``method`` of 2x2 blocks of the one
    before); label value ``i`` means ``class_names[i]``."""
    colors = class_colors(len(class_names))
    return {
        "version": OME_VERSION,
        "multiscales": [
            multiscale_attributes(
                name,
                paths,
                pixel_size,
                unit,
                channel=None,
                method=method,
                origin=origin,
            )
        ],
        "image-label": {
            "version": OME_VERSION,
            "colors": [{"label-value": i, "rgba": list(c)} for i, c in enumerate(colors)],
            "properties": [
                {"label-value": i, "class": c, "name": c} for i, c in enumerate(class_names)
            ],
            "source": {"image": "../../"},
        },
    }


def omero_attributes(class_names: tuple[str, ...], *, maximum: float = 1.0) -> dict[str, Any]:
    """The ``omero`` rendering metadata of the probability image: one channel per class.

    napari (through ome-zarr-py) names its layers by ``label`` and tints them by ``color``
    (hex RGB, from :func:`segpipe.palette.class_color`); the window spans the stored values,
    0..``maximum`` (1, or 255 for uint8-packed probabilities). Class 0, background, keeps the
    palette's black, which additive blending draws as nothing.

    >>> omero_attributes(("background", "tissue"))["channels"][1]["color"]
    '1F77B4'
    """
    return {
        "channels": [
            {
                "label": name,
                "color": "{:02X}{:02X}{:02X}".format(*class_color(i)),
                "window": {"start": 0.0, "end": maximum, "min": 0.0, "max": maximum},
                "active": True,
            }
            for i, name in enumerate(class_names)
        ],
        "rdefs": {"model": "color"},
    }


def ngff04_attributes(ome: dict[str, Any]) -> dict[str, Any]:
    """The NGFF 0.4 (Zarr v2 ``.zattrs``) form of an OME-Zarr 0.5 ``ome`` attribute.

    0.4 keeps the metadata at the top level and versions each ``multiscales`` entry and the
    ``image-label`` block instead of the whole.

    >>> ngff04_attributes({"version": "0.5", "multiscales": [{"name": "a"}]})
    {'multiscales': [{'name': 'a', 'version': '0.4'}]}
    """
    out = {k: v for k, v in ome.items() if k != "version"}
    if "multiscales" in out:
        out["multiscales"] = [{**m, "version": "0.4"} for m in out["multiscales"]]
    if "image-label" in out:
        out["image-label"] = {**out["image-label"], "version": "0.4"}
    return out


def set_file_conflicts(
    folder: str, this: str, own: str | None, named: list[tuple[str, str | None]]
) -> list[str]:
    """Where an OME-TIFF set's OME-XML gives a file two UUIDs, or a UUID two files, as phrases.

    ``this``: the name of the file holding the XML, in ``folder``; ``own``: its UUID (the OME
    element's, optional); ``named``: (FileName, UUID text) of the XML's UUID elements. UUIDs
    compare in any case. A name of no file in ``folder`` is left out: a file renamed since
    written names itself by its old name (and a missing file is no conflict).

    >>> set_file_conflicts("/nowhere", "a.ome.tif", "urn:uuid:1", [("a.ome.tif", "urn:uuid:2")])
    ["'a.ome.tif' (this file): urn:uuid:1, urn:uuid:2"]
    """
    here = os.path.realpath(os.path.join(folder, this))
    of_file: dict[str, set[str]] = {}  # a file, as named -> its UUIDs
    of_uuid: dict[str, set[str]] = {}  # a UUID -> its files, as named
    for name, uuid in ([(this, own)] if own is not None else []) + named:
        file, key = os.path.realpath(os.path.join(folder, name)), (uuid or "").strip().lower()
        if file == here or os.path.exists(file):
            shown = f"{name!r} (this file)" if file == here else repr(name)
            of_file.setdefault(shown, set()).add(key)
            of_uuid.setdefault(key, set()).add(shown)
    return [
        f"{k or 'no UUID'}: {', '.join(sorted(v))}"
        for found in (of_file, of_uuid)
        for k, v in found.items()
        if len(v) > 1
    ]
