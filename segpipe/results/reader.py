"""Opening a result with xarray: one pyramid level as a Dataset, or every level as a tree."""

from __future__ import annotations

import numbers
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr
from dask.base import tokenize

from segpipe.io.files import URLPath, is_url, location
from segpipe.results.layout import pixel_grid
from segpipe.results.schema import (
    IncompleteResultError,
    layout_of,
    level_path,
    parse_meta,
    read_attrs,
    result_levels,
    store_of,
    stored_complete,
)
from segpipe.results.store import quiet_consolidated
from segpipe.results.tiles import tile_class_pixels


def open_result(
    path: str | os.PathLike,
    level: int = 0,
    *,
    tree: bool = False,
    allow_incomplete: bool = False,
    chunks: Any = None,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """Open a result lazily, one pyramid level as a Dataset or every level as a DataTree.

    Reads every layout segpipe has written (see :data:`segpipe.results.schema.LAYOUTS`).

    Parameters
    ----------
    path
        The result's Zarr directory.
    level
        Pyramid level (0 = as segmented; level ``k`` is ``2**k`` times smaller).
    tree
        Return an ``xarray.DataTree`` whose children ``"0"``, ``"1"``, ... are the levels.
    allow_incomplete
        Open a result whose run has not finished (``IncompleteResultError`` otherwise);
        its levels hold the blocks written so far (the first few levels are written with
        each block), and the smallest ones nothing until the run's end builds them.
    chunks
        Dask chunks (default: the stored chunks).
    storage_options
        fsspec options for a result at a URL (``s3://...``: endpoint, credentials); without
        them the environment's (``AWS_*``) are used.

    Returns
    -------
    xarray.Dataset or xarray.DataTree
        Dask-backed ``mask`` (y, x) and ``probabilities`` (class, y, x) (uint8 storage decoded
        to float32); coordinates ``y``/``x`` at pixel centres in microns (``units``
        attribute; the CRS's units with a ``spatial_ref`` grid mapping, which rioxarray
        reads, for a georeferenced input; pixels when the source did not say), each with
        its level's signed pixel spacing in a ``step`` attribute (an axis of one pixel has
        it too), and ``class`` holding the class names. Provenance is in
        ``attrs["segpipe"]``, the level in ``attrs["level"]``.

    Examples
    --------
    >>> ds = open_result("slide.seg.zarr", level=2)  # doctest: +SKIP
    >>> ds["probabilities"].sel({"class": "nucleus"}) > 0.8  # doctest: +SKIP
    """
    if storage_options is not None or is_url(path):  # a URL alone: the environment's options
        path = location(path, storage_options)
    meta = read_attrs(path)
    parse_meta(path, meta)  # damaged or unknown metadata: refused here, naming the result
    if not stored_complete(meta) and not allow_incomplete:
        raise IncompleteResultError(
            f"{path} is an incomplete segpipe result (its run was interrupted or is still "
            "going); run segment again with the same output to finish it, or pass "
            "allow_incomplete=True to look at what is there"
        )
    if stored_complete(meta):
        _check_shards_present(path, meta)
    n_levels = len(result_levels(path))
    if tree:
        levels = {str(k): _open_level(path, k, meta, chunks) for k in range(n_levels)}
        name = str(path).rstrip("/").rsplit("/", 1)[-1]  # a local path's name, or a URL's
        root = xr.Dataset(attrs={"segpipe": meta})
        return xr.DataTree.from_dict({"/": root, **levels}, name=name)
    if (
        isinstance(level, bool)
        or not isinstance(level, numbers.Integral)
        or level not in range(n_levels)
    ):
        raise ValueError(f"{path} has pyramid levels 0..{n_levels - 1}, not level {level!r}")
    return _open_level(path, level, meta, chunks)


def check_shards_present(path: str | os.PathLike) -> None:
    """Raise :class:`DamagedResultError` naming ``path``, a complete result, where a stored
    shard of a computed tile is missing, as :func:`open_result` does, without opening it."""
    if is_url(path):
        path = location(path)
    _check_shards_present(path, read_attrs(path))


def _check_shards_present(path: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Refuse a complete result missing a level-0 shard of a tile that holds a pixel of a
    class above 0 (its counts say so): Zarr reads a missing shard as its fill value, 0, so a
    deleted file read as background with probabilities 0. A shard of such a tile is never
    empty, so never left unwritten; one of background tiles alone (glass) may be."""
    try:
        counts = tile_class_pixels(path)
    except (FileNotFoundError, KeyError, zarr.errors.ArrayNotFoundError):
        return  # a result written before the counts were kept
    # The counts summed when it was finalised: counts gone since (their shards deleted under
    # a complete root: an overwrite at a URL racing its run's end) read as zeros, and no
    # shard was looked for, so the result read as all background.
    summed = meta.get("class_pixels")  # the run summary's
    if summed is not None and [int(n) for n in counts.sum(axis=(0, 1))] != list(summed):
        raise DamagedResultError(
            f"{path} is damaged: its per-tile class counts are not those it was finalised "
            "with (its bookkeeping was deleted or replaced); delete it "
            "(segpipe.results.delete_result) and segment the image again"
        )
    tile = parse_meta(path, meta).config.tile
    tiles = np.argwhere(counts[..., 1:].sum(axis=-1) > 0) * tile  # (n, 2) y, x px
    missing = []
    for name in ("mask", "probabilities"):
        where = level_path(0, name, layout=layout_of(meta))
        try:
            array = zarr.open_array(store_of(path), path=where)
        except (FileNotFoundError, ValueError) as exc:  # gone, or no array metadata
            raise DamagedResultError(
                f"{path} is damaged: its array {where} cannot be opened ({exc}); delete it "
                "(segpipe.results.delete_result) and segment the image again"
            ) from exc
        side = np.asarray((array.shards or array.chunks)[-2:])
        lead = (0,) * (array.ndim - 2)  # the class axis, in one shard
        stored = _files_below(path, array.path)
        for shard in {tuple(int(i) for i in t) for t in tiles // side}:
            key = f"{array.path}/{array.metadata.encode_chunk_key((*lead, *shard))}"
            if key not in stored:
                missing.append(key)
    if missing:
        raise DamagedResultError(
            f"{path} is damaged: {len(missing)} stored shard(s) of computed tiles are missing "
            f"({', '.join(sorted(missing)[:3])}{', ...' if len(missing) > 3 else ''}); delete "
            "it (segpipe.results.delete_result) and segment the image again"
        )


def _files_below(path: str | os.PathLike, folder: str) -> set[str]:
    """The keys (``"0/mask/c/0/1"``) of the files below ``folder`` of the store at ``path``:
    one listing (an object store's LIST pages), not a request per shard."""
    root = location(path)
    if isinstance(root, URLPath):
        fs, key = root.filesystem()
        return {f[len(key) :].lstrip("/") for f in fs.find(f"{key.rstrip('/')}/{folder}")}
    return {
        Path(here, f).relative_to(root).as_posix()
        for here, _, files in os.walk(root / folder)
        for f in files
    }


def _open_level(path: str | os.PathLike, level: int, meta: dict[str, Any], chunks: Any) -> Any:
    group = level_path(level, layout=layout_of(meta)) or None  # layout 1: level 0 is the root

    def opened(**kw: Any) -> Any:
        # A complete result's when it has them (an attribute edit may have dropped them).
        consolidated = None if stored_complete(meta) else False
        with quiet_consolidated():
            return xr.open_dataset(
                path, engine="zarr", group=group, consolidated=consolidated, **kw
            )

    # Dask names of this run's arrays, not of the path: xarray names a local store's chunks
    # by its path and modification time, and a URL's by the URL alone, so a remote result
    # overwritten by another run would share the old one's names (a client's persisted
    # chunks, dask's caches would serve the old pixels). A finished result is named by the
    # run that finished it; an unfinished one anew at each open, as its pixels change while
    # its run goes on (persisted while unfinished, its zeros were served once it finished).
    lazy = opened(chunks=None, cache=False)
    sizes = _preferred(lazy) if chunks is None else opened(chunks=chunks).chunksizes
    state = (meta.get("state"), meta.get("finished")) if stored_complete(meta) else uuid.uuid4()
    token = tokenize(str(path), level, meta.get("identity"), meta.get("started"), state)
    ds = lazy.chunk(dict(sizes), token=token, name_prefix="segpipe-")
    ds.attrs = {"segpipe": meta, "level": level}
    # A one-pixel axis (an upper level, a one-row image) has no spacing of its own to read
    # from its coordinate: its pixels' size, which areas need, rides along as an attribute
    # (stored with the coordinate now; set here too, for the results written before).
    grid = pixel_grid(parse_meta(path, meta))  # its units too: a geographic CRS's "unknown"
    steps = (s * 2**level for s in grid.step)
    sy, sx = (_step_of(ds[dim], s) for dim, s in zip("yx", steps, strict=True))
    y, x = (ds[d].assign_attrs(step=s, units=grid.units) for d, s in (("y", sy), ("x", sx)))
    ds = ds.assign_coords(y=y, x=x)
    if ds["probabilities"].encoding.get("dtype") == np.uint8:
        # CF decoding multiplies by a JSON (float64) scale_factor; float32 holds 1/255 steps.
        ds["probabilities"] = ds["probabilities"].astype(np.float32)
    return ds


def _step_of(coordinate: xr.DataArray, otherwise: float) -> float:
    """The ``step`` a coordinate was stored with; else its centres' spacing (their grid may be
    an older release's: a result without a pixel size segmented at a coarser level was in its
    own pixels), ``otherwise`` (the grid's) for a single centre."""
    if "step" in coordinate.attrs:
        return float(coordinate.attrs["step"])
    centres = coordinate.values
    return float(centres[1] - centres[0]) if centres.size > 1 else otherwise


class DamagedResultError(ValueError):
    """A result's stored chunk cannot be read: cut short, or failing its checksum."""


@contextmanager
def naming_damage(path: str | os.PathLike) -> Iterator[None]:
    """Reads of ``path`` inside this block that fail in Zarr's decoding raise
    :class:`DamagedResultError` naming ``path``.

    Zarr's own message ("Stored and computed checksum do not match") names neither the store
    nor the array, and a lazy read fails far from the ``open_result`` that named them. Only
    errors raised inside zarr are renamed: a caller's own ``ValueError`` passes as it is.
    """
    try:
        yield
    except (ValueError, RuntimeError) as exc:  # an OSError names its file already
        if not _raised_in_zarr(exc):
            raise
        raise DamagedResultError(
            f"{path} is damaged: a stored chunk cannot be read ({type(exc).__name__}: {exc}); "
            "delete it (segpipe.results.delete_result) and segment the image again"
        ) from exc


def _raised_in_zarr(exc: BaseException) -> bool:
    """Whether ``exc`` passed through zarr or its codecs (numcodecs) on its way up."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__", "").split(".")[0] in {"zarr", "numcodecs"}:
            return True
        tb = tb.tb_next
    return False


def _preferred(ds: Any) -> dict[str, int]:
    """Each dimension's chunk size as the data arrays store it (their ``preferred_chunks``;
    a coordinate's is its whole length)."""
    return {
        dim: size
        for variable in ds.data_vars.values()
        for dim, size in variable.encoding.get("preferred_chunks", {}).items()
    }
