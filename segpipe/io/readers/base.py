"""The reader protocol and the machinery every format's reader shares.

A reader gives lazy ``(Y, X, C)`` pixels per pyramid level in the file's own dtype; each format
knows its file's axis letters and hands them to :func:`segpipe.geometry.pixels.to_yxc`. Readers
are shipped to Dask worker processes: they pickle as their path and parameters and re-open the
file on first use after unpickling (tifffile and Pillow handles cannot be pickled). Threads
share a reader: its handles are closed under no read (:mod:`segpipe.io.readers.handles`).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import dask.array as da
import numpy as np
from dask.base import tokenize

from segpipe.geometry.pixels import to_yxc, unit_scale, yxc_shape
from segpipe.geometry.tiling import Box, mirror_indices
from segpipe.io.files import URLPath, file_state
from segpipe.io.readers.handles import SharedHandles
from segpipe.io.readers.masks import pixel_valid_mask

__all__ = [
    "DECODE_ERRORS",
    "MAX_IMAGE_PIXELS",
    "BaseReader",
    "Georeference",
    "ImageReadError",
    "Reader",
    "RegionLevel",
    "read_mirrored",
]


# Far beyond any scanner or orthomosaic (a 200k x 200k slide is 4e10): a larger declared size
# is a lying header, and building its tile grid alone would exhaust memory.
MAX_IMAGE_PIXELS = 10**12 // 4

# What decoding a damaged file, or parsing lying metadata, raises varies by codec and library (zlib,
# JPEG, tifffile, zarr, struct: a header cut short); readers turn each into an ImageReadError.
DECODE_ERRORS = (OSError, ValueError, RuntimeError, KeyError, EOFError, IndexError, TypeError,
                 AttributeError, ZeroDivisionError, OverflowError, struct.error)  # fmt: skip


class ImageReadError(ValueError):
    """An image could not be opened or read; the message names the file and the problem."""


@dataclass(frozen=True)
class Georeference:
    """Where level-0 pixels lie in a coordinate reference system (a GeoTIFF, south-up too).

    ``transform`` is the affine ``(a, b, c, d, e, f)`` (rasterio/affine order) from pixel
    corner ``(col, row)`` to ``x = a * col + c``, ``y = e * row + f`` (``b = d = 0``; ``e``
    is negative for north-up images); ``crs`` an authority code such as ``"EPSG:32633"`` when
    one names the CRS exactly, else its WKT (a custom projection, a local engineering CRS).
    Either form goes to ``rasterio.crs.CRS.from_user_input`` / ``pyproj.CRS`` as it is.
    """

    crs: str
    transform: tuple[float, float, float, float, float, float]

    @property
    def crs_wkt(self) -> str:
        """The CRS as WKT (what CF's ``crs_wkt`` and rioxarray's ``spatial_ref`` hold)."""
        from rasterio.crs import CRS

        return str(CRS.from_user_input(self.crs).to_wkt())

    @property
    def crs_name(self) -> str:
        """A short name: the authority code, else the WKT's name, else its projection method
        (``"custom Transverse Mercator"`` for a proj string that named nothing)."""
        if "[" not in self.crs:  # "EPSG:32633", not WKT
            return self.crs
        from rasterio.crs import CRS

        info = CRS.from_user_input(self.crs).to_dict(projjson=True)
        name = info.get("name")
        if name and name != "unknown":
            return str(name)
        method = info.get("conversion", {}).get("method", {}).get("name")
        return f"custom {method or info.get('type', 'CRS')}"


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


class RegionLevel:
    """One level of a library that reads regions (OpenSlide, wsidicom) as something
    ``BaseReader`` slices ``[y0:y1, x0:x1, c]``: ``region(y0, y1, x0, x1)`` gives
    ``(y1 - y0, x1 - x0, C)`` pixels of a non-empty window inside the level (checked: a
    short answer is refused); an empty window is answered here.
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        dtype: np.dtype[Any],
        region: Callable[[int, int, int, int], np.ndarray],
    ) -> None:
        self.shape, self.dtype, self.region = shape, dtype, region

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        ny, nx, nc = self.shape
        ys, xs, cs = (*key, slice(None))[:3]
        (y0, y1, _), (x0, x1, _) = ys.indices(ny), xs.indices(nx)
        if y1 <= y0 or x1 <= x0:
            return np.zeros((max(y1 - y0, 0), max(x1 - x0, 0), nc), self.dtype)[..., cs]
        pixels = self.region(y0, y1, x0, x1)
        if pixels.shape[:2] != (y1 - y0, x1 - x0):  # the tile cache would keep garbage
            raise ValueError(f"its region y {y0}:{y1}, x {x0}:{x1} came back {pixels.shape}")
        return pixels[..., cs]


class _LevelSource:
    """Array-like over one level of a reader in the file's axes, for ``da.from_array``.

    Pickles as its reader (path and parameters), so dask graphs can travel to workers.
    """

    def __init__(self, reader: BaseReader, level: int) -> None:
        self.reader, self.level, self.dtype = reader, level, reader.dtype
        self.shape = reader._native_shapes[level]
        self.ndim = len(self.shape)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        return self.reader._read_native(self.level, key)

    def __dask_tokenize__(self) -> object:
        return (type(self).__name__, self.reader._token(), self.level)


class BaseReader(SharedHandles):
    """Shared machinery: level/window checks, dask wrapping, handles shared by threads
    and left out when pickled (:class:`~segpipe.io.readers.handles.SharedHandles`).

    A subclass sets ``path``, ``pixel_size_um``, ``dtype``, ``_axes`` (letters per level),
    ``_native_shapes`` and ``_native_chunks`` in ``__init__`` and implements
    ``_open_level(level)`` returning something sliceable (a zarr array, a numpy array);
    a read through a handle outside ``_read_native`` is made inside ``_reading``.
    """

    path: str
    pixel_size_um: float | None
    dtype: np.dtype[Any]
    level_shapes: tuple[tuple[int, int, int], ...]
    georeference: Georeference | None = None  # GeoTIFFs only
    origin_um: tuple[float, float] = (0.0, 0.0)  # (y, x) µm, level 0's first pixel centre
    # What the file says beyond pixels, where it does (None otherwise): the scanner vendor
    # ("hamamatsu", ...), the objective's magnification, a name per channel, the nodata value
    # of each band, and where invalid pixels are marked ("nodata", "mask", "alpha"; valid_mask).
    vendor: str | None = None
    magnification: float | None = None
    channel_names: tuple[str, ...] | None = None
    nodata: tuple[float | None, ...] | None = None
    mask_kind: str | None = None
    _axes: tuple[str, ...]
    _native_shapes: tuple[tuple[int, ...], ...]
    _native_chunks: tuple[tuple[int, ...], ...]

    def __init__(self, path: Path | URLPath, pixel_size_um: float | None) -> None:
        super().__init__()
        self.path = str(path)
        # An fsspec URL (with its storage options) is read by byte ranges, never downloaded.
        self.url = path if isinstance(path, URLPath) else None
        self.pixel_size_um = pixel_size_um
        self._levels: dict[int, Any] = {}
        self._opened = None if self.url else file_state(self.path)  # checked at each open

    # -- subclass hooks -------------------------------------------------------------------
    def _open_level(self, level: int) -> Any:
        raise NotImplementedError

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
        if not native_shapes or 0 in native_shapes[0]:
            shape = native_shapes[0] if native_shapes else ()
            raise ImageReadError(f"{self.path}: the image is empty (shape {shape})")
        try:
            shapes = tuple(yxc_shape(s, a) for s, a in zip(native_shapes, axes, strict=True))
        except ValueError as exc:
            raise ImageReadError(f"{self.path}: {exc}") from exc
        for k, (above, shape) in enumerate(pairwise(shapes), 1):  # a larger level: a lie
            if 0 in shape or shape[0] > above[0] or shape[1] > above[1] or shape[2] != above[2]:
                what = "is empty" if 0 in shape else f"is not a reduction of level {k - 1} {above}"
                raise ImageReadError(
                    f"{self.path}: pyramid level {k} {shape} (y, x, c) {what}; the file is damaged"
                )
            (ny, nx, _), (ly, lx, _) = shapes[0], shape
            # Reduced alike on both axes, to a pixel of rounding (checked on the shorter side
            # reduced by the longer's factor): a level's pixel size is one number.
            if abs(nx * ly / ny - lx) > 1 and abs(ny * lx / nx - ly) > 1:
                raise ImageReadError(
                    f"{self.path}: pyramid level {k} {shape} (y, x, c) is reduced by "
                    f"{ny / ly:.4g} in y and {nx / lx:.4g} in x from level 0 {shapes[0]}: "
                    "segpipe reads levels reduced alike on both axes; the file is damaged or "
                    "its pyramid needs rebuilding"
                )
        ny, nx, _ = shapes[0]
        if ny * nx > MAX_IMAGE_PIXELS:
            raise ImageReadError(
                f"{self.path}: declares {ny} x {nx} pixels, more than segpipe.io.readers."
                f"MAX_IMAGE_PIXELS ({MAX_IMAGE_PIXELS:,}); if the file really holds that much, "
                "raise the limit"
            )
        # numpy's own name of the type: C's "long long" ("q", as tifffile gives 64-bit
        # integers) is int64 to numpy but has no Zarr data type.
        self.dtype = np.dtype(np.dtype(dtype).str)
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
        """Pixels ``[y0:y1, x0:x1]`` of ``level`` as a ``(y1 - y0, x1 - x0, C)`` array; only
        the tiles or chunks that intersect the window are read and decoded."""
        self._check_window(y0, y1, x0, x1, level)
        axes = self._axes[level]
        key = tuple(
            slice(y0, y1) if a == "Y" else slice(x0, x1) if a == "X" else slice(None)
            for a in axes.upper()
        )
        pixels = self._read_native(level, key)
        try:
            return to_yxc(pixels, axes)
        except ValueError as exc:  # a reader whose pixels are not laid out as it declared
            raise ImageReadError(f"{self.path}: level {level} reads wrongly: {exc}") from exc

    def chunk_shape(self, level: int = 0) -> tuple[int, int]:
        """``(Y, X)`` pixels of the file's tiles (chunks, strips) at ``level``: what one
        decode gives; a read decodes every tile it touches whole."""
        self._check_level(level)
        cy, cx, _ = yxc_shape(self._native_chunks[level], self._axes[level])
        return cy, cx

    def valid_mask(self, y0: int, y1: int, x0: int, x1: int, level: int = 0) -> np.ndarray | None:
        """``(y1 - y0, x1 - x0)`` bool, True where ``[y0:y1, x0:x1]`` of ``level`` holds data
        (not nodata, not masked, not transparent); None when the file marks no pixel invalid
        (``mask_kind`` is None).

        Here from the pixels (:func:`~segpipe.io.readers.masks.pixel_valid_mask`); a format
        with mask bands of its own (GeoTIFF, through GDAL) overrides this."""
        self._check_level(level)
        if self.mask_kind not in ("nodata", "alpha"):
            return None
        pixels = self.read(y0, y1, x0, x1, level)
        return pixel_valid_mask(pixels, self.nodata, self.mask_kind, self.channel_names)

    def _close_locked(self) -> None:
        self._levels = {}  # views over the handles closed
        super()._close_locked()

    def _file(self) -> Any:
        """What a format library opens: the local path, or for a URL a seekable file that
        fetches byte ranges as they are read (:meth:`URLPath.open_read`), closed by
        :meth:`close`."""
        if self.url is None:
            # A worker's copy (pickled) opens by path: a scan saved over it since was read.
            if file_state(self.path) != self._opened:
                raise ImageReadError(f"{self.path} changed since it was opened; run again")
            return self.path
        f = self.url.open_read()
        self._files.append(f)
        return f

    def _file_size(self) -> int:
        if self.url is None:
            return os.path.getsize(self.path)
        fs, path = self.url.filesystem()
        return int(fs.size(path))

    # -- internals --------------------------------------------------------------------------
    def _check_level(self, level: int) -> None:
        if not (isinstance(level, int | np.integer) and 0 <= level < len(self.level_shapes)):
            raise ImageReadError(
                f"{self.path}: level {level!r} out of range; the file has "
                f"{len(self.level_shapes)} level(s), 0 to {len(self.level_shapes) - 1}"
            )

    def _check_window(self, y0: int, y1: int, x0: int, x1: int, level: int) -> None:
        self._check_level(level)
        ny, nx, _ = self.level_shapes[level]
        if not (0 <= y0 < y1 <= ny and 0 <= x0 < x1 <= nx):
            raise ImageReadError(
                f"{self.path}: window y {y0}:{y1}, x {x0}:{x1} is empty or outside level "
                f"{level} of shape (Y, X) = ({ny}, {nx})"
            )

    def _level_array(self, level: int) -> Any:
        """The level opened, if not yet; the caller holds the lock."""
        if level not in self._levels:
            self._levels[level] = self._open_level(level)
        return self._levels[level]

    def _read_native(self, level: int, key: tuple[slice, ...]) -> np.ndarray:
        try:
            with self._reading(lambda: self._level_array(level)) as array:
                # a view in the dtype said (tifffile's 64-bit "q" is a type zarr refuses)
                return np.asarray(array[key]).view(self.dtype)
        except ImageReadError:
            raise
        except (MemoryError, *DECODE_ERRORS) as exc:  # MemoryError: a chunk claiming 2**50 B
            where = ", ".join(
                f"{a.lower()} {k.start or 0}:{k.stop if k.stop is not None else n}"
                for a, k, n in zip(self._axes[level], key, self._native_shapes[level], strict=False)
            )
            raise ImageReadError(
                f"{self.path}: cannot read level {level} at {where}: the file may be corrupt "
                f"or truncated, or the window too large ({type(exc).__name__}: {exc})"
            ) from exc

    def _token(self) -> tuple[Any, ...]:
        try:
            stat = os.stat(self.path)
            stamp: tuple[Any, ...] = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            stamp = ()
        return (type(self).__name__, self.path, *stamp)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_levels": {}}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.path!r}, shape={self.shape}, dtype={self.dtype}, "
            f"levels={len(self.level_shapes)}, pixel_size_um={self.pixel_size_um})"
        )


def read_mirrored(reader: Reader, box: Box, level: int = 0) -> np.ndarray:
    """Pixels (y, x, C) of ``box`` of ``level``, mirrored where it leaves the image.

    Reads only the bounding box of the source pixels the mirror maps to; a box inside the
    image (most of them) is that read as it is, with no gather copy, so it may be a view of
    the reader's own data (an :class:`ArrayReader`'s array): copy it before writing to it.
    """
    ny, nx, _ = reader.level_shapes[level]
    iy = mirror_indices(box.y0, box.y1, ny)
    ix = mirror_indices(box.x0, box.x1, nx)
    y0, y1, x0, x1 = int(iy.min()), int(iy.max()) + 1, int(ix.min()), int(ix.max()) + 1
    src = reader.read(y0, y1, x0, x1, level=level)
    # Source rows spanning exactly the box's own: the box is inside the image on that axis.
    inside_y, inside_x = (y0, y1) == (box.y0, box.y1), (x0, x1) == (box.x0, box.x1)
    if inside_y and inside_x:
        return src
    if inside_y:
        return src[:, ix - x0]
    if inside_x:
        return src[iy - y0]
    return src[np.ix_(iy - y0, ix - x0)]
