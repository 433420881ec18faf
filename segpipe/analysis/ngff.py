"""A result as OME-NGFF 0.4 on Zarr v2, the version QuPath (and older viewers) read.

The copy holds the probability pyramid as one image (axes ``c``, ``y``, ``x``, level ``k``
at ``<k>``) and every label pyramid under ``labels/<name>/<k>``, with the same
``coordinateTransformations``, units, class colours and channel names as the 0.5 result::

    out.zarr/
        .zattrs        multiscales (version "0.4"), omero channels, segpipe (the marker)
        0, 1, ...      (c, y, x) probabilities, level k
        labels/mask/   image-label, multiscales; 0, 1, ... (y, x) uint8

Where the result keeps its arrays (its layout, see :data:`segpipe.results.LAYOUTS`) is read
from its own OME metadata, so results of every layout export alike; the copy always uses the
flat ``<k>`` paths 0.4 readers expect. Arrays are copied level by level through dask, one
source shard at a time, so no level is ever whole in memory.

An export is known by ``"segpipe": {"kind": "ngff-export", ...}`` in its root ``.zattrs``;
``overwrite`` replaces only a folder carrying it, never anything else at the output (a
user's folder, a result), and never the result itself, a folder inside it or one holding it.
Each group's metadata is written after its arrays, the root's last, so no reader sees a
level listed before it is there:

- locally the copy is built beside the output, in ``.<name>.exporting-<hex>``, and renamed
  to it whole (an earlier export renamed aside first, to ``.<name>.deleting-<hex>``, then
  deleted): an interrupted export leaves nothing at the output, and what a killed one left
  beside it is removed by the next export to that name;
- at an fsspec URL (object stores cannot rename) the export is written in place, its root
  marked ``complete: false`` until the root metadata is written, last; one that fails is
  deleted, one killed stays marked unfinished, and an earlier export is deleted as
  :mod:`segpipe.io.imagestore` deletes an ingest (marked unfinished first, its root last).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import dask.array as da
import numpy as np
import zarr

from segpipe.atomic import check_overwrite, check_writable
from segpipe.io.files import URLPath, delete_marked_store, location
from segpipe.io.locks import store_lock
from segpipe.io.ome import ngff04_attributes
from segpipe.io.places import overlap
from segpipe.io.siblings import sibling_name, siblings
from segpipe.results import label_path, naming_damage, open_result
from segpipe.results.lock import result_read

__all__ = ["NGFF_VERSIONS", "export_ngff04"]

NGFF_VERSIONS = ("0.4",)
_KIND = "ngff-export"
_ROOT = ".zattrs"


def _copy_array(source: zarr.Array, group: zarr.Group, name: str) -> None:
    """Copy ``source`` into a new Zarr v2 array ``group/name``, shard by shard."""
    # Java has no half floats: QuPath reads float32 (float16 widens exactly).
    dtype = np.dtype(np.float32) if source.dtype == np.float16 else np.dtype(source.dtype)
    target = group.create_array(
        name,
        shape=source.shape,
        chunks=source.chunks,
        dtype=dtype,
        fill_value=source.fill_value,
        # zlib: every Zarr reader decodes it, Java's without native libraries.
        compressors=[{"id": "zlib", "level": 5}],
        # NGFF 0.4 asks for "/"-separated chunk keys.
        chunk_key_encoding={"name": "v2", "separator": "/"},
    )
    # Dask blocks of whole source shards: each reads one shard and writes whole chunks.
    blocks = da.from_zarr(source, chunks=source.shards or source.chunks)
    # A pool of our own, waited for: when a block fails (a damaged chunk), dask raises at
    # once while the others go on writing, and they made the copy's folders again after
    # the failed export had removed them.
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        da.store(
            blocks.astype(dtype), cast(Any, target), lock=False, scheduler="threads", pool=pool
        )


def _ome(group: zarr.Group, where: str) -> dict[str, Any]:
    attrs = group.attrs.asdict()
    if "ome" not in attrs:
        raise ValueError(f"{where} has no OME-Zarr 0.5 metadata ('ome' attribute)")
    return dict(cast(dict[str, Any], attrs["ome"]))


def _marker(path: Path | URLPath) -> dict[str, Any] | None:
    """The ``segpipe`` attribute of the export (finished or not) at ``path``, or None where
    there is none."""
    try:
        attrs = json.loads(path.joinpath(_ROOT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    segpipe = attrs.get("segpipe") if isinstance(attrs, dict) else None
    return segpipe if isinstance(segpipe, dict) and segpipe.get("kind") == _KIND else None


def export_ngff04(
    result: str | os.PathLike, output: str | os.PathLike, *, overwrite: bool = False
) -> Path | URLPath:
    """Write the probability and label pyramids of ``result`` as NGFF 0.4 at ``output``.

    Either may be a local path or an fsspec URL (a :class:`~segpipe.io.files.URLPath` keeps
    its ``storage_options``). ``output`` must not exist, or, with ``overwrite``, be an earlier
    export (see the module docstring); anything else there raises ``FileExistsError`` and is
    left as it is. Returns the location written. Values equal the result's (float16
    probabilities are widened to float32; uint8 ones stay packed, ``round(255 p)``).
    """
    open_result(result)  # an incomplete or foreign store fails here, before anything is written
    target = location(output)
    # location() keeps a URLPath as it is: str() would drop its storage options.
    source_at = location(result)
    _check_output(target, source_at, overwrite=overwrite)  # no lock file beside a refused path
    # One export at a time writes an output: the second would take the first's half-built
    # copy for a killed export's and delete it, and the first then publish what was left.
    # The result held shared, as a run holds the image it reads: replaced mid-copy (segment
    # with overwrite), its upper levels were read from the new, empty one, and the copy was
    # published complete. A result at a URL has no lock: its stamp is checked before then.
    with (
        result_read(source_at) as still,
        store_lock(target, after_kill=", and the next export clears what it left"),
    ):
        _check_output(target, source_at, overwrite=overwrite)  # as it is now, under the lock
        source = zarr.open_group(source_at, mode="r")
        if isinstance(target, URLPath):
            if target.exists():
                delete_marked_store(target, _ROOT, ("segpipe",))
            try:
                _write(source, str(result), target, still)
            except BaseException:
                if _marker(target) is not None:
                    delete_marked_store(target, _ROOT, ("segpipe",))
                raise
            return target
        _export_locally(source, str(result), target, source_at, still, overwrite=overwrite)
    return target


def _export_locally(
    source: zarr.Group,
    result: str,
    target: Path,
    source_at: Path | URLPath,
    still: Callable[[], None],
    *,
    overwrite: bool,
) -> None:
    """Build the export beside ``target``, then rename it there (see the module docstring)."""
    # Resolved: "." has no name to build beside, and a parent may be a link.
    here = target.resolve()
    check_writable(here)  # its error names the export, not the hidden copy built beside it
    for old in siblings(here, "exporting") + siblings(here, "deleting"):
        shutil.rmtree(old, ignore_errors=True)  # what a killed export left
    building = sibling_name(here, "exporting")
    try:
        _write(source, result, building, still)
        # Checked again: the copy took a while, and something may be at the output now.
        _check_output(target, source_at, overwrite=overwrite)
        if not here.exists():
            os.rename(building, here)  # fails on anything there now but an empty folder
            return
        trash = sibling_name(here, "deleting")
        os.rename(here, trash)
        try:
            os.rename(building, here)
        except BaseException:
            os.rename(trash, here)  # the earlier export back, not lost with the new one
            raise
        shutil.rmtree(trash)
    finally:
        shutil.rmtree(building, ignore_errors=True)


def _check_output(target: Path | URLPath, result: Path | URLPath, *, overwrite: bool) -> None:
    """Refuse ``target`` (FileExistsError, ValueError) unless it is free, or an earlier
    export that ``overwrite`` allows replacing; never the result or what holds it."""
    check_overwrite(overwrite)
    if isinstance(target, Path) and target.is_symlink():
        raise FileExistsError(
            f"export output {target} is a symbolic link to {os.readlink(target)}; an export "
            "is replaced by renaming, which would replace the link, not its target: give the "
            "link's target as the output path, or remove the link"
        )
    if relation := overlap(target, result):
        raise ValueError(
            f"export output {target} {relation} the result {result}: writing there would "
            "replace the result; choose another path"
        )
    if not target.exists():
        return
    marker = _marker(target)
    if marker is None:
        raise FileExistsError(
            f"export output {target} exists and is not a segpipe NGFF export (no 'segpipe': "
            f"{{'kind': '{_KIND}'}} attribute in its {_ROOT}); refusing to replace it, even "
            "with overwrite=True (--overwrite): choose another path or remove it yourself"
        )
    if not overwrite:
        state = "an unfinished" if marker.get("complete") is False else "an earlier"
        raise FileExistsError(
            f"export output {target} exists ({state} segpipe NGFF export); pass "
            "overwrite=True (--overwrite) to replace it"
        )


def _write(
    source: zarr.Group, result: str, target: Path | URLPath, still: Callable[[], None]
) -> None:
    """Write the export of ``source`` (the result named ``result``) at ``target``, marked
    complete only if ``still`` (that the result is the one the export began with) passes."""
    ome = _ome(source, result)
    (multiscale,) = ome["multiscales"]
    paths = [d["path"] for d in multiscale["datasets"]]
    # QuPath finds channels by the axis name "c"; the 0.5 result calls it "class".
    axes = [{**a, "name": "c"} if a["type"] == "channel" else a for a in multiscale["axes"]]
    datasets = [{**d, "path": str(k)} for k, d in enumerate(multiscale["datasets"])]
    ome["multiscales"] = [{**multiscale, "axes": axes, "datasets": datasets}]
    marker = {"kind": _KIND, "version": NGFF_VERSIONS[0]}
    root = zarr.create_group(
        target, zarr_format=2, attributes={"segpipe": {**marker, "complete": False}}
    )
    with naming_damage(result):  # a chunk of the result that cannot be read
        for k, path in enumerate(paths):
            _copy_array(source[path], root, str(k))  # type: ignore[arg-type]

    label_names = list(_ome(source["labels"], f"{result}/labels")["labels"])  # type: ignore[arg-type]
    labels = root.create_group("labels")
    for name in label_names:
        src = source[label_path(name)]
        attrs = _ome(src, f"{result}/{label_path(name)}")  # type: ignore[arg-type]
        (multiscale,) = attrs["multiscales"]
        datasets = [{**d, "path": str(k)} for k, d in enumerate(multiscale["datasets"])]
        attrs["multiscales"] = [{**multiscale, "datasets": datasets}]
        label = labels.create_group(name)
        with naming_damage(result):
            for k, d in enumerate(multiscale["datasets"]):
                _copy_array(src[d["path"]], label, str(k))  # type: ignore[index,arg-type]
        label.update_attributes(ngff04_attributes(attrs))
    labels.update_attributes({"labels": label_names})
    still()
    # Last, one write: an image to readers, and a finished export to segpipe.
    root.update_attributes({**ngff04_attributes(ome), "segpipe": {**marker, "complete": True}})
