"""A user's foreground mask file read as a boolean mask over an image, and its fingerprint.

The file is an image (any format :func:`~segpipe.io.readers.open_image` reads) of the
image's aspect ratio, stretched over it, or GeoJSON polygons in level-0 pixels; which of its
pixels are foreground is said in :mod:`segpipe.execution.foreground`'s docstring. Images are
read in strips and OR-pooled into the mask's cells (a nearest-neighbour shrink would drop
thin strokes). A mask that marks nothing is refused, as a run of it would compute nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, cast

import numpy as np

from segpipe.geometry.foreground import pool_mask
from segpipe.geometry.pixels import level_downsample
from segpipe.io.files import location
from segpipe.io.polygons import FAR, cells_polygons_meet, clipped
from segpipe.io.readers import Reader, open_image
from segpipe.io.readers.photometric import Photometric, min_is_black

__all__ = ["STRIP_PIXELS", "mask_file_sha256", "read_mask_file", "row_strips"]

# Pixels read at a time where a mask is pooled from a whole level: tens of megabytes.
STRIP_PIXELS = 1 << 24


def mask_file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of the mask file at ``path`` (part of a result's identity: an edited file
    is another result): a file's bytes; a directory's (a Zarr store) files in the order of
    their paths relative to it, each its path, size and bytes, so equal directories hash
    equal wherever they lie.

    Kept per file state (device, inode, size, mtime and ctime in ns, of every file): an
    archive run asks for one mask's hash several times per image, and a whole-slide mask
    may be large. Any write changes a file's ctime, which no one can set back.
    """
    root = Path(location(path))  # a file:// URL is the local file it names
    folder = root.is_dir()
    files = (
        sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file())
        if folder
        else [("", root)]
    )
    stats = [(name, os.stat(file)) for name, file in files]
    key = (
        os.path.realpath(root),
        folder,
        tuple((n, s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for n, s in stats),
    )
    if (known := _HASHES.get(key)) is not None:
        return known
    if not folder:
        with open(root, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    else:
        h = hashlib.sha256()
        for (name, file), (_, stat) in zip(files, stats, strict=True):
            # The size ends each name: no two directories give the same stream of bytes.
            h.update(f"{name}\0{stat.st_size}\0".encode())
            with open(file, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
        digest = h.hexdigest()
    with _HASHES_LOCK:  # runs in threads side by side: two evicting the same key failed
        if len(_HASHES) >= _KEPT_HASHES:
            _HASHES.pop(next(iter(_HASHES)))
        _HASHES[key] = digest
    return digest


# Hashes of mask files by their state (mask_file_sha256), oldest first.
_HASHES: dict[tuple[Any, ...], str] = {}
_HASHES_LOCK = threading.Lock()
_KEPT_HASHES = 64


def row_strips(reader: Reader, level: int) -> list[tuple[int, int]]:
    """Rows ``(y0, y1)`` of ``level``: about :data:`STRIP_PIXELS`, whole rows of chunks."""
    ny, nx = reader.level_shapes[level][:2]
    cy = int(cast(Any, reader).chunk_shape(level)[0])  # BaseReader's; not in the protocol
    rows = cy * max(1, STRIP_PIXELS // (nx * cy))
    return [(y0, min(ny, y0 + rows)) for y0 in range(0, ny, rows)]


def read_mask_file(
    path: str | os.PathLike, reader: Reader, shape: tuple[int, int], level: int = 0
) -> np.ndarray:
    """A user's mask file as a ``shape`` ``(my, mx)`` bool mask over the whole of ``reader``'s
    ``level`` of ``(ny, nx)`` pixels, level pixel ``(y, x)`` in mask pixel ``(y * my // ny,
    x * mx // nx)``: an image, stretched, or GeoJSON polygons in level-0 pixels, mapped by
    the level's downsample (:mod:`segpipe.execution.foreground` says which pixels).

    A georeferenced mask image over a georeferenced image must lie exactly on it (same CRS,
    same extent, to a hundredth of a mask pixel); where only one of the two is georeferenced
    the mask is stretched over the image as any other. ValueError naming the file for a mask
    that marks nothing, holds NaN, or whose GeoJSON says its coordinates are not pixels."""
    path = Path(location(path))
    if path.suffix.lower() in (".geojson", ".json"):
        return _rasterize_geojson(path, reader, level, shape)
    image = open_image(path)
    try:
        return _read_mask_image(image, path, reader, shape, level)
    finally:
        cast(Any, image).close()  # BaseReader's; not in the protocol


def _read_mask_image(
    image: Reader, path: Path, reader: Reader, shape: tuple[int, int], level: int
) -> np.ndarray:
    # Its level 0, never a reduced level some tool made (by nearest neighbour, or a mean that
    # rounds 0/1 to 0: a thin stroke gone), stretched over the level and OR-pooled into the
    # cells through the level's pixels, so no pixel the level shows foreground is lost (a
    # stretch to the cells first, then the cells over the level, rounded twice and dropped
    # a mask pixel's rows here and there).
    (my, mx, channels), (ny, nx) = image.level_shapes[0], reader.level_shapes[0][:2]
    _check_georeference(image, path, reader)
    # Stretched, it must have the image's aspect: either side within 2%, or a pixel (a small
    # mask rounds its sides), of what the other gives.
    if abs(mx - my * nx / ny) > max(1, mx / 50) and abs(my - mx * ny / nx) > max(1, my / 50):
        raise ValueError(
            f"foreground mask {path} is {my} x {mx} pixels (y, x), another aspect ratio than "
            f"the image's {ny} x {nx}: make it the image's shape or a scaled copy of it"
        )
    segmented = (int(reader.level_shapes[level][0]), int(reader.level_shapes[level][1]))
    names = tuple(getattr(image, "channel_names", None) or ())
    alpha = names.index("alpha") if "alpha" in names else channels - 1 if channels in (2, 4) else -1
    inverted = _array_inversion(path, image)
    nonzero = np.zeros((*shape, channels), dtype=bool)  # each channel's, pooled
    alphas: set[float] = set()  # each strip's least and greatest alpha
    for y0, y1 in row_strips(image, 0):
        pixels = image.read(y0, y1, 0, mx, 0)
        if pixels.dtype.kind in "fc" and np.isnan(pixels).any():  # NaN != 0: foreground
            raise ValueError(
                f"foreground mask {path} holds NaN (rows {y0}..{y1}): a mask's pixels are 0 "
                "(background) or another number (foreground); write 0 or 1 where it is NaN"
            )
        if inverted is not None and (n := inverted.inverted):
            stored = min_is_black(pixels[..., :n], inverted.bits_per_sample)
            pixels = np.concatenate([stored, pixels[..., n:]], axis=-1)
        pool_mask(nonzero, pixels != 0, (my, mx), y0, level=segmented)
        if alpha >= 0:
            alphas |= {float(pixels[..., alpha].min()), float(pixels[..., alpha].max())}
    # An alpha of one value (an opaque RGBA export) says nothing: the colours do.
    colour = np.asarray(nonzero[..., [c for c in range(channels) if c != alpha]].any(axis=2))
    mask = nonzero[..., alpha] if len(alphas) > 1 else colour
    if not mask.any():  # a run would compute no tile and call itself complete
        raise ValueError(
            f"foreground mask {path} marks no foreground pixel (every value 0, a "
            "constant alpha aside): nonzero pixels are foreground"
        )
    return mask


def _check_georeference(image: Reader, path: Path, reader: Reader) -> None:
    """Refuse a georeferenced mask ``image`` that does not lie exactly on the georeferenced
    ``reader``: another CRS, or a transform that is not the image's scaled by the size ratio
    (to a hundredth of a mask pixel); stretched, it would mark other ground. Nothing to check
    unless both are georeferenced."""
    mask_geo, image_geo = (
        getattr(image, "georeference", None),
        getattr(reader, "georeference", None),
    )
    if mask_geo is None or image_geo is None:
        return
    from rasterio.crs import CRS

    (my, mx), (ny, nx) = image.level_shapes[0][:2], reader.level_shapes[0][:2]
    a, _, c, _, e, f = image_geo.transform
    ma, _, mc, _, me, mf = mask_geo.transform
    # One CRS may be spelled two ways (an EPSG code, its WKT): rasterio compares what they mean.
    crs = CRS.from_user_input(mask_geo.crs), CRS.from_user_input(image_geo.crs)
    same_crs = mask_geo.crs == image_geo.crs or crs[0] == crs[1]
    # Both corners within a hundredth of a mask pixel: the origin, and the far corner.
    tx, ty = abs(ma) / 100, abs(me) / 100
    placed = abs(mc - c) <= tx and abs(mf - f) <= ty
    if not (same_crs and placed and abs(ma * mx - a * nx) <= tx and abs(me * my - e * ny) <= ty):
        where = getattr(reader, "path", "the image")
        raise ValueError(
            f"foreground mask {path} is georeferenced ({mask_geo.crs_name}, transform "
            f"{tuple(mask_geo.transform)}, {my} x {mx} px) but does not lie on the image "
            f"{where} ({image_geo.crs_name}, transform {tuple(image_geo.transform)}, {ny} x "
            f"{nx} px): warp it onto the image's grid (gdalwarp -te, -ts, -t_srs) or drop its "
            "georeference (gdal_edit.py -unsetgt) to stretch it over the image"
        )


def _array_inversion(path: Path, image: Reader) -> Photometric | None:
    """How ``image`` inverts its min-is-white grey, where the mask is rather what is stored:
    a TIFF that tifffile wrote from an array (its JSON description or Software tag), which
    writes a bool array as 1-bit min-is-white and reads it back as stored, as GDAL does. Any
    other mask is taken as it shows (one drawn white in a viewer). None: nothing to undo."""
    shown = getattr(image, "photometric", None)  # TiffReader's
    inverted = shown(0) if callable(shown) else None
    if inverted is None or not inverted.inverted:
        return None
    import tifffile

    with tifffile.TiffFile(path) as tif:
        first = tif.pages.first
        # Its JSON description, or (an OME-TIFF's, or one written with metadata=None: no
        # description) the Software tag tifffile writes: such a bool mask read inverted.
        by_tifffile = first.is_shaped or str(first.software).startswith("tifffile")
        return inverted if by_tifffile else None


def _rasterize_geojson(
    path: Path, reader: Reader, level: int, shape: tuple[int, int]
) -> np.ndarray:
    import shapely
    from rasterio.features import bounds as polygon_bounds
    from shapely.errors import ShapelyError
    from shapely.geometry import shape as shapely_of

    try:
        data: Any = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"foreground mask {path}: not readable GeoJSON ({e})") from e
    level0, (ny, nx) = reader.level_shapes[0][:2], reader.level_shapes[level][:2]
    # A level's pixel is the whole factor it was made with in level-0 pixels (a level of
    # 258 under 517 is half, not 517 / 258), as results and their polygons place it; a
    # georeferenced one rounded up (GDAL's overview) the size ratio GDAL scales it by.
    geo = getattr(reader, "georeference", None) is not None
    dy, dx = (
        level_downsample(n0, n, overview_ratio=geo) for n0, n in zip(level0, (ny, nx), strict=True)
    )
    # Mask pixel (i, j) is level-0 box [j * sx, (j + 1) * sx) x [i * sy, (i + 1) * sy).
    sx, sy = dx * nx / shape[1], dy * ny / shape[0]
    try:
        _check_pixel_coordinates(data)
        polygons = _geojson_polygons(data)
        spans = np.array([polygon_bounds(p) for p in polygons])  # (x0, y0, x1, y1) each
        _check_not_longitude_latitude(data, spans, reader)
        # Cut to a cell beyond the mask: GDAL's rasteriser dropped a polygon reaching past
        # 2**31 cells (a "whole image" one drawn huge). The cut leaves the cells inside alone.
        rect = (-sx, -sy, sx * (shape[1] + 1), sy * (shape[0] + 1))
        reach = (-FAR * sx, -FAR * sy, FAR * sx, FAR * sy)  # what GDAL burns as it is
        inside = [clipped(p, b, rect, reach) for p, b in zip(polygons, spans, strict=True)]
        inside = [p for p in inside if p is not None]
        burned = cells_polygons_meet(inside, (dy, dx), (ny, nx), shape)
    except (ValueError, TypeError, KeyError, IndexError, ShapelyError) as e:  # structure
        raise ValueError(f"foreground mask {path}: {e}") from e
    if not burned.any():  # a polygon meeting the image marks a cell
        (x0, y0), (x1, y1) = spans[:, :2].min(axis=0), spans[:, 2:].max(axis=0)
        if not any(shapely.make_valid(shapely_of(p)).area for p in polygons):  # lines, points
            raise ValueError(
                f"foreground mask {path}: its polygons (x {x0:g}..{x1:g}, y {y0:g}..{y1:g}) "
                "enclose no area (lines or points); draw areas"
            )
        image = shapely.box(0, 0, level0[1], level0[0])
        if any(shapely.make_valid(shapely_of(p)).intersection(image).area for p in polygons):
            # in it, on no pixel (a part across its edge too: not "overlaps no image")
            odd = f" ({ny} x {nx} px: it leaves out level 0's last odd row or column)"
            raise ValueError(
                f"foreground mask {path}: its polygons (x {x0:g}..{x1:g}, y {y0:g}..{y1:g}) meet "
                f"the image but cover no pixel of level {level}{odd if level else ''} (holes "
                "filling them?); draw them over the pixels to segment"
            )
        raise ValueError(
            f"foreground mask {path}: no polygon overlaps the image (x 0..{level0[1]}, y 0.."
            f"{level0[0]}); they span x {x0:g}..{x1:g}, y {y0:g}..{y1:g}. Coordinates must be "
            "level-0 pixels, x right, y down (QuPath's), not microns or map coordinates (y up)"
        )
    return np.asarray(burned, dtype=bool)


def _check_pixel_coordinates(data: object) -> None:
    """Refuse GeoJSON that says its coordinates are not level-0 pixels: a top-level ``crs``
    (GeoJSON 2008's, which GDAL and segpipe's ``coords="crs"`` export write), or top-level
    ``properties.coordinates`` other than ``"pixel"`` (segpipe's export says which)."""
    if not isinstance(data, dict):
        return
    said = data.get("properties")
    coords = said.get("coordinates", "pixel") if isinstance(said, dict) else "pixel"
    crs = data.get("crs")
    if crs is not None or coords != "pixel":
        found = f"crs {json.dumps(crs)[:80]}" if crs is not None else ""
        found = found or f"properties.coordinates {json.dumps(coords)[:40]}"
        raise ValueError(
            f"it says its coordinates are not pixels ({found}): "
            "a mask's coordinates must be level-0 pixels, x right, y down; export it with "
            "coords='pixel' (--coords pixel)"
        )


def _check_not_longitude_latitude(data: object, spans: np.ndarray, reader: Reader) -> None:
    """Over a georeferenced image, refuse polygons that look like longitude/latitude, unless
    the file says they are pixels: RFC 7946 GeoJSON (geojson.io's, shapely's, QGIS's) has no
    ``crs`` member, and read as pixels it selected a speck near the image's corner without a
    word. They look so when they lie within 10 degrees (and the footprint's size) of the
    image's footprint in degrees and, as pixels, would span under 1% of its shorter side: a
    mask drawn in pixels is rarely both. Map coordinates of a projected CRS lie far from the
    pixels, refused as overlapping nothing."""
    georeference = getattr(reader, "georeference", None)
    said = data.get("properties") if isinstance(data, dict) else None
    if georeference is None or (isinstance(said, dict) and said.get("coordinates") == "pixel"):
        return
    from rasterio.crs import CRS
    from rasterio.transform import Affine, array_bounds
    from rasterio.warp import transform_bounds

    crs = CRS.from_user_input(georeference.crs)
    if not (crs.is_geographic or crs.is_projected):  # a local CRS: no way to degrees
        return
    ny, nx = reader.level_shapes[0][:2]
    x0, y0, x1, y1 = array_bounds(ny, nx, Affine(*georeference.transform))
    w, s, e, n = transform_bounds(crs, "EPSG:4326", x0, y0, x1, y1)
    mx, my = 10 + abs(e - w), 10 + abs(n - s)  # degrees around it: sites of a region
    (px0, py0), (px1, py1) = spans[:, :2].min(axis=0), spans[:, 2:].max(axis=0)
    near = min(w, e) - mx <= px0 and px1 <= max(w, e) + mx
    near = near and min(s, n) - my <= py0 and py1 <= max(s, n) + my
    if near and max(px1 - px0, py1 - py0) < 0.01 * min(ny, nx):
        raise ValueError(
            f"its polygons (x {px0:g}..{px1:g}, y {py0:g}..{py1:g}) look like longitude/"
            f"latitude, near the image's footprint (longitude {w:g}..{e:g}, latitude {s:g}.."
            f"{n:g}), and as pixels would mark a speck: a mask's coordinates must be level-0 "
            "pixels, x right, y down; convert them to pixels, or, if they are pixels, say so "
            '(top-level "properties": {"coordinates": "pixel"}, as segpipe\'s export writes)'
        )


def _geojson_polygons(data: object) -> list[dict[str, Any]]:
    """The Polygon and MultiPolygon geometries of parsed GeoJSON: a FeatureCollection, a
    list of Features or geometries (QuPath's scripted export), a Feature or a geometry, a
    GeometryCollection's members at any depth (a feature's geometry may be null: GeoJSON's
    unlocated feature). ValueError, saying what and where, for another structure or no
    polygon."""
    listed = isinstance(data, list)
    collection = listed or (isinstance(data, dict) and data.get("type") == "FeatureCollection")
    features = data if listed else cast(dict, data).get("features") if collection else [data]
    geometries = []
    for i, f in enumerate(features if isinstance(features, list) else [features]):
        geometry = f.get("geometry", f) if isinstance(f, dict) else f
        if not isinstance(f, dict) or not isinstance(geometry, dict | None):
            raise ValueError(
                f"not GeoJSON ({f'feature {i}' if collection else 'the top level'} is "
                f"{json.dumps(f)[:60]}); expected a FeatureCollection, a Feature or a Polygon"
            )
        geometries += _polygons_in(geometry, f"feature {i}")
    if not geometries:
        raise ValueError("no Polygon or MultiPolygon geometries")
    return geometries


def _polygons_in(geometry: dict[str, Any] | None, where: str) -> list[dict[str, Any]]:
    """The Polygon and MultiPolygon geometries ``geometry`` is or holds (a
    GeometryCollection's, at any depth); none for null, an empty one or another type."""
    if not geometry:
        return []
    if geometry.get("type") == "GeometryCollection":
        members = geometry.get("geometries")
        if not isinstance(members, list) or not all(isinstance(g, dict) for g in members):
            raise ValueError(
                f"{where}'s GeometryCollection holds {json.dumps(members)[:60]}: not a list "
                "of geometries"
            )
        return [p for member in members for p in _polygons_in(member, where)]
    if geometry.get("type") not in ("Polygon", "MultiPolygon") or geometry.get("coordinates") == []:
        return []  # an empty one: RFC 7946's other way of saying a null geometry
    depth = 1 if geometry["type"] == "Polygon" else 2  # lists above a ring
    _check_positions(geometry.get("coordinates"), depth, where)
    return [geometry]


def _check_positions(value: Any, depth: int, where: str) -> None:
    """Refuse coordinates that are not ``depth`` nested lists of rings, lists of positions of
    two or more finite numbers: rasterio's bounds crashed the process (a segfault) on a
    position ``["a", "b"]``."""
    if not isinstance(value, list) or len(value) < (1 if depth else 4):
        what = "not a list" if not isinstance(value, list) else "empty" if depth else "not a ring"
        raise ValueError(f"{where}'s coordinates hold {json.dumps(value)[:60]}: {what}")
    for item in value:
        if depth:
            _check_positions(item, depth - 1, where)
        elif not (
            isinstance(item, list)
            and len(item) >= 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in item)
            and all(-1e300 < v < 1e300 for v in item)  # no NaN, no inf, no 400-digit int
        ):
            raise ValueError(f"{where} has position {json.dumps(item)[:60]}: not finite x, y")
