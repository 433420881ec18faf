"""Where an image's outputs go under an output root: paths derived from its key alone."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from segpipe.archive.catalog import CATALOG_DIR
from segpipe.io.files import URLPath, location

__all__ = ["ImagePaths", "image_paths"]


@dataclass(frozen=True)
class ImagePaths:
    """Everything segpipe writes for one image, derived from its key (see the module doc):
    local paths, or :class:`~segpipe.io.files.URLPath` under an fsspec URL root."""

    result: Path | URLPath
    state: Path | URLPath
    report: Path | URLPath
    thumbnail: Path | URLPath
    lock: Path | URLPath


def image_paths(output_root: str | os.PathLike[str], key: str) -> ImagePaths:
    """Output paths of the image ``key`` (its path relative to the archive root).

    ``output_root`` is a local folder or a :class:`~segpipe.io.files.URLPath` (its storage
    options go to every path).

    >>> image_paths("/out", "day-1/a.svs").result.as_posix()
    '/out/day-1/a.svs.seg.zarr'
    """
    parts = PurePosixPath(key).parts
    if not parts or PurePosixPath(key).is_absolute() or ".." in parts:
        raise ValueError(f"image key {key!r} must be a relative path without '..'")
    if parts[0].casefold() == CATALOG_DIR and len(parts) > 1:
        # Its sidecar would land among the catalog's records, and every read of it fail.
        raise ValueError(
            f"image key {key!r}: the output root's top-level folder {CATALOG_DIR}/ holds "
            "segpipe's catalog, so an image under a folder of that name at the archive's top "
            "cannot be archived there; rename that folder"
        )
    base = location(output_root).joinpath(*parts)
    # The full file name stays in the stem: a.tif and a.svs side by side get two results.
    return ImagePaths(
        result=base.with_name(base.name + ".seg.zarr"),
        state=base.with_name(base.name + ".seg.json"),
        report=base.with_name(base.name + ".report.md"),
        thumbnail=base.with_name(base.name + ".thumb.png"),
        lock=base.with_name(base.name + ".lock"),
    )
