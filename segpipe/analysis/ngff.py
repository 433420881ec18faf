"""A result as OME-NGFF 0.4 on Zarr v2, the version QuPath (and older viewers) read.

The copy holds the probability pyramid as one image (axes ``c``, ``y``, ``x``, level ``k``
at ``<k>``) and every label pyramid under ``labels/<name>/<k>``, with the same
``coordinateTransformations``, units, class colours and channel names as the 0.5 result::

    out.zarr/
        .zattrs        multiscales (version "0.4"), omero channels
        0, 1, ...      (c, y, x) probabilities, level k
        labels/mask/   image-label, multiscales; 0, 1, ... (y, x) uint8

Where the result keeps its arrays (its layout, see :data:`segpipe.results.LAYOUTS`) is read
from its own OME metadata, so results of every layout export alike; the copy always uses the
flat ``<k>`` paths 0.4 readers expect. Arrays are copied level by level through dask, one
source shard at a time, so no level is ever whole in memory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, cast

import dask.array as da
import numpy as np
import zarr

from segpipe.io.files import URLPath, location, remove_literal
from segpipe.io.ome import ngff04_attributes
from segpipe.results import label_path, open_result

__all__ = ["NGFF_VERSIONS", "export_ngff04"]

NGFF_VERSIONS = ("0.4",)


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
    da.store(blocks.astype(dtype), cast(Any, target), lock=False)


def _ome(group: zarr.Group, where: str) -> dict[str, Any]:
    attrs = group.attrs.asdict()
    if "ome" not in attrs:
        raise ValueError(f"{where} has no OME-Zarr 0.5 metadata ('ome' attribute)")
    return dict(cast(dict[str, Any], attrs["ome"]))


def export_ngff04(
    result: str | os.PathLike, output: str | os.PathLike, *, overwrite: bool = False
) -> Path | URLPath:
    """Write the probability and label pyramids of ``result`` as NGFF 0.4 at ``output``.

    Either may be a local path or an fsspec URL (a :class:`~segpipe.io.files.URLPath` keeps
    its ``storage_options``). ``overwrite`` replaces an existing ``output``; otherwise it must
    not exist. Returns the location written. Values equal the result's (float16
    probabilities are widened to float32; uint8 ones stay packed, ``round(255 p)``).
    """
    open_result(result)  # an incomplete or foreign store fails here, before anything is written
    target = location(output)
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True (--overwrite) to replace")
        _remove(target)
    # location() keeps a URLPath as it is: str() would drop its storage options.
    source = zarr.open_group(location(result), mode="r")
    ome = _ome(source, str(result))
    (multiscale,) = ome["multiscales"]
    paths = [d["path"] for d in multiscale["datasets"]]
    # QuPath finds channels by the axis name "c"; the 0.5 result calls it "class".
    axes = [{**a, "name": "c"} if a["type"] == "channel" else a for a in multiscale["axes"]]
    datasets = [{**d, "path": str(k)} for k, d in enumerate(multiscale["datasets"])]
    ome["multiscales"] = [{**multiscale, "axes": axes, "datasets": datasets}]
    root = zarr.create_group(target, zarr_format=2, attributes=ngff04_attributes(ome))
    for k, path in enumerate(paths):
        _copy_array(source[path], root, str(k))  # type: ignore[arg-type]

    label_names = list(_ome(source["labels"], f"{result}/labels")["labels"])  # type: ignore[arg-type]
    labels = root.create_group("labels", attributes={"labels": label_names})
    for name in label_names:
        src = source[label_path(name)]
        attrs = _ome(src, f"{result}/{label_path(name)}")  # type: ignore[arg-type]
        (multiscale,) = attrs["multiscales"]
        datasets = [{**d, "path": str(k)} for k, d in enumerate(multiscale["datasets"])]
        attrs["multiscales"] = [{**multiscale, "datasets": datasets}]
        label = labels.create_group(name, attributes=ngff04_attributes(attrs))
        for k, d in enumerate(multiscale["datasets"]):
            _copy_array(src[d["path"]], label, str(k))  # type: ignore[index,arg-type]
    return target


def _remove(path: Path | URLPath) -> None:
    """Delete the folder (or, at a URL, every object under the prefix) at ``path``."""
    if isinstance(path, URLPath):
        fs, root = path.filesystem()
        remove_literal(fs, root, recursive=True)
    else:
        shutil.rmtree(path)
