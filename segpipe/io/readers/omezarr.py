"""Zarr v3 images: OME-Zarr 0.5 multiscales (segpipe's ingest writes them) or a plain array
with ``dimension_names``.

An ingest says which pixels hold data as its source did: per-band nodata, an ``"alpha"``
channel, or a label image of its own (``segpipe.valid_mask``, 1 where valid; a GeoTIFF's mask
band, OpenSlide's alpha), which :meth:`ZarrReader.valid_mask` reads level by level.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, cast

import numpy as np

from segpipe.geometry.pixels import yxc_shape
from segpipe.io.files import URLPath
from segpipe.io.readers.base import DECODE_ERRORS, BaseReader, Georeference, ImageReadError
from segpipe.io.readers.geotiff import checked_transform
from segpipe.io.readers.masks import check_per_channel
from segpipe.io.readers.zarr_store import checked_store
from segpipe.io.units import UM_PER_UNIT, pixel_size_of_xy, positive_or_none

__all__ = ["ZARR_SUFFIXES", "ZarrReader"]

ZARR_SUFFIXES = (".zarr",)


def _finite_or_nan(value: Any) -> float:
    """``value`` of a file's metadata as a float, NaN for text, null or a list."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


class ZarrReader(BaseReader):
    """A Zarr v3 store: an OME-Zarr 0.5 multiscale image group, or one array.

    Axis names come from each array's ``dimension_names`` (or the OME ``axes``), e.g.
    ``("c", "y", "x")``; the pixel size from level 0's ``scale`` and the x axis' ``unit``,
    and ``origin_um`` from its ``translation`` where that size is known.
    """

    _mask_path: str | None = None  # the group of an ingest's valid-pixel label image
    _masks: dict[int, Any]

    def __init__(self, path: Path | URLPath, *, pixel_size_um: float | None = None) -> None:
        super().__init__(path, pixel_size_um)
        import zarr

        try:
            node = zarr.open(checked_store(self.url or self.path), mode="r")
        except (FileNotFoundError, *DECODE_ERRORS) as exc:
            raise ImageReadError(
                f"{self.path}: not a readable Zarr store ({type(exc).__name__}: {exc})"
            ) from exc
        try:
            if isinstance(node, zarr.Array):
                self._array_paths: tuple[str, ...] = ("",)
                arrays = [node]
                axes = [self._dimension_letters(node, None)]
                file_px = None
            else:
                arrays, axes, file_px = self._open_multiscale(node)
            self._check_chunk_shapes(arrays)
            chunks = [tuple(a.shards or a.chunks) for a in arrays]  # Dask's: one task a shard
            self._inner_chunks = tuple(tuple(a.chunks) for a in arrays)  # what a read decodes
            shapes = [tuple(a.shape) for a in arrays]
            dtype = np.dtype(arrays[0].dtype)
        except ImageReadError:
            raise
        except DECODE_ERRORS as exc:
            raise ImageReadError(
                f"{self.path}: Zarr metadata that cannot be read as an image "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        if len({np.dtype(a.dtype) for a in arrays}) > 1:
            raise ImageReadError(
                f"{self.path}: pyramid levels of different dtypes "
                f"({', '.join(str(np.dtype(a.dtype)) for a in arrays)}); a level must hold "
                "the same kind of pixels as level 0"
            )
        self._set_layout(axes, shapes, chunks, dtype)
        # What a worker's copy (pickled), opening the store anew, checks it still finds: a
        # store ingested again under the name was read through this one's layout.
        self._stamps = tuple(self._stamp(node, a) for a in arrays)
        check_per_channel(
            self.path,
            self.level_shapes[0][2],
            [(f"attribute segpipe.{name} holds {{n}} value(s)", getattr(self, name))
             for name in ("nodata", "channel_names")],
            "ingest the source again",
        )  # fmt: skip
        if self._mask_path is not None:
            self._masks = self._mask_levels(node)
        if self.pixel_size_um is None:
            self.pixel_size_um = file_px

    def _check_chunk_shapes(self, arrays: list[Any]) -> None:
        """Refuse a level whose chunks or shards (zarr.json) have a side below 1 pixel: zarr
        opens such an array, and every read of it then divides by the side (a
        ZeroDivisionError from Dask, no store named)."""
        for level, (path, array) in enumerate(zip(self._array_paths, arrays, strict=True)):
            named = (
                [("chunk_grid chunk_shape", array.chunks)]
                if array.shards is None
                else [
                    ("chunk_grid chunk_shape (its shards)", array.shards),
                    ("sharding codec's chunk_shape (its inner chunks)", array.chunks),
                ]
            )
            for kind, shape in named:
                if any(int(n) < 1 for n in shape):
                    raise ImageReadError(
                        f"{self.path}: level {level} (array {path or '/'!r}, shape "
                        f"{tuple(array.shape)}) states a {kind} of {tuple(shape)} in its "
                        "zarr.json, a side that holds no pixels; its metadata is damaged: "
                        "write or ingest the image again"
                    )

    def _mask_levels(self, group: Any) -> dict[int, Any]:
        """Level -> the ``(Y, X)`` array of the ingest's valid-pixel label image, each checked
        against its level at open: a smaller one gave masks that no longer lined up with the
        pixels they mask (a slice past its end comes back short, without an error)."""
        masks = {}
        for level, (shape, path) in enumerate(
            zip(self.level_shapes, self._array_paths, strict=True)
        ):
            where = f"{self._mask_path}/{path}"
            try:
                mask = group[where]
            except (FileNotFoundError, *DECODE_ERRORS) as exc:
                raise ImageReadError(
                    f"{self.path}: cannot open level {level} of its valid-pixel mask, {where!r} "
                    f"({type(exc).__name__}: {exc}); ingest the source again"
                ) from exc
            found = getattr(mask, "shape", None)  # None: a group where the array should be
            if found is None or tuple(found) != shape[:2]:
                raise ImageReadError(
                    f"{self.path}: its valid-pixel mask {where!r} has shape {found}, not level "
                    f"{level}'s ({shape[0]}, {shape[1]}) (y, x); ingest the source again"
                )
            masks[level] = mask
        return masks

    def _open_multiscale(self, group: Any) -> tuple[list[Any], list[str], float | None]:
        attrs = dict(group.attrs)
        segpipe = attrs.get("segpipe", {})
        if isinstance(segpipe.get("identity"), dict):  # its axes (class, y, x) were named
            raise ImageReadError(
                f"{self.path}: a segpipe result (a segmentation), not an image: read it with "
                "segpipe.open_result or `segpipe info`; segment the image it was made from"
            )
        if segpipe.get("kind") == "image" and segpipe.get("complete") is False:
            raise ImageReadError(
                f"{self.path}: this segpipe ingest never finished (attribute "
                f"segpipe.complete is false); run the ingest again (an unfinished one is "
                "replaced)"
            )
        if geo := segpipe.get("georeference"):  # carried over from a GeoTIFF by ingest
            self.georeference = self._checked_georeference(geo)
        # also carried over by ingest: which pixels are invalid (BaseReader.valid_mask)
        if names := segpipe.get("channel_names"):
            self.channel_names = tuple(str(n) for n in names)
        if (nodata := segpipe.get("nodata")) is not None:
            self.nodata = tuple(None if v is None else float(v) for v in nodata)
            self.mask_kind = "nodata"
        elif "alpha" in (self.channel_names or ()) and segpipe.get("mask_kind") != "none":
            self.mask_kind = "alpha"
        if segpipe.get("mask_kind") == "alpha":  # an alpha band beside a nodata value
            self.mask_kind = "alpha"
        if mask := segpipe.get("valid_mask"):
            self._mask_path, self.mask_kind, self._masks = str(mask), "mask", {}
        ome = attrs.get("ome", attrs)  # 0.5 nests under "ome"; 0.4 put it at the top
        multiscales = ome.get("multiscales")
        if not multiscales:
            groups = sorted(group.group_keys())
            if "bioformats2raw.layout" in ome:  # an image a group, often several: not ours to pick
                images = sorted((g for g in groups if g.isdigit()), key=int)  # not "OME"
                raise ImageReadError(
                    f"{self.path}: a bioformats2raw root, whose images are its groups "
                    f"{images}; open one of them, e.g. {self.path}/{images[0] if images else 0}"
                )
            raise ImageReadError(
                f"{self.path}: a Zarr group without OME-Zarr 'multiscales' metadata; open one "
                f"of its arrays or image groups instead (arrays: {sorted(group.array_keys())}, "
                f"groups: {groups})"
            )
        ms = multiscales[0]
        version = str(ome.get("version") or ms.get("version") or "")
        axis_meta = ms.get("axes", [])
        axis_names = [a["name"] if isinstance(a, dict) else str(a) for a in axis_meta]
        self._array_paths = tuple(d["path"] for d in ms["datasets"])
        arrays = []
        for level, p in enumerate(self._array_paths):
            try:
                arrays.append(group[p])
            except KeyError as exc:
                raise ImageReadError(
                    f"{self.path}: multiscales lists dataset {p!r} that the group lacks"
                ) from exc
            except DECODE_ERRORS as exc:  # zarr divides by a sharded one's inner chunk sides
                raise ImageReadError(
                    f"{self.path}: level {level} (array {p!r}) has a zarr.json that cannot be "
                    f"read ({type(exc).__name__}: {exc}); write or ingest the image again"
                ) from exc
        axes = [self._dimension_letters(a, axis_names or None) for a in arrays]
        px = self._ome_pixel_size_um(ms, axis_meta, axis_names, version)
        if px is not None:  # else no unit, or a scale refused: a translation in nothing known
            self.origin_um = self._ome_origin_um(ms, axis_meta, axis_names)
        return arrays, axes, px

    def chunk_shape(self, level: int = 0) -> tuple[int, int]:
        """``(Y, X)`` pixels of ``level``'s chunks: a sharded array's inner ones, which a read
        decodes each whole (a shard is only the unit of storing)."""
        self._check_level(level)
        cy, cx, _ = yxc_shape(self._inner_chunks[level], self._axes[level])
        return cy, cx

    def _dimension_letters(self, array: Any, fallback: list[str] | None) -> str:
        names = getattr(array.metadata, "dimension_names", None) or fallback
        if fallback and names and list(names) != fallback:  # NGFF 0.5: they must be equal
            raise ImageReadError(
                f"{self.path}: array {array.path or '/'!r} names its dimensions "
                f"{tuple(names)} and the multiscales axes {tuple(fallback)}: which is y and "
                "which x cannot be told; write them equal"
            )
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

    def _checked_georeference(self, geo: dict[str, Any]) -> Georeference:
        from rasterio.crs import CRS
        from rasterio.errors import CRSError

        crs = str(geo["crs"])
        try:
            CRS.from_user_input(crs)
        except CRSError as exc:  # else describe and every result fail on it later
            raise ImageReadError(
                f"{self.path}: segpipe.georeference.crs {crs!r} is no CRS ({exc}); "
                "ingest the source again"
            ) from exc
        where = f"{self.path}: segpipe.georeference.transform"
        transform = checked_transform(geo["transform"], where, "ingest the source again")
        return Georeference(crs, transform)

    def _ome_pixel_size_um(
        self, ms: dict[str, Any], axis_meta: list[Any], axis_names: list[str], version: str
    ) -> float | None:
        if "x" not in axis_names:
            return None
        level0 = ms["datasets"][0].get("coordinateTransformations", [])
        scales = [
            t["scale"]
            for t in (*level0, *ms.get("coordinateTransformations", []))
            if t.get("type") == "scale"
        ]
        if version in ("0.4", "0.5") and not any(t.get("type") == "scale" for t in level0):
            self._refuse_unless_given(
                f"{self.path}: OME-Zarr {version} dataset {ms['datasets'][0]['path']!r} has "
                "no 'scale' coordinate transformation, which NGFF requires"
            )
            return None
        if not scales:  # older NGFF: the product of no scales is no pixel size of 1 µm
            return None
        units = {a["name"]: a.get("unit") for a in axis_meta if isinstance(a, dict)}
        per_axis = {}
        for name in ("x", "y"):
            unit = units.get(name)
            if name not in axis_names or unit is None:
                continue
            if unit not in UM_PER_UNIT:
                warnings.warn(f"{self.path}: axis {name} unit {unit!r} unknown", stacklevel=3)
                continue
            i = axis_names.index(name)
            given = [s[i] for s in scales]
            if any(positive_or_none(v) is None for v in given):
                # not "pixel size unknown": a NaN, 0 or -1 is as wrong as text, which is refused
                self._refuse_unless_given(
                    f"{self.path}: OME-Zarr scale of axis {name} is "
                    f"{given[0] if len(given) == 1 else given!r}, not a positive number"
                )
                return None
            per_axis[name] = math.prod(float(v) for v in given) * UM_PER_UNIT[unit]
        return pixel_size_of_xy(per_axis.get("x"), per_axis.get("y"), self.path, "OME-Zarr scale")

    def _ome_origin_um(
        self, ms: dict[str, Any], axis_meta: list[Any], axis_names: list[str]
    ) -> tuple[float, float]:
        """(y, x) µm of level 0's first pixel centre: its dataset's coordinateTransformations,
        then the multiscale's, composed as NGFF applies them (each scale scales the
        translations before it); 0 on an axis without a known unit."""
        units = {a["name"]: a.get("unit") for a in axis_meta if isinstance(a, dict)}
        transforms = [
            *ms["datasets"][0].get("coordinateTransformations", []),
            *ms.get("coordinateTransformations", []),
        ]
        if any(t.get("type") == "translation" and "translation" not in t for t in transforms):
            # NGFF 0.4 lets a binary array at "path" hold it; that is not read: placed at 0
            warnings.warn(f"{self.path}: a translation given by path is not read", stacklevel=4)
        transforms = [t for t in transforms if t.get("type") == "scale" or "translation" in t]
        origin = {"y": 0.0, "x": 0.0}
        for name in origin:
            unit = units.get(name)
            if name not in axis_names or unit not in UM_PER_UNIT:
                continue
            i, shift = axis_names.index(name), 0.0
            for t in transforms:
                if t.get("type") == "scale":
                    shift *= float(t["scale"][i])
                elif t.get("type") == "translation":
                    shift += _finite_or_nan(t["translation"][i])
            if not math.isfinite(shift):  # a result placed at NaN: every coordinate NaN
                given = [t["translation"][i] for t in transforms if t.get("type") == "translation"]
                self._refuse_unless_given(
                    f"{self.path}: OME-Zarr translation of axis {name} is "
                    f"{given[0] if len(given) == 1 else given!r}, not a finite number",
                    " and an origin of 0",
                )
                return (0.0, 0.0)
            origin[name] = shift * UM_PER_UNIT[unit]
        return origin["y"], origin["x"]

    def _refuse_unless_given(self, problem: str, instead: str = "") -> None:
        """Refuse a pixel size (or origin) the file gets wrong, unless the user gave a pixel
        size (as the TIFF reader does): then warn and read the image with theirs (and
        ``instead``, what replaces the origin)."""
        if self.pixel_size_um is None:
            raise ImageReadError(
                f"{problem}; give the pixel size yourself (pixel_size_um, --pixel-size) "
                "to read the image anyway"
            )
        warnings.warn(f"{problem}; using pixel_size_um={self.pixel_size_um}{instead}", stacklevel=5)

    def valid_mask(self, y0: int, y1: int, x0: int, x1: int, level: int = 0) -> np.ndarray | None:
        """``(y1 - y0, x1 - x0)`` bool, True where the window holds data: the ingest's label
        image at ``level`` where it has one, else nodata or alpha from the pixels."""
        if self._mask_path is None:
            return super().valid_mask(y0, y1, x0, x1, level)
        self._check_window(y0, y1, x0, x1, level)
        import zarr

        path = f"{self._mask_path}/{self._array_paths[level]}"
        try:
            with self._lock:  # taken here: a close() in another thread empties the dict
                if level not in self._masks:
                    group = cast(
                        "zarr.Group", zarr.open(checked_store(self.url or self.path), mode="r")
                    )
                    self._masks[level] = group[path]
                mask = self._masks[level]
            return np.asarray(mask[y0:y1, x0:x1]) > 0
        except (FileNotFoundError, *DECODE_ERRORS) as exc:
            raise ImageReadError(
                f"{self.path}: cannot read its valid-pixel mask {path!r} at y {y0}:{y1}, "
                f"x {x0}:{x1} ({type(exc).__name__}: {exc})"
            ) from exc

    def _handle_state(self) -> dict[str, Any]:
        return {"_masks": {}} if self._mask_path is not None else {}

    def _open_level(self, level: int) -> Any:
        import zarr

        node = zarr.open(checked_store(self.url or self.path), mode="r")
        path = self._array_paths[level]
        array = cast("zarr.Group", node)[path] if path else node
        if self._stamp(node, array) != self._stamps[level]:
            raise ImageReadError(f"{self.path} changed since it was opened; run again")
        return array

    def _stamp(self, node: Any, array: Any) -> tuple[Any, ...]:
        """What tells a store from one written over it: the level's shape, dtype and chunks,
        the root's attributes (an ingest's record of its source's pixels among them) and, for
        a local store, its root's and the level's folders (inode, mtime: a store written
        anew under the name, of the same size and metadata). Chunks rewritten in place, the
        metadata untouched, go unseen."""
        attrs = json.dumps(dict(node.attrs), sort_keys=True, default=str)
        folders: tuple[Any, ...] = ()
        if self.url is None:
            stats = [os.stat(self.path), os.stat(os.path.join(self.path, array.path or ""))]
            folders = tuple((s.st_ino, s.st_mtime_ns) for s in stats)
        return (
            tuple(array.shape),
            str(np.dtype(array.dtype)),
            tuple(array.chunks),
            attrs,
            *folders,
        )
