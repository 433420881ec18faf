"""Class polygons of a result as GeoJSON (QuPath, QGIS and shapely read it).

Each object of a class (:func:`segpipe.query.object_labels`: connected components, merged
across chunk borders) becomes one Feature. Polygons are traced per chunk along pixel edges
(``rasterio.features.shapes``) and the pieces of an object are unioned (``shapely``), so the
outline is exact and no chunk needs its neighbours' pixels. Tracing and union are in the
level's pixels, where the edges two chunks share have the same (integer) coordinates; the
union is then moved to ``coords`` once. Moved per chunk, a shared edge came out of two float
transforms a last bit apart (a 0.2527 µm pixel), and the union kept the pieces apart.
Pieces are always traced 4-connected: an object joined across corners (``connectivity=2``)
is a union of pieces that touch at points, a valid MultiPolygon, where an 8-connected trace
gives a self-touching ring that GEOS, JTS and QuPath refuse.

Coordinates (``coords``):

- ``"pixel"``: level-0 pixels of the source image, pixel ``(i, j)`` the square
  ``[j, j + 1] x [i, i + 1]`` (QuPath's convention, and what a foreground mask file of
  :func:`segpipe.segment` takes). Polygons of a coarser level are scaled: by ``2**k`` from
  result level ``k`` to the segmented level, then, where a run segmented a source level > 0,
  each axis by that level's downsample (:func:`~segpipe.results.layout.source_downsample`:
  2 for a level 1 of 258 px under 517, as its ``micron`` coordinates step; the size ratio
  for a georeferenced result, as its transform). A result written before results recorded
  the source's size (:attr:`ResultMeta.source_shape`) has its source opened to read it;
- ``"micron"``: the result's ``x``/``y`` coordinates, whose values are pixel centres, so
  pixel ``(i, j)`` spans ``[(j - 0.5) s, (j + 0.5) s]``;
- ``"crs"``: the coordinate reference system of a georeferenced input (GeoTIFF), through
  its pixel-corner affine transform. The FeatureCollection names an ``AUTHORITY:CODE`` CRS
  (a ``crs`` member, which QGIS and GDAL read); a CRS with no code (WKT) is only in
  ``properties.crs_wkt``, which they do not read: they take the coordinates for lon/lat.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import warnings
from pathlib import Path
from typing import Any, cast

import dask
import numpy as np

from segpipe.analysis.objects import object_labels
from segpipe.analysis.regions import Region
from segpipe.atomic import check_overwrite, check_writable
from segpipe.io.files import URLPath, is_url, location, write_text_atomic
from segpipe.io.ome import PixelGrid
from segpipe.io.places import check_replaceable, overlap
from segpipe.io.readers import open_image
from segpipe.palette import class_color
from segpipe.results import ResultMeta, naming_damage, open_result, read_meta
from segpipe.results.layout import source_downsample, source_origin_um
from segpipe.results.lock import result_read

__all__ = ["COORDINATES", "OBJECT_TYPES", "class_features", "export_geojson"]

COORDINATES = ("pixel", "micron", "crs")


OBJECT_TYPES = ("detection", "annotation")
# How an export begins (json.dumps keeps the collection's key order): what overwrite replaces.
_BEGINS = b'{"type": "FeatureCollection"'


def _chunk_shapes(
    labels: np.ndarray, probabilities: np.ndarray, y0: int, x0: int
) -> tuple[list[tuple[int, Any]], np.ndarray, np.ndarray]:
    """(label, polygon) pieces of one chunk of object labels, the labels present and their
    per-class probability sums, ``(n_labels, class)``, from the ``(class, y, x)`` chunk.

    Polygons are in pixel edges of the level, the chunk's first pixel at ``(y0, x0)``:
    integers, so neighbouring chunks' pieces share their edges exactly. Pieces are
    4-connected whatever the objects' connectivity (see the module docstring).
    """
    from affine import Affine
    from rasterio import features
    from shapely.geometry import shape

    present = labels > 0
    if not present.any():
        return [], np.empty(0, np.int64), np.empty((0, probabilities.shape[0]))
    # rasterio traces int32: renumber the chunk's labels locally and map them back.
    values, local = np.unique(labels, return_inverse=True)
    pieces = features.shapes(
        local.reshape(labels.shape).astype(np.int32),
        mask=present,
        connectivity=4,
        transform=Affine.translation(x0, y0),
    )
    polygons = [(int(values[int(v)]), shape(g)) for g, v in pieces]
    sums = np.stack(
        [
            np.bincount(local.ravel(), weights=p.ravel().astype(np.float64), minlength=len(values))
            for p in probabilities
        ],
        axis=1,
    )
    return polygons, values[1:] if values[0] == 0 else values, sums[1:] if values[0] == 0 else sums


def _base_transform(coords: str, meta: ResultMeta, result: Any) -> Any:
    """Affine from the segmented level's pixel-edge coordinates to ``coords``."""
    from affine import Affine

    if coords == "pixel":
        return Affine.scale(*_level0_per_pixel(meta, result))
    if coords == "micron":
        s = meta.pixel_size_um
        if not s:
            raise ValueError(
                f"{result} has no pixel size, so no micron coordinates; use coords='pixel'"
                + (" or 'crs'" if meta.crs else "")
            )
        oy, ox = source_origin_um(meta)  # the first pixel's centre, as the result's x and y
        return Affine(s, 0, ox - s / 2, 0, s, oy - s / 2)
    transform = meta.transform
    if not transform:
        raise ValueError(f"{result} is not georeferenced; use coords='micron' or 'pixel'")
    return Affine(*transform[:6])


def _level0_per_pixel(meta: ResultMeta, result: Any) -> tuple[float, float]:
    """(x, y) pixels of the source's level 0 per pixel of the segmented level."""
    level = meta.config.level or 0
    level0 = meta.source_shape or (_source_level0(meta, result) if level else meta.shape)
    dy, dx = source_downsample(meta, level0)
    return dx, dy


def _source_level0(meta: ResultMeta, result: Any) -> tuple[int, int]:
    """(y, x) pixels of level 0 of the image a result not recording them was made from."""
    level = meta.config.level or 0
    # A source at a URL of the result's file system takes the result's options (credentials,
    # endpoint): the caller gave no others.
    options = getattr(result, "storage_options", None)
    same_fs = is_url(meta.source) and str(result).split("://")[0] == meta.source.split("://")[0]
    try:
        reader = open_image(meta.source, storage_options=options if same_fs else None)
    except (OSError, ValueError) as e:  # ImageReadError is a ValueError
        raise ValueError(
            f"{result} holds level {level} of {meta.source} but not that image's level-0 size "
            f"(it predates results recording it), which coords='pixel' needs, and the image "
            f"cannot be opened ({e}). Use coords='micron', or delete the result "
            "(segpipe.results.delete_result) and segment the image again to record its size"
        ) from e
    try:
        shapes = [tuple(int(n) for n in s[:2]) for s in reader.level_shapes]
    finally:
        cast(Any, reader).close()  # BaseReader's; not in the protocol
    if level >= len(shapes) or shapes[level] != meta.shape:
        raise ValueError(
            f"{result} holds level {level} of {meta.source}, {meta.shape} px (y, x), but that "
            f"image's levels are now {shapes}: it is not the image segmented. Use "
            "coords='micron', or delete the result (segpipe.results.delete_result) and segment "
            "the image again"
        )
    return shapes[0][0], shapes[0][1]


def _area_units(meta: ResultMeta) -> str:
    """What the ``area`` measurement counts: the result's coordinate units, squared."""
    return f"{PixelGrid.of(meta.pixel_size_um, meta.crs, meta.transform).units}²"


def class_features(
    result: str | os.PathLike,
    class_name: str,
    *,
    level: int = 0,
    region: Region | None = None,
    coords: str = "pixel",
    threshold: float | None = None,
    connectivity: int = 1,
    min_area: float = 0.0,
    object_type: str = "detection",
) -> list[dict[str, Any]]:
    """GeoJSON Features, one per object of ``class_name`` (see the module docstring).

    ``min_area`` drops objects smaller than that many square coordinate units (µm², or
    pixels without a pixel size). Properties as QuPath reads them: ``objectType``
    (``"detection"``: many small objects such as nuclei; ``"annotation"``: a few large
    regions such as tissue), ``name``, ``classification`` (name and palette colour) and
    ``measurements``: ``label``, ``area`` (µm², CRS units² or px: the result's units),
    ``area_px`` (pixels of result level ``level``, so of the segmented level at ``level=0``:
    not of the source's level 0, in which ``coords="pixel"`` polygons are), ``mean_probability``
    (of ``class_name`` over the object's pixels) and ``mean_probability <class>`` for every
    class.
    """
    import shapely
    from affine import Affine
    from shapely import affinity
    from shapely.geometry import mapping

    if coords not in COORDINATES:
        raise ValueError(f"coords must be one of {COORDINATES}, got {coords!r}")
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"object_type must be one of {OBJECT_TYPES}, got {object_type!r}")
    # NaN kept no object: an empty file that read as "no objects found"
    real = isinstance(min_area, numbers.Real) and not isinstance(min_area, bool)
    if not (real and math.isfinite(min_area) and min_area >= 0):
        raise ValueError(f"min_area (--min-area) must be a finite number >= 0, got {min_area!r}")
    ds = open_result(result, level)
    meta = read_meta(result)
    # The level's pixel edges to coords (the level's pixels are 2**level segmented ones):
    # "no pixel size" refused before a pass over the mask, not after.
    to = _base_transform(coords, meta, result) @ Affine.scale(2**level)
    with naming_damage(result):  # a chunk that cannot be read, named by its result
        labels, table = object_labels(
            ds, class_name, region=region, threshold=threshold, connectivity=connectivity
        )
    keep = table[table["area"] >= min_area]
    if keep.empty:
        return []
    # First pixel of the (region) labels in the level: the chunks' pixel offsets.
    y_first = int(ds.indexes["y"].get_loc(labels["y"].values[0]))
    x_first = int(ds.indexes["x"].get_loc(labels["x"].values[0]))
    chunks_y, chunks_x = labels.data.chunks
    starts_y = y_first + np.cumsum([0, *chunks_y])
    starts_x = x_first + np.cumsum([0, *chunks_x])
    blocks = labels.data.to_delayed()
    # The probabilities under the labels, chunked alike and whole along classes, so each
    # chunk's per-class sums come with its polygons in one pass.
    probs = (
        ds["probabilities"]
        .isel(
            y=slice(y_first, y_first + labels.shape[0]), x=slice(x_first, x_first + labels.shape[1])
        )
        .data.rechunk((-1, chunks_y, chunks_x))
        .to_delayed()
    )
    jobs = [
        dask.delayed(_chunk_shapes)(
            blocks[i, j], probs[0, i, j], int(starts_y[i]), int(starts_x[j])
        )
        for i in range(blocks.shape[0])
        for j in range(blocks.shape[1])
    ]
    pieces: dict[int, list[Any]] = {}
    names = list(meta.class_names)
    sums = np.zeros((len(table) + 1, len(names)))  # row = label (1..N)
    wanted = set(keep["label"].tolist())
    with warnings.catch_warnings():
        # rasterio's in-memory rasters say "not georeferenced" (sporadically, from threads):
        # they are pixel arrays, the transform is ours. Filtered here, once, in the driver,
        # because warnings filters are process-wide and not thread-safe.
        from rasterio.errors import NotGeoreferencedWarning

        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with naming_damage(result):
            chunks = dask.compute(*jobs)
    for chunk_polygons, chunk_labels, chunk_sums in chunks:
        for label, geom in chunk_polygons:
            if label in wanted:
                pieces.setdefault(label, []).append(geom)
        np.add.at(sums, chunk_labels, chunk_sums)
    rgb = class_color(names.index(class_name))
    features = []
    for row in keep.itertuples(index=False):
        label = int(row.label)
        # Also for pieces of one chunk: those of an object joined only across corners. In
        # pixels, then moved (see the module docstring). The union orients rings its own way,
        # and a transform flipping y (north-up CRS) reverses them: RFC 7946's made again
        # after both (exteriors counter-clockwise).
        pixels = shapely.union_all(pieces[label])
        moved = affinity.affine_transform(pixels, [to.a, to.b, to.d, to.e, to.c, to.f])
        geom = shapely.orient_polygons(moved)
        means = sums[label] / int(row.area_px)
        features.append(
            {
                "type": "Feature",
                "geometry": mapping(geom),
                "properties": {
                    "objectType": object_type,
                    "name": f"{class_name} {label}",
                    "classification": {"name": class_name, "color": list(rgb)},
                    "measurements": {
                        "label": label,
                        "area": float(row.area),
                        "area_px": int(row.area_px),
                        "mean_probability": float(row.mean_probability),
                        **{
                            f"mean_probability {n}": float(m)
                            for n, m in zip(names, means, strict=True)
                        },
                    },
                },
            }
        )
    return features


def export_geojson(
    result: str | os.PathLike,
    output: str | os.PathLike,
    *,
    classes: list[str] | None = None,
    level: int = 0,
    region: Region | None = None,
    coords: str = "pixel",
    threshold: float | None = None,
    connectivity: int = 1,
    min_area: float = 0.0,
    object_type: str = "detection",
    overwrite: bool = False,
) -> Path | URLPath:
    """Write the objects of ``classes`` (default: every class but the first, background) as
    one GeoJSON FeatureCollection at ``output`` (a path, or an fsspec URL: a
    :class:`~segpipe.io.files.URLPath` keeps its ``storage_options``) and return its location.

    An existing ``output`` raises ``FileExistsError`` unless ``overwrite``; the file is
    written whole or not at all (:func:`~segpipe.io.files.write_text_atomic`).

    ``object_type``: ``"detection"`` (QuPath's type for many small objects, e.g. nuclei) or
    ``"annotation"`` (a few large, editable regions, e.g. tissue); see :func:`class_features`.
    """
    check_overwrite(overwrite)
    if isinstance(classes, str):  # else its letters were looked up as class names
        raise TypeError(f"classes must be a list of class names, got {classes!r}: [{classes!r}]")
    open_result(result, level)  # an incomplete result or a missing level fails here, early
    target = location(output)  # a URL's text goes to its store, not a local folder "s3:"
    # Checked before the polygons are traced, which may take long.
    if relation := overlap(target, result):  # its zarr.json, with overwrite: the result gone
        raise ValueError(f"GeoJSON output {target} {relation} the result {result}; choose another")
    if target.is_dir():
        raise IsADirectoryError(f"GeoJSON output {target} is a folder; name a .geojson file")
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"GeoJSON output {target} exists; pass overwrite=True (--overwrite) to replace it"
        )
    if target.exists():
        check_replaceable(target, "GeoJSON", _BEGINS)
    if not isinstance(target, URLPath):
        check_writable(target)  # below a file, a read-only folder: before the objects
    meta = read_meta(result)
    names = list(meta.class_names)
    if classes is not None and not classes:  # not the default: none asked for is no export
        raise ValueError(f"no classes to export from {result}; classes: {', '.join(names)}")
    for name in classes or []:
        if name not in names:
            raise ValueError(f"no class {name!r} in {result}; classes: {', '.join(names)}")
    features: list[dict[str, Any]] = []
    # Held shared, as the NGFF export holds it: replaced meanwhile (segment with overwrite),
    # the classes came from two results, or a read failed with a bare KeyError. A result at
    # a URL has no lock: its stamp says whether that is what happened.
    with result_read(location(result)) as still:
        try:
            # A class given twice (--class a --class a) is exported once, not as duplicates.
            for name in names[1:] if classes is None else dict.fromkeys(classes):
                with naming_damage(result):
                    features += class_features(
                        result,
                        name,
                        level=level,
                        region=region,
                        coords=coords,
                        threshold=threshold,
                        connectivity=connectivity,
                        min_area=min_area,
                        object_type=object_type,
                    )
        finally:
            still()
    collection: dict[str, Any] = {
        "type": "FeatureCollection",
        "features": features,
        "properties": {
            "source": str(result),
            "level": level,
            "coordinates": coords,
            "area_units": _area_units(meta),
        },
    }
    crs = meta.crs
    # Only an "AUTHORITY:CODE" CRS has a URN; a WKT one (no code) is kept in the properties,
    # which GIS software does not read: the user must be told (the docstring, --coords help).
    if coords == "crs" and crs and not re.fullmatch(r"[A-Za-z]\w*:\w+", crs):  # IAU_2015:30110
        collection["properties"]["crs_wkt"] = crs
    elif coords == "crs" and crs:
        # RFC 7946 dropped "crs" (WGS 84 only), but QGIS and GDAL still read this form.
        authority, code = crs.split(":", 1)
        collection["crs"] = {
            "type": "name",
            "properties": {"name": f"urn:ogc:def:crs:{authority}::{code}"},
        }
    return write_text_atomic(target, json.dumps(collection))
