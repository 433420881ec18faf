"""Lazy image readers behind one small protocol, :class:`Reader`.

One reader per container: TIFF (plain, BigTIFF, OME-TIFF, Aperio SVS) through tifffile's Zarr
view, Zarr v3 / OME-Zarr 0.5 through zarr, and small PNG/JPEG through Pillow. Each one knows
its file's axis letters and hands them to :func:`segpipe.pixels.to_yxc`, so every reader gives
``(Y, X, C)`` pixels in the file's own dtype.

Readers are shipped to Dask worker processes: they pickle as their path and parameters and
re-open the file on first use after unpickling (tifffile and Pillow handles cannot be pickled).

>>> reader = open_image("slide.svs")  # doctest: +SKIP
>>> reader.shape, reader.pixel_size_um  # doctest: +SKIP
((300, 517, 3), 0.499)
>>> reader.read(0, 256, 0, 256).shape  # doctest: +SKIP
(256, 256, 3)
"""

from __future__ import annotations

import math
import os
import re
import threading
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

import dask.array as da
import numpy as np
from dask.base import tokenize

from segpipe.pixels import to_yxc, unit_scale, yxc_shape

__all__ = ["Georeference", "ImageReadError", "Reader", "open_image"]

TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".tf8", ".tf2")
PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg")
ZARR_SUFFIXES = (".zarr",)

# Pillow images are decoded whole into memory; anything bigger belongs in a tiled TIFF.
MAX_PILLOW_PIXELS = 20_000 * 20_000

# Length units to micrometres: OME-XML symbols and OME-Zarr (UDUNITS-2) names.
_UM_PER_UNIT = {
    "pm": 1e-6,
    "Å": 1e-4,
    "nm": 1e-3,
    "µm": 1.0,
    "μm": 1.0,  # Greek mu, not the micro sign
    "um": 1.0,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
    "picometer": 1e-6,
    "angstrom": 1e-4,
    "nanometer": 1e-3,
    "micrometer": 1.0,
    "micron": 1.0,
    "millimeter": 1e3,
    "centimeter": 1e4,
    "meter": 1e6,
}

# TIFF ResolutionUnit: 2 inch, 3 centimetre (baseline); 4 mm, 5 µm (DNG, tifffile).
_UM_PER_RESUNIT = {2: 25_400.0, 3: 10_000.0, 4: 1_000.0, 5: 1.0}

# What decoding a damaged file raises varies by codec (zlib, JPEG, tifffile, zarr).
_DECODE_ERRORS = (OSError, ValueError, RuntimeError, KeyError, EOFError, IndexError)


class ImageReadError(ValueError):
    """An image could not be opened or read; the message names the file and the problem."""


@dataclass(frozen=True)
class Georeference:
    """Where level-0 pixels lie in a coordinate reference system (a north-up GeoTIFF).

    ``transform`` is the affine ``(a, b, c, d, e, f)`` (rasterio/affine order) from pixel
    corner ``(col, row)`` to ``x = a * col + c``, ``y = e * row + f`` (``b = d = 0``; ``e``
    is negative for north-up images); ``crs`` an authority code such as ``"EPSG:32633"``.
    """

    crs: str
    transform: tuple[float, float, float, float, float, float]


@runtime_checkable
class Reader(Protocol):
    """What segpipe needs of an image: lazy ``(Y, X, C)`` pixels per pyramid level.

    Attributes
    ----------
    path
        The file or store read.
    pixel_size_um
        Microns per pixel at level 0, None when the file does not say.
    level_shapes
        ``(Y, X, C)`` of each pyramid level, level 0 first.
    dtype
        The pixels' dtype as stored (no rescaling).
    """

    path: str
    pixel_size_um: float | None
    level_shapes: tuple[tuple[int, int, int], ...]
    dtype: np.dtype[Any]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(Y, X, C)`` of level 0."""
        ...

    def level(self, level: int = 0) -> da.Array:
        """Lazy ``(Y, X, C)`` dask array of one level, chunked like the file's tiles."""
        ...

    def read(self, y0: int, y1: int, x0: int, x1: int, level: int = 0) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` of a level as ``(y1 - y0, x1 - x0, C)``, native dtype."""
        ...


def open_image(path: str | os.PathLike[str], *, pixel_size_um: float | None = None) -> Reader:
    """Open an image lazily, choosing the reader from the path.

    Parameters
    ----------
    path
        ``.tif``/``.tiff``/``.ome.tif``/``.btf`` (TIFF, BigTIFF, OME-TIFF), ``.svs`` (Aperio),
        a Zarr v3 store (a directory, usually ``.zarr``: an OME-Zarr 0.5 image or a plain
        array with ``dimension_names``), or a small ``.png``/``.jpg``.
    pixel_size_um
        Microns per pixel at level 0; overrides what the file says (> 0).

    Returns
    -------
    Reader
        Picklable; opens the file again in each process that unpickles it.

    Raises
    ------
    ImageReadError
        Naming the path: missing file, unknown format, corrupt file, a stack (Z or T > 1), an
        unsupported dtype, a Pillow image too large to hold in memory.
    ValueError
        ``pixel_size_um`` not a positive number.
    """
    if pixel_size_um is not None:
        pixel_size_um = _check_pixel_size(pixel_size_um, "pixel_size_um")
    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"{p}: no such file or directory")
    name = p.name.lower()
    if p.is_dir() or name.endswith(ZARR_SUFFIXES):
        return ZarrReader(p, pixel_size_um=pixel_size_um)
    if name.endswith(TIFF_SUFFIXES):
        return TiffReader(p, pixel_size_um=pixel_size_um)
    if name.endswith(PILLOW_SUFFIXES):
        return PillowReader(p, pixel_size_um=pixel_size_um)
    raise ImageReadError(
        f"{p}: unknown image format {p.suffix!r}; segpipe reads "
        f"{', '.join(TIFF_SUFFIXES + PILLOW_SUFFIXES + ZARR_SUFFIXES)} "
        f"(convert others to a tiled pyramidal OME-TIFF, e.g. with bfconvert or vips)"
    )


def _check_pixel_size(value: float, what: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a positive number of microns per pixel, got {value}")
    return value


class _LevelSource:
    """Array-like over one level of a reader in the file's axes, for ``da.from_array``.

    Pickles as its reader (path and parameters), so dask graphs can travel to workers.
    """

    def __init__(self, reader: _BaseReader, level: int) -> None:
        self.reader = reader
        self.level = level
        self.shape = reader._native_shapes[level]
        self.dtype = reader.dtype
        self.ndim = len(self.shape)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        return self.reader._read_native(self.level, key)

    def __dask_tokenize__(self) -> object:
        return (type(self).__name__, self.reader._token(), self.level)


class _BaseReader:
    """Shared machinery: level/window checks, dask wrapping, pickling without handles.

    A subclass sets ``path``, ``pixel_size_um``, ``dtype``, ``_axes`` (letters per level),
    ``_native_shapes`` and ``_native_chunks`` in ``__init__`` and implements
    ``_open_level(level)`` returning something sliceable (a zarr array, a numpy array).
    """

    path: str
    pixel_size_um: float | None
    dtype: np.dtype[Any]
    level_shapes: tuple[tuple[int, int, int], ...]
    georeference: Georeference | None = None  # GeoTIFFs only
    _axes: tuple[str, ...]
    _native_shapes: tuple[tuple[int, ...], ...]
    _native_chunks: tuple[tuple[int, ...], ...]

    def __init__(self, path: Path, pixel_size_um: float | None) -> None:
        self.path = str(path)
        self.pixel_size_um = pixel_size_um
        self._lock = threading.Lock()
        self._levels: dict[int, Any] = {}

    # -- subclass hooks -------------------------------------------------------------------
    def _open_level(self, level: int) -> Any:
        raise NotImplementedError

    def _close_handles(self) -> None:
        """Close file handles held by the subclass (called under the lock)."""

    # -- construction helpers -------------------------------------------------------------
    def _set_layout(
        self,
        axes: list[str],
        native_shapes: list[tuple[int, ...]],
        native_chunks: list[tuple[int, ...]],
        dtype: np.dtype[Any],
    ) -> None:
        try:
            unit_scale(dtype)
        except ValueError as exc:
            raise ImageReadError(f"{self.path}: unsupported pixel type: {exc}") from exc
        try:
            shapes = tuple(yxc_shape(s, a) for s, a in zip(native_shapes, axes, strict=True))
        except ValueError as exc:
            raise ImageReadError(f"{self.path}: {exc}") from exc
        self.dtype = np.dtype(dtype)
        self._axes = tuple(axes)
        self._native_shapes = tuple(tuple(int(n) for n in s) for s in native_shapes)
        self._native_chunks = tuple(tuple(int(n) for n in c) for c in native_chunks)
        self.level_shapes = shapes

    # -- the Reader protocol --------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """``(Y, X, C)`` of level 0."""
        return self.level_shapes[0]

    def level(self, level: int = 0) -> da.Array:
        """Lazy ``(Y, X, C)`` dask array of ``level``; chunks follow the file's tiles/chunks."""
        self._check_level(level)
        source = _LevelSource(self, level)
        native = da.from_array(
            source,
            chunks=self._native_chunks[level],
            name=f"read-{tokenize(source)}",
            lock=False,  # each reader serialises its own file access
            asarray=True,
            meta=np.empty((0,) * source.ndim, dtype=self.dtype),
        )
        return to_yxc(native, self._axes[level])

    def read(self, y0: int, y1: int, x0: int, x1: int, level: int = 0) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` of ``level`` as a ``(y1 - y0, x1 - x0, C)`` array.

        Only the tiles or chunks that intersect the window are read and decoded.
        """
        self._check_level(level)
        ny, nx, _ = self.level_shapes[level]
        if not (0 <= y0 < y1 <= ny and 0 <= x0 < x1 <= nx):
            raise ImageReadError(
                f"{self.path}: window y {y0}:{y1}, x {x0}:{x1} is empty or outside level "
                f"{level} of shape (Y, X) = ({ny}, {nx})"
            )
        axes = self._axes[level]
        key = tuple(
            slice(y0, y1) if a == "Y" else slice(x0, x1) if a == "X" else slice(None)
            for a in axes.upper()
        )
        return to_yxc(self._read_native(level, key), axes)

    def close(self) -> None:
        """Close open file handles; the reader re-opens them on next use."""
        with self._lock:
            self._levels.clear()
            self._close_handles()

    # -- internals --------------------------------------------------------------------------
    def _check_level(self, level: int) -> None:
        if not (isinstance(level, int | np.integer) and 0 <= level < len(self.level_shapes)):
            raise ImageReadError(
                f"{self.path}: level {level!r} out of range; the file has "
                f"{len(self.level_shapes)} level(s), 0 to {len(self.level_shapes) - 1}"
            )

    def _level_array(self, level: int) -> Any:
        with self._lock:
            if level not in self._levels:
                self._levels[level] = self._open_level(level)
            return self._levels[level]

    def _read_native(self, level: int, key: tuple[slice, ...]) -> np.ndarray:
        try:
            return np.asarray(self._level_array(level)[key])
        except ImageReadError:
            raise
        except _DECODE_ERRORS as exc:
            where = ", ".join(
                f"{a.lower()} {k.start or 0}:{k.stop if k.stop is not None else n}"
                for a, k, n in zip(self._axes[level], key, self._native_shapes[level], strict=False)
            )
            raise ImageReadError(
                f"{self.path}: cannot read level {level} at {where}: the file may be corrupt "
                f"or truncated ({type(exc).__name__}: {exc})"
            ) from exc

    def _token(self) -> tuple[Any, ...]:
        try:
            stat = os.stat(self.path)
            stamp: tuple[Any, ...] = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            stamp = ()
        return (type(self).__name__, self.path, *stamp)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock")
        state["_levels"] = {}
        state.update(self._handle_state())
        return state

    def _handle_state(self) -> dict[str, Any]:
        """Attributes to replace when pickling (the subclass's handles, set to None)."""
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.path!r}, shape={self.shape}, dtype={self.dtype}, "
            f"levels={len(self.level_shapes)}, pixel_size_um={self.pixel_size_um})"
        )


# ------------------------------------------------------------------------------------------
# TIFF
# ------------------------------------------------------------------------------------------


class TiffReader(_BaseReader):
    """TIFF, BigTIFF, OME-TIFF and Aperio SVS through tifffile's Zarr view.

    The main pyramid is the series with the most level-0 pixels (in an SVS, the baseline,
    not the thumbnail, label or macro images). Tiles are decoded on demand; a level is never
    read whole.
    """

    def __init__(self, path: Path, *, pixel_size_um: float | None = None) -> None:
        super().__init__(path, pixel_size_um)
        self._tif: Any = None
        import tifffile

        try:
            self._tif = tifffile.TiffFile(self.path)
            tif = self._tif
            if not tif.series:
                raise ImageReadError(f"{self.path}: the TIFF holds no image")
            self._series = max(range(len(tif.series)), key=lambda i: math.prod(tif.series[i].shape))
            series = tif.series[self._series]
            levels = series.levels
            axes = [lv.axes for lv in levels]
            shapes = [tuple(lv.shape) for lv in levels]
            # opening each level's Zarr view reads metadata only; its chunks are the tiles
            self._native_shapes = tuple(shapes)
            chunks = [tuple(self._level_array(i).chunks) for i in range(len(levels))]
            dtype = np.dtype(series.dtype)
            file_px = _tiff_pixel_size_um(tif, self._series, self.path)
            self.georeference = _geotiff_georeference(series.pages[0], self.path)
            self._set_layout(axes, shapes, chunks, dtype)
        except ImageReadError:
            self.close()
            raise
        except (tifffile.TiffFileError, *_DECODE_ERRORS) as exc:
            self.close()
            raise ImageReadError(
                f"{self.path}: not a readable TIFF (corrupt, truncated or another format): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if self.pixel_size_um is None:
            self.pixel_size_um = file_px

    def _open_level(self, level: int) -> Any:
        import tifffile
        import zarr

        if self._tif is None:
            self._tif = tifffile.TiffFile(self.path)
        store = self._tif.series[self._series].aszarr(level=level)
        array = cast("zarr.Array", zarr.open(store, mode="r"))
        if tuple(array.shape) != self._native_shapes[level]:
            raise ImageReadError(
                f"{self.path}: level {level} reads as shape {array.shape}, expected "
                f"{self._native_shapes[level]}"
            )
        return array

    def _close_handles(self) -> None:
        if self._tif is not None:
            self._tif.close()
            self._tif = None

    def _handle_state(self) -> dict[str, Any]:
        return {"_tif": None}


# GeoKeys: GTRasterTypeGeoKey 2 = RasterPixelIsPoint (tiepoints name pixel centres).
_PIXEL_IS_POINT = 2


def _geotiff_georeference(page: Any, path: str) -> Georeference | None:
    """The CRS and pixel-to-CRS transform of a north-up GeoTIFF page; None without GeoTIFF
    tags. Rotated or sheared rasters (a ModelTransformation tag) are refused."""
    tags = page.geotiff_tags if getattr(page, "is_geotiff", False) else None
    if not tags:
        return None
    if "ModelTransformation" in tags:
        raise ImageReadError(
            f"{path}: rotated/sheared GeoTIFF (ModelTransformation) is not supported; "
            "warp it north-up first (gdalwarp)"
        )
    scale, tie = tags.get("ModelPixelScale"), tags.get("ModelTiepoint")
    code = tags.get("ProjectedCSTypeGeoKey") or tags.get("GeographicTypeGeoKey")
    if scale is None or tie is None or code is None:
        return None
    sx, sy = float(scale[0]), float(scale[1])
    col, row, x, y = float(tie[0]), float(tie[1]), float(tie[3]), float(tie[4])
    c, f = x - col * sx, y + row * sy
    if int(tags.get("GTRasterTypeGeoKey", 1)) == _PIXEL_IS_POINT:
        c, f = c - sx / 2, f + sy / 2
    return Georeference(f"EPSG:{int(code)}", (sx, 0.0, c, 0.0, -sy, f))


def _tiff_pixel_size_um(tif: Any, series_index: int, path: str) -> float | None:
    """Microns per pixel from Aperio MPP, OME-XML PhysicalSize, or the resolution tags."""
    first = tif.pages.first
    if tif.is_svs:
        match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", first.description or "")
        if match:
            return _positive_or_none(float(match.group(1)), path, "Aperio MPP")
    if tif.is_ome and tif.ome_metadata:
        size = _ome_xml_pixel_size_um(tif.ome_metadata, series_index, path)
        if size is not None:
            return size
    page = tif.series[series_index].keyframe
    unit_tag = page.tags.get("ResolutionUnit")
    x_tag = page.tags.get("XResolution")
    if unit_tag is None or x_tag is None:
        return None
    um_per_unit = _UM_PER_RESUNIT.get(int(unit_tag.value))
    num, den = x_tag.value
    if um_per_unit is None or num <= 0 or den <= 0:
        return None
    return um_per_unit * den / num


def _ome_xml_pixel_size_um(xml: str, image_index: int, path: str) -> float | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        warnings.warn(f"{path}: OME-XML does not parse; pixel size unknown", stacklevel=3)
        return None
    pixels = [el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"]
    if not pixels:
        return None
    attrs = pixels[image_index if image_index < len(pixels) else 0].attrib
    sizes = {}
    for axis in "XY":
        value = attrs.get(f"PhysicalSize{axis}")
        if value is None:
            continue
        unit = attrs.get(f"PhysicalSize{axis}Unit", "µm")  # the OME schema's default
        if unit not in _UM_PER_UNIT:
            warnings.warn(f"{path}: OME PhysicalSize unit {unit!r} is not a length", stacklevel=3)
            return None
        sizes[axis] = float(value) * _UM_PER_UNIT[unit]
    return _pick_x(sizes.get("X"), sizes.get("Y"), path, "OME PhysicalSize")


def _pick_x(x: float | None, y: float | None, path: str, what: str) -> float | None:
    if x is None:
        x = y
    elif y is not None and not math.isclose(x, y, rel_tol=1e-3):
        warnings.warn(f"{path}: {what} differs in X ({x} µm) and Y ({y} µm); using X", stacklevel=4)
    return None if x is None else _positive_or_none(x, path, what)


def _positive_or_none(value: float, path: str, what: str) -> float | None:
    if math.isfinite(value) and value > 0:
        return value
    warnings.warn(f"{path}: ignoring {what} {value}; pixel size unknown", stacklevel=4)
    return None


# ------------------------------------------------------------------------------------------
# Zarr / OME-Zarr
# ------------------------------------------------------------------------------------------


class ZarrReader(_BaseReader):
    """A Zarr v3 store: an OME-Zarr 0.5 multiscale image group, or one array.

    Axis names come from each array's ``dimension_names`` (or the OME ``axes``), e.g.
    ``("c", "y", "x")``; the pixel size from level 0's ``scale`` and the x axis' ``unit``.
    """

    def __init__(self, path: Path, *, pixel_size_um: float | None = None) -> None:
        super().__init__(path, pixel_size_um)
        import zarr

        try:
            node = zarr.open(self.path, mode="r")
        except (FileNotFoundError, *_DECODE_ERRORS) as exc:
            raise ImageReadError(
                f"{self.path}: not a readable Zarr store ({type(exc).__name__}: {exc})"
            ) from exc
        if isinstance(node, zarr.Array):
            self._array_paths: tuple[str, ...] = ("",)
            arrays = [node]
            axes = [self._dimension_letters(node, None)]
            file_px = None
        else:
            arrays, axes, file_px = self._open_multiscale(node)
        chunks = [tuple(a.shards or a.chunks) for a in arrays]
        self._set_layout(axes, [tuple(a.shape) for a in arrays], chunks, np.dtype(arrays[0].dtype))
        if self.pixel_size_um is None:
            self.pixel_size_um = file_px

    def _open_multiscale(self, group: Any) -> tuple[list[Any], list[str], float | None]:
        attrs = dict(group.attrs)
        segpipe = attrs.get("segpipe", {})
        if segpipe.get("kind") == "image" and segpipe.get("complete") is False:
            raise ImageReadError(
                f"{self.path}: this segpipe ingest never finished (attribute "
                f"segpipe.complete is false); run the ingest again with overwrite=True"
            )
        if geo := segpipe.get("georeference"):  # carried over from a GeoTIFF by ingest
            self.georeference = Georeference(str(geo["crs"]), tuple(geo["transform"]))
        ome = attrs.get("ome", attrs)  # 0.5 nests under "ome"; 0.4 put it at the top
        multiscales = ome.get("multiscales")
        if not multiscales:
            raise ImageReadError(
                f"{self.path}: a Zarr group without OME-Zarr 'multiscales' metadata; "
                f"open one of its arrays instead (members: {sorted(group.array_keys())})"
            )
        ms = multiscales[0]
        axis_meta = ms.get("axes", [])
        axis_names = [a["name"] if isinstance(a, dict) else str(a) for a in axis_meta]
        self._array_paths = tuple(d["path"] for d in ms["datasets"])
        arrays = []
        for p in self._array_paths:
            try:
                arrays.append(group[p])
            except KeyError as exc:
                raise ImageReadError(
                    f"{self.path}: multiscales lists dataset {p!r} that the group lacks"
                ) from exc
        axes = [self._dimension_letters(a, axis_names or None) for a in arrays]
        return arrays, axes, self._ome_pixel_size_um(ms, axis_meta, axis_names)

    def _dimension_letters(self, array: Any, fallback: list[str] | None) -> str:
        names = getattr(array.metadata, "dimension_names", None) or fallback
        if not names or any(n is None for n in names):
            raise ImageReadError(
                f"{self.path}: array {array.path or '/'!r} of shape {array.shape} has no "
                f"dimension_names; write it with dimension_names such as ('y', 'x', 'c')"
            )
        if any(len(n) != 1 for n in names):
            raise ImageReadError(
                f"{self.path}: dimension names {tuple(names)} are not single axis letters "
                f"(t, c, z, y, x)"
            )
        return "".join(names).upper()

    def _ome_pixel_size_um(
        self, ms: dict[str, Any], axis_meta: list[Any], axis_names: list[str]
    ) -> float | None:
        if "x" not in axis_names:
            return None
        scales = []
        for transforms in (
            ms["datasets"][0].get("coordinateTransformations", []),
            ms.get("coordinateTransformations", []),
        ):
            scales += [t["scale"] for t in transforms if t.get("type") == "scale"]
        units = {a["name"]: a.get("unit") for a in axis_meta if isinstance(a, dict)}
        per_axis = {}
        for name in ("x", "y"):
            unit = units.get(name)
            if name not in axis_names or unit is None:
                continue
            if unit not in _UM_PER_UNIT:
                warnings.warn(f"{self.path}: axis {name} unit {unit!r} unknown", stacklevel=3)
                continue
            i = axis_names.index(name)
            per_axis[name] = math.prod(float(s[i]) for s in scales) * _UM_PER_UNIT[unit]
        return _pick_x(per_axis.get("x"), per_axis.get("y"), self.path, "OME-Zarr scale")

    def _open_level(self, level: int) -> Any:
        import zarr

        node = zarr.open(self.path, mode="r")
        path = self._array_paths[level]
        return cast("zarr.Group", node)[path] if path else node


# ------------------------------------------------------------------------------------------
# PNG / JPEG
# ------------------------------------------------------------------------------------------


class PillowReader(_BaseReader):
    """A small PNG or JPEG, decoded whole into memory by Pillow (one level).

    Palette, CMYK and YCbCr images are converted to RGB(A); grey stays one channel.
    """

    def __init__(self, path: Path, *, pixel_size_um: float | None = None) -> None:
        super().__init__(path, pixel_size_um)
        data = self._decode()
        axes = "YX" if data.ndim == 2 else "YXC"
        self._data: np.ndarray | None = data
        chunk = tuple(min(n, 1024) for n in data.shape[:2]) + data.shape[2:]
        self._set_layout([axes], [data.shape], [chunk], data.dtype)

    def _decode(self) -> np.ndarray:
        from PIL import Image

        too_big = (
            f"{self.path}: too large to hold in memory as PNG/JPEG (limit "
            f"{MAX_PILLOW_PIXELS:,} pixels); convert it to a tiled pyramidal TIFF "
            f"(e.g. vips tiffsave --tile --pyramid) and open that"
        )
        img: Image.Image
        try:
            with Image.open(self.path) as img:
                if img.width * img.height > MAX_PILLOW_PIXELS:
                    raise ImageReadError(f"{too_big} (got {img.width}x{img.height})")
                if img.mode in ("P", "PA"):
                    has_alpha = img.mode == "PA" or "transparency" in img.info
                    img = img.convert("RGBA" if has_alpha else "RGB")
                elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                    img = img.convert("RGB")
                img.load()
                return np.asarray(img)
        except Image.DecompressionBombError as exc:
            raise ImageReadError(f"{too_big} ({exc})") from exc
        except (OSError, ValueError, SyntaxError) as exc:
            if isinstance(exc, ImageReadError):
                raise
            raise ImageReadError(
                f"{self.path}: not a readable PNG/JPEG (corrupt, truncated or another "
                f"format): {type(exc).__name__}: {exc}"
            ) from exc

    def _open_level(self, level: int) -> np.ndarray:
        if self._data is None:
            self._data = self._decode()
        return self._data

    def _close_handles(self) -> None:
        self._data = None

    def _handle_state(self) -> dict[str, Any]:
        return {"_data": None}
