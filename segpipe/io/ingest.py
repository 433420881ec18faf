"""Ingest an image into an OME-Zarr 0.5 multiscale image on Zarr v3.

Layout written (``output/``)::

    zarr.json      group; attributes {"ome": {"version": "0.5", "multiscales": [...]},
                                      "segpipe": {"kind": "image", "complete": ...}}
    0/zarr.json    (C, Y, X) array, dimension_names ("c", "y", "x"), chunks (C, chunk, chunk)
    1/ ...         each level the 2x2 mean of the one before, until the smaller side would
                   drop below min_level_size; with per-band nodata, a mask or an alpha channel,
                   the mean of each block's valid pixels, and nodata (else 0) where it has none
    labels/valid/  only for a source that marks invalid pixels apart from its pixels (a
                   GeoTIFF's mask band, OpenSlide's alpha): an OME-Zarr label image, (Y, X)
                   uint8 per level, 1 where the pixel holds data; a reduced pixel is valid
                   where any of its 2x2 is (the mean above has a value there)

Metadata for every level is written first, then the pixels, and ``segpipe.complete`` becomes
true only after the last level: an interrupted ingest never looks finished, and
:func:`segpipe.io.readers.open_image` refuses to read one.

Every write is a whole Zarr chunk from one Dask task (the source is rechunked to the Zarr
chunks), so no locks are needed and any Dask scheduler can run it. Level ``k + 1`` is computed
from level ``k`` read back from the store, never from the whole image in memory.

Pixel size: with a known size ``s`` (µm), the y and x axes carry ``"unit": "micrometer"`` and
level ``k`` the scale ``[1, s * 2**k, s * 2**k]``. When the size is unknown the spatial axes
have no ``unit`` (the 0.5 spec makes it optional) and the scale is in level-0 pixels,
``[1, 2**k, 2**k]``; :class:`segpipe.io.readers.ZarrReader` reads that back as ``None``.
With a size, a source's ``origin_um`` (an OME-Zarr's translation) becomes level 0's.
"""

from __future__ import annotations

import contextlib
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import dask.array as da
import dask.base
import numpy as np
from dask.callbacks import Callback

from segpipe.atomic import check_overwrite, write_errors_named
from segpipe.geometry.pixels import downsample_mean_2x, pyramid_shapes, valid_mean_2x
from segpipe.io.files import URLPath, is_url, location
from segpipe.io.identity import pixel_sample_sha256
from segpipe.io.imagestore import (
    INGEST_VERSION,
    VALID_MASK,
    clear_image_store,
    is_reusable,
    is_segpipe_image,
    records_mask,
    source_attributes,
)
from segpipe.io.locks import store_lock
from segpipe.io.ome import OME_VERSION, label_attributes, level0_placement, multiscale_attributes
from segpipe.io.places import overlap
from segpipe.io.readers import ImageReadError, Reader, open_image
from segpipe.io.readers.masks import pixel_valid_mask, valid_mask_array
from segpipe.io.units import check_pixel_size
from segpipe.progress import Stage, progress_option, showing, stage

__all__ = ["ingest", "ingested_image", "is_segpipe_image"]
_ZSTD_LEVEL = 3
_MIN_LEVEL_SIZE = 256  # px: the smaller side of the smallest level


@progress_option
def ingest(
    source: str | os.PathLike[str] | Reader,
    output: str | os.PathLike[str],
    *,
    chunk: int = 512,
    min_level_size: int = _MIN_LEVEL_SIZE,
    pixel_size_um: float | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path | URLPath:
    """Copy an image into an OME-Zarr 0.5 multiscale image (Zarr v3, zstd).

    Parameters
    ----------
    source
        A path :func:`~segpipe.io.readers.open_image` reads (TIFF, SVS, OME-TIFF, Zarr, PNG,
        JPEG) or an open :class:`~segpipe.io.readers.Reader`.
    output
        Directory to create, e.g. ``slide.ome.zarr``, or an fsspec URL
        (``s3://bucket/slide.ome.zarr``, a :class:`~segpipe.io.files.URLPath` with its options).
    chunk
        Zarr chunk side in pixels (y and x); each chunk holds all channels.
    min_level_size
        Reduced levels are added while their smaller side stays ``>= min_level_size``
        pixels (:func:`segpipe.geometry.pixels.pyramid_shapes`).
    pixel_size_um
        Microns per pixel at level 0; overrides what the source says.
    overwrite
        Replace ``output`` if it is a previous segpipe image ingest, as
        :mod:`segpipe.io.imagestore` deletes one. An unfinished one (a killed or failed
        ingest's) is replaced without it. Any other existing path is never deleted.
    progress
        Show the ingest's progress on stderr, unless a listener is installed already
        (:func:`segpipe.progress.reporting`), which shows it. Dask's own bars never print.

    Returns
    -------
    Path or URLPath
        ``output`` (:func:`~segpipe.io.files.location`).

    Raises
    ------
    FileExistsError
        ``output`` holds a finished ingest and ``overwrite`` is False, or it is not a
        segpipe ingest, or it is a symbolic link.
    ValueError
        ``output`` is a URL with ``[``, ``]``, ``*`` or ``?`` (fsspec deletes them as a glob),
        or it is the source, lies inside it or holds it.
    ImageReadError
        The source cannot be read.
    StoreBusyError
        Another run ingests into ``output`` or segments it, or into the source (:mod:`.locks`).
    """
    check_overwrite(overwrite)
    out = location(output)
    where = source if isinstance(source, str | os.PathLike | URLPath) else source.path
    _check_apart(out, where)
    with write_errors_named(out), contextlib.ExitStack() as locked:
        if not is_url(where) and is_segpipe_image(where):
            # shared till the copy ends, as segment holds it: a re-ingest would leave zeros
            locked.enter_context(store_lock(location(where), shared=True))
        locked.enter_context(store_lock(out, after_kill=_AFTER_KILL))  # one writer a store
        return _ingest(source, out, overwrite, chunk, min_level_size, pixel_size_um)


def _check_apart(out: Path | URLPath, source: str | os.PathLike[str]) -> None:
    """Refuse an output that is ``source``, in it or holding it: clearing it deletes both."""
    if overlap(out, source):
        raise ValueError(f"ingest output {out} overlaps its source {source}; choose another path")


# What the busy message adds: what a killed ingest leaves.
_AFTER_KILL = ", and the next ingest redoes what it left unfinished"


def _ingest(
    source: str | os.PathLike[str] | Reader,
    out: Path | URLPath,
    overwrite: bool,
    chunk: int,
    min_level_size: int,
    pixel_size_um: float | None,
) -> Path | URLPath:
    """:func:`ingest` under the store's lock, held by the caller."""
    if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 2:
        raise ValueError(f"chunk must be an integer >= 2 (pixels), got {chunk!r}")
    chunk = int(chunk)  # a numpy integer: zarr's JSON metadata cannot hold it
    with contextlib.ExitStack() as opened:
        if isinstance(source, str | os.PathLike | URLPath):  # a URLPath with its options
            reader = open_image(source, pixel_size_um=pixel_size_um)
            opened.callback(cast(Any, reader).close)  # opened here: closed here (BaseReader's)
        else:
            reader = source
        # A chunk is read and encoded whole: --chunk 70000 took 22 GB (the OOM killer).
        size = reader.shape[2] * chunk**2 * np.dtype(reader.dtype).itemsize
        if size > 2**30:
            raise ValueError(
                f"chunk {chunk} px (--chunk) makes chunks of {size / 2**30:,.1f} GiB "
                f"({reader.shape[2]} channels x {chunk}² px {np.dtype(reader.dtype)}), each "
                "written and read whole; give a smaller chunk (the default is 512)"
            )
        px = reader.pixel_size_um
        if pixel_size_um is not None:
            px = check_pixel_size(pixel_size_um, "pixel_size_um")
        sample = pixel_sample_sha256(reader)  # a source that cannot be read keeps the old copy
        clear_image_store(out, overwrite=overwrite)
        _copy(reader, out, px, sample, chunk=chunk, min_level_size=min_level_size)
    return out


def _copy(
    reader: Reader, out: Path | URLPath, px: float | None, sample: str, *, chunk: int,
    min_level_size: int,
) -> None:  # fmt: skip
    """:func:`ingest`'s copy of ``reader`` (pixel sample hash ``sample``) where nothing is."""
    import zarr

    ny, nx, nc = reader.shape
    nodata = getattr(reader, "nodata", None)
    shapes = pyramid_shapes((ny, nx), min_level_size)
    kind, names = getattr(reader, "mask_kind", None), getattr(reader, "channel_names", None) or ()
    alpha = names.index("alpha") if kind == "alpha" and "alpha" in names else None
    masked = records_mask(reader)
    attrs = _segpipe_attributes(reader, px, sample, chunk)
    # in microns: without a pixel size the levels are in pixels, and no origin has a unit
    origin = getattr(reader, "origin_um", (0.0, 0.0)) if px else (0.0, 0.0)
    ome = _ome_attributes(Path(reader.path).name, len(shapes), px, origin)
    # the location itself, not str(): a URLPath keeps its storage options
    root = zarr.create_group(
        out, zarr_format=3, attributes={"ome": ome, "segpipe": {**attrs, "complete": False}}
    )
    arrays = _create_levels(root, shapes, chunk, reader.dtype, nc)
    masks = _create_mask(root, shapes, chunk, ome) if masked else []

    zarr_chunks = (nc, chunk, chunk)
    level_chunks = [-(-ly // chunk) * -(-lx // chunk) for ly, lx in shapes]
    with stage("ingest", total=sum(level_chunks), unit="chunk") as written:
        for k, target in enumerate(arrays):
            if k == 0:
                level = reader.level(0).transpose(2, 0, 1)
                valid = valid_mask_array(reader, chunk) if masked else None
            else:
                # read back the level just written: bounded memory, and each level is the mean
                # of exactly what is stored below it
                stored = da.from_zarr(arrays[k - 1])
                below = da.from_zarr(masks[k - 1]) if masked else None
                level = _halve(stored, nodata, below if alpha is None else stored[alpha])
                valid = None if below is None else _halve_mask(below)
            sources, targets = [level.rechunk(zarr_chunks)], [target]
            if valid is not None:
                sources, targets = [*sources, valid.rechunk((chunk, chunk))], [target, masks[k]]
            counter = _ChunkCounter(written, level_chunks[k])
            # dask types targets as numpy array-likes; a zarr.Array has the setitem it needs
            da.store(sources, cast(Any, targets), lock=False, **counter.compute_options())
            counter.finish()
    # A source moved, deleted or edited meanwhile (a store's chunks then read as zeros, no
    # error) must not make a copy marked complete: its pixel sample and stat are taken again.
    stat = source_attributes(reader).get("source_stat")
    if pixel_sample_sha256(reader) != sample or stat != attrs.get("source_stat"):
        raise ImageReadError(f"{reader.path} changed while it was ingested; ingest it again")
    root.update_attributes({"segpipe": {**attrs, "complete": True}})


def _create_levels(
    group: Any, shapes: Sequence[tuple[int, int]], chunk: int, dtype: Any, nc: int | None
) -> list[Any]:
    """Empty arrays ``"0"``, ``"1"``, ... of ``group``: ``(C, Y, X)`` of ``nc`` channels, or
    ``(Y, X)`` for ``nc`` None, chunked ``chunk`` pixels a side."""
    from zarr.codecs import ZstdCodec

    lead = () if nc is None else (nc,)
    return [
        group.create_array(
            str(k),
            shape=(*lead, ly, lx),
            chunks=(*lead, chunk, chunk),
            dtype=dtype,
            fill_value=0,
            compressors=ZstdCodec(level=_ZSTD_LEVEL, checksum=True),
            dimension_names=("c", "y", "x")[-2 - len(lead) :],
        )
        for k, (ly, lx) in enumerate(shapes)
    ]


def _create_mask(
    root: Any, shapes: Sequence[tuple[int, int]], chunk: int, image: dict[str, Any]
) -> list[Any]:
    """The empty levels of label image :data:`VALID_MASK`, placed as the ``ome`` ``image``'s."""
    labels, name = VALID_MASK.split("/")
    step, origin = level0_placement(image) or ((1.0, 1.0), (0.0, 0.0))
    unit = image["multiscales"][0]["axes"][-1].get("unit")
    paths = [str(k) for k in range(len(shapes))]
    # a pixel is valid where any of the 2x2 below is: their max, not the labels' usual mode
    ome = label_attributes(name, paths, step, unit, ("nodata", "valid"), origin, method="max")
    group = root.create_group(
        labels, attributes={"ome": {"version": OME_VERSION, "labels": [name]}}
    )
    return _create_levels(
        group.create_group(name, attributes={"ome": ome}), shapes, chunk, np.uint8, None
    )


def _halve_mask(valid: da.Array) -> da.Array:
    """The next ``(Y, X)`` uint8 validity mask: 1 where any pixel of the 2x2 block is."""
    ny, nx = valid.shape
    side = max(2, valid.chunksize[0] + valid.chunksize[0] % 2)  # even chunks: whole blocks
    even = valid[: ny // 2 * 2, : nx // 2 * 2].rechunk((side, side))
    return da.coarsen(np.max, even, {0: 2, 1: 2})


def _halve(
    level: da.Array, nodata: tuple[float | None, ...] | None, valid: da.Array | None = None
) -> da.Array:
    """The next ``(C, Y, X)`` level: the plain 2x2 mean, or where invalid pixels are marked
    (nodata in every band, or ``valid``: the level's ``(Y, X)`` mask or alpha, 0 where
    invalid) the mean of each block's valid pixels and nodata (else 0) where it has none,
    so the footprint's edge never mixes data and nodata."""
    has_nodata = nodata is not None and all(value is not None for value in nodata)
    if valid is None and not has_nodata:
        # a band without nodata makes every pixel valid: the plain mean, bit for bit as before
        return downsample_mean_2x(level, yx_axes=(1, 2))
    nc, ny, nx = level.shape
    side = max(2, level.chunksize[1] + level.chunksize[1] % 2)  # even chunks: whole blocks
    even = level[:, : ny // 2 * 2, : nx // 2 * 2].rechunk((nc, side, side))
    if valid is not None:
        valid = valid[None, : ny // 2 * 2, : nx // 2 * 2].rechunk((1, side, side))
    return da.map_blocks(
        _valid_mean_2x,
        even,
        nodata if has_nodata else (0.0,) * nc,
        valid,
        chunks=tuple(
            cs if axis == 0 else tuple(c // 2 for c in cs) for axis, cs in enumerate(even.chunks)
        ),
        dtype=even.dtype,
        meta=np.empty((0, 0, 0), even.dtype),
    )


def _valid_mean_2x(
    block: np.ndarray, nodata: tuple[float, ...], valid: np.ndarray | None = None
) -> np.ndarray:
    """:func:`~segpipe.geometry.pixels.valid_mean_2x` of ``(C, Y, X)`` with even sides.
    Valid: where ``valid`` (``(1, Y, X)``) is not 0, else where not every band is nodata
    (then a mean of valid pixels is kept off nodata, else it would read as nodata).

    >>> _valid_mean_2x(np.array([[[1, 2, -1, -1], [-1, 4, -1, -1]]]), (-1.0,)).tolist()
    [[[2, -1]]]
    """
    if valid is not None:
        return valid_mean_2x(block, valid[0] > 0, nodata)
    by_value = pixel_valid_mask(np.moveaxis(block, 0, -1), nodata, "nodata", None)
    assert by_value is not None  # mask kind "nodata" with a value for every band
    return valid_mean_2x(block, by_value, nodata, off_nodata=True)


class _ChunkCounter(Callback):
    """Advances the ingest stage by a level's ``chunks`` as Dask's local scheduler finishes
    its tasks (the share of tasks finished, counted as ``dask.diagnostics.ProgressBar``
    counts them), called in the computing thread. A distributed client runs no local
    callbacks: the level then counts whole when it is stored (:meth:`finish`)."""

    def __init__(self, written: Stage, chunks: int) -> None:
        super().__init__()
        self.written, self.chunks, self.counted = written, chunks, 0

    def compute_options(self) -> dict[str, Any]:
        """``callbacks=`` with this one for the scheduler ``da.store`` will use, if a local one.

        Passed to this computation only: a callback made active with ``with`` would count
        every Dask computation of the process, other threads' included."""
        scheduler = dask.base.get_scheduler()
        is_local = scheduler is None or not getattr(scheduler, "__module__", "").startswith(
            "distributed"
        )
        # Callbacks given to a computation replace the active ones (a user's own `with
        # ProgressBar():`), so those go along.
        return {"callbacks": [*Callback.active, self._callback]} if is_local else {}

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        done = len(state["finished"])
        tasks = done + sum(len(state[k]) for k in ("ready", "waiting", "running"))
        self._count(self.chunks * done // max(tasks, 1))

    def finish(self) -> None:
        self._count(self.chunks)

    def _count(self, chunks: int) -> None:
        if chunks > self.counted:
            self.written.advance(chunks - self.counted)
            self.counted = chunks


def _ome_attributes(
    name: str, n_levels: int, pixel_size_um: float | None, origin_um: tuple[float, float]
) -> dict[str, Any]:
    """The ``ome`` attribute of an OME-Zarr 0.5 image with ``n_levels`` 2x levels, level 0's
    first pixel centred at ``origin_um`` (y, x; µm, so (0, 0) without a pixel size)."""
    step, unit = (1.0, None) if pixel_size_um is None else (float(pixel_size_um), "micrometer")
    paths = [str(k) for k in range(n_levels)]
    ms = multiscale_attributes(
        name, paths, (step, step), unit, channel="c", method="mean", origin=origin_um
    )
    return {"version": OME_VERSION, "multiscales": [ms]}


def _segpipe_attributes(
    reader: Reader, px: float | None, sample: str, chunk: int
) -> dict[str, Any]:
    """The ``segpipe`` attribute, but ``complete``; ``source``, ``pixel_size_um``, ``chunk``
    (pixels), ``version``, ``source_sha256`` and what the copy keeps of its source decide
    reuse (:func:`.imagestore.is_reusable`)."""
    return {
        "kind": "image",
        "pixel_size_um": px,
        "chunk": chunk,
        "dtype": np.dtype(reader.dtype).name,
        "version": INGEST_VERSION,
        "source_sha256": sample,  # io.identity.pixel_sample_sha256
        **source_attributes(reader),
    }


def ingested_image(
    source: str | os.PathLike[str],
    store: str | os.PathLike[str],
    *,
    chunk: int = 512,
    pixel_size_um: float | None = None,
    progress: bool = False,
) -> Path | URLPath:
    """The OME-Zarr image to segment for ``source``, ingesting it into ``store`` if needed.

    A source that already is a segpipe image is used as it is; a complete ingest at ``store``
    of the same source with the same options (:func:`.imagestore.is_reusable`) is reused; any
    other segpipe image there is redone. Anything else at ``store`` is refused by :func:`ingest`.
    """
    if is_segpipe_image(source):
        return location(source)
    store = location(store)
    _check_apart(store, source)
    # Under the lock: of two runs ingesting into one store, the second stops (StoreBusyError).
    with store_lock(store, after_kill=_AFTER_KILL), showing(progress):
        if is_reusable(store, source, chunk=chunk, pixel_size_um=pixel_size_um):
            return store
        # another ingest's, or an unfinished one: replaced
        overwrite = is_segpipe_image(store)
        return _ingest(source, store, overwrite, chunk, _MIN_LEVEL_SIZE, pixel_size_um)
