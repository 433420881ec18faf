"""The image stores :func:`segpipe.io.ingest.ingest` writes: which locations hold one, when one
still stands for its source, and how one is replaced.

A location holds a segpipe image when its root ``zarr.json`` carries ``segpipe.kind ==
"image"``; ``segpipe.complete`` says whether all its pixels are there. Replacing one never
leaves a store that reads as complete with chunks missing (a missing chunk reads as the fill
value, 0, without an error), nor a folder that is no segpipe image and still in the way:

- locally it is renamed aside in one step, to ``.<name>.deleting-<hex>`` beside it, and
  deleted there (as :mod:`segpipe.results.store` deletes a result); what a killed deletion
  left is removed by the next ingest to that location;
- at an fsspec URL (object stores cannot rename) its root ``zarr.json`` is first rewritten
  with ``complete: false`` (one PUT), then its other objects go and the root last: a deletion
  killed halfway leaves an unfinished ingest, which the next ingest replaces.

A local symbolic link is refused before anything is written or deleted there: renaming it
aside would move the link, not the image. A URL's objects are deleted each by its key
(:func:`.remove_literal`): one with ``[``, ``]``, ``*`` or ``?`` never deletes another that
fsspec's pattern would match.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from segpipe.atomic import check_overwrite
from segpipe.geometry.pixels import level_downsample
from segpipe.io.files import URLPath, delete_marked_store, is_url, json_number, location
from segpipe.io.identity import pixel_sample_sha256
from segpipe.io.places import public_url
from segpipe.io.readers import Reader, open_image
from segpipe.io.siblings import sibling_name, siblings
from segpipe.io.units import check_pixel_size

__all__ = [
    "INGEST_VERSION",
    "VALID_MASK",
    "clear_image_store",
    "ingested_level",
    "is_reusable",
    "is_same_location",
    "is_segpipe_image",
    "records_mask",
    "source_attributes",
]

# 2: labels/valid, alpha named, valid-only reduced levels, a pixel sample; 3: the chunk side
# recorded (a version 2's is read from its level 0); 4: a valid mean that rounds to nodata
# moved off it (a 2 or 3 of a source with nodata by value is redone). Older ingests are redone.
INGEST_VERSION = 4
_REUSABLE_VERSIONS = (2, 3, INGEST_VERSION)
_ROOT = "zarr.json"
# The label image of the pixels that hold data, where a source marks them apart.
VALID_MASK = "labels/valid"
# What a copy keeps of its source besides the pixels (source_attributes): any change redoes it.
_KEPT = (
    "georeference",
    "origin_um",
    "nodata",
    "channel_names",
    "valid_mask",
    "mask_kind",
    "sidecar_stat",
)


def is_segpipe_image(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a Zarr group that segpipe's ingest wrote (done or not)."""
    return _segpipe_attributes(location(path)) is not None


def _segpipe_attributes(path: Path | URLPath) -> dict[str, Any] | None:
    """The ``segpipe`` attributes of the ingest at ``path``, or None where there is none."""
    try:
        attrs = json.loads(path.joinpath(_ROOT).read_text(encoding="utf-8")).get("attributes")
    except (OSError, ValueError, AttributeError):
        return None
    segpipe = attrs.get("segpipe") if isinstance(attrs, dict) else None
    is_image = isinstance(segpipe, dict) and segpipe.get("kind") == "image"
    return segpipe if is_image else None


def is_same_location(path: Path | URLPath, other: str) -> bool:
    """Whether ``other`` (a path or URL as a reader or a store's attributes name it) is
    ``path``: URLs compared as written, local paths resolved."""
    if isinstance(path, URLPath) or is_url(other):  # stored without a password
        return public_url(str(path)) == other.rstrip("/")
    return path.resolve() == Path(other).resolve()


def is_reusable(
    store: Path | URLPath,
    source: str | os.PathLike[str],
    *,
    chunk: int,
    pixel_size_um: float | None,
) -> bool:
    """Whether the ingest at ``store`` stands for ``source`` ingested with ``chunk`` (pixels)
    and ``pixel_size_um`` (µm, None: the source's own): a complete ingest of this version or
    version 2, of the same location and chunk side, whose pixel sample and pixel size are the
    source's, and the file's size and mtime (local files) those it had.

    A source gone leaves nothing to compare with: its copy (of either version, any chunk
    side) is reused, with a warning, unless ``pixel_size_um`` asks for another pixel size
    (then the ingest fails naming the source).
    """
    previous = _segpipe_attributes(store)
    if previous is None or not previous.get("complete"):
        return False
    here = location(source)
    same = is_same_location(here, str(previous.get("source")))
    if not same or previous.get("version") not in _REUSABLE_VERSIONS:
        return False
    if not here.exists():
        wanted = None if pixel_size_um is None else check_pixel_size(pixel_size_um, "pixel_size_um")
        if wanted not in (None, previous.get("pixel_size_um")):
            return False
        warnings.warn(f"{source} is gone; using its ingested copy {store}", stacklevel=3)
        return True
    if _chunk_side(store, previous) != chunk:
        return False
    reader = open_image(here, pixel_size_um=pixel_size_um)
    try:
        # the size an ingest now would write: the override, else what the file says today
        if previous.get("pixel_size_um") != reader.pixel_size_um:
            return False
        kept = source_attributes(reader)
        if any(previous.get(k) != kept.get(k) for k in _KEPT):
            return False
        # an ingest before the file's size and mtime were recorded: the pixel sample alone
        if "source_stat" in previous and previous["source_stat"] != kept.get("source_stat"):
            return False
        if previous.get("version") != INGEST_VERSION and _nodata_by_value(reader):
            return False  # its reduced levels may read valid pixels as nodata
        return bool(previous.get("source_sha256") == pixel_sample_sha256(reader))
    finally:
        getattr(reader, "close", lambda: None)()


def ingested_level(
    source: str | os.PathLike[str], image: str | os.PathLike[str], level: int | None
) -> int | None:
    """The level of ``image``, ``source`` as ingested (its levels 2x steps), whose pixels are
    those of ``source``'s ``level`` (a scanner's pyramid often steps 4x: its level 1 is the
    copy's level 2); None and 0 as they are.

    Raises ``ValueError`` naming ``source`` where it has no such level, or the copy none of
    that downsample (a 3x level; one below the copy's smallest).
    """
    if not level:
        return level
    with contextlib.ExitStack() as opened:  # each reader holds its file open
        theirs = _opened(opened, source).level_shapes
        ours = _opened(opened, image).level_shapes
    if level >= len(theirs):
        raise ValueError(f"{source} has levels 0-{len(theirs) - 1}, not level {level}")
    wanted = [level_downsample(theirs[0][a], theirs[level][a]) for a in (0, 1)]
    for k, shape in enumerate(ours):
        d = [level_downsample(ours[0][a], shape[a]) for a in (0, 1)]
        if all(abs(d[a] / wanted[a] - 1) < 0.01 for a in (0, 1)):
            return k
    raise ValueError(
        f"{source}: its level {level} is a {wanted[1]:.4g}x downsample, and the ingested copy "
        f"{image} has levels of {', '.join(f'{2**k}x' for k in range(len(ours)))} only: "
        "segment the source itself (segpipe segment), or leave the level unset for the one "
        "the model's pixel size picks"
    )


def _opened(stack: contextlib.ExitStack, path: str | os.PathLike[str]) -> Reader:
    """``path`` open, closed as ``stack`` closes."""
    reader = open_image(path)
    stack.callback(getattr(reader, "close", lambda: None))  # not in the Reader protocol
    return reader


def source_attributes(reader: Reader) -> dict[str, Any]:
    """What an ingest records of ``reader`` besides its pixels, as JSON: its location (a local
    path absolute, so another working folder names the same file), and the georeference,
    origin, nodata, channel names and mask its copy keeps, and a local file's size and mtime
    (ns). A copy whose source now says otherwise is not reused (:func:`is_reusable`): a nodata,
    CRS or origin fixed in place changes no pixel, an edit outside the sampled pixels none of
    the sample's."""
    path = str(reader.path)
    attrs: dict[str, Any] = {"source": public_url(path) if is_url(path) else os.path.abspath(path)}
    if not is_url(path) and os.path.isfile(path):
        # a file edited in place outside the sampled pixels: its size or mtime tells
        stat = os.stat(path)
        attrs["source_stat"] = [stat.st_size, stat.st_mtime_ns]
    # GDAL's sidecars (a .msk mask band): edited alone, the image's own stat and pixels stay
    if sidecars := getattr(reader, "sidecars", ()):
        stats = {f: os.stat(f) for f in sidecars}
        attrs["sidecar_stat"] = {
            os.path.basename(f): [s.st_size, s.st_mtime_ns] for f, s in stats.items()
        }
    # OME-Zarr 0.5 has no CRS; keep the GeoTIFF's so results of the ingest stay georeferenced.
    if (geo := getattr(reader, "georeference", None)) is not None:
        attrs["georeference"] = {"crs": geo.crs, "transform": list(geo.transform)}
    # where its first pixel lies (an OME-Zarr's translation), as its copy's levels say it;
    # absent at 0, as ingests before it recorded none
    if any(origin := getattr(reader, "origin_um", (0.0, 0.0))):
        attrs["origin_um"] = [float(v) for v in origin]
    # and which pixels hold no data: the ZarrReader's valid_mask reads these back
    for key in ("nodata", "channel_names"):
        if (value := getattr(reader, key, None)) is not None:
            # NaN and infinities as text (float() reads them back): bare, they are no JSON.
            attrs[key] = [json_number(v) for v in value]
    if records_mask(reader):
        attrs["valid_mask"] = VALID_MASK
    kind = getattr(reader, "mask_kind", None)
    if kind == "alpha" and "nodata" in attrs:
        # a GeoTIFF's alpha band beside a nodata value: the alpha marks the pixels, which the
        # names alone cannot tell (a band described "alpha" is no alpha band)
        attrs["mask_kind"] = "alpha"
    elif kind is None and "alpha" in attrs.get("channel_names", ()):
        # a band only described "alpha" holds data: its copy, read by the names, took it for
        # an alpha band and its 0s for no data
        attrs["mask_kind"] = "none"
    return attrs


def records_mask(reader: Reader) -> bool:
    """Whether ``reader``'s invalid pixels are marked apart from its pixels (a mask band, an
    alpha OpenSlide makes), so its ingest keeps them as the label image :data:`VALID_MASK`;
    nodata and an alpha channel travel with the pixels."""
    kind, names = getattr(reader, "mask_kind", None), getattr(reader, "channel_names", None) or ()
    return kind == "mask" or (kind == "alpha" and "alpha" not in names)


def _nodata_by_value(reader: Reader) -> bool:
    """Whether ``reader``'s invalid pixels are those at nodata in every band (no mask, no
    alpha): its ingest's reduced levels average the others (ingest's ``_halve``)."""
    nodata = getattr(reader, "nodata", None)
    has_nodata = nodata is not None and all(value is not None for value in nodata)
    return has_nodata and not records_mask(reader) and getattr(reader, "mask_kind", None) != "alpha"


def _chunk_side(store: Path | URLPath, previous: dict[str, Any]) -> int | None:
    """The chunk side (pixels) of the ingest at ``store`` with ``segpipe`` attributes
    ``previous``: recorded there since version 3, else its level-0 array's chunks'."""
    if previous.get("version") in (3, INGEST_VERSION):
        return previous.get("chunk")
    try:
        meta = json.loads(store.joinpath("0", _ROOT).read_text(encoding="utf-8"))
        *_, ny, nx = meta["chunk_grid"]["configuration"]["chunk_shape"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return ny if isinstance(ny, int) and ny == nx else None


def clear_image_store(out: Path | URLPath, *, overwrite: bool) -> None:
    """Make way for an ingest at ``out``: nothing there, an unfinished segpipe ingest (one
    killed or failed: the next ingest redoes it), or a segpipe image that ``overwrite`` allows
    deleting (deleted as the module says, never leaving a half-deleted image there).

    Raises FileExistsError for anything else at ``out``, which is never deleted, and for a
    symbolic link.
    """
    check_overwrite(overwrite)
    if not isinstance(out, URLPath):
        _check_not_link(out)
        # what a killed deletion left beside it (a URL's is the store itself, unfinished)
        for old in siblings(out, "deleting"):
            shutil.rmtree(old, ignore_errors=True)
    if not out.exists():
        return
    previous = _segpipe_attributes(out)
    if not overwrite and (previous is None or previous.get("complete")):
        raise FileExistsError(
            f"ingest output {out} already exists; pass overwrite=True (--overwrite) to "
            f"replace a previous segpipe ingest, or choose another path"
        )
    if not (out.is_dir() and previous is not None):
        raise FileExistsError(
            f"ingest output {out} exists and is not a segpipe image ingest (no "
            f"'segpipe': {{'kind': 'image'}} attribute in its zarr.json); refusing to delete "
            f"it even with overwrite=True (--overwrite): choose another path or remove it "
            f"yourself"
        )
    if isinstance(out, URLPath):
        delete_marked_store(out, _ROOT, ("attributes", "segpipe"))
        return
    trash = sibling_name(out, "deleting")
    os.rename(out, trash)
    shutil.rmtree(trash)


def _check_not_link(out: Path) -> None:
    # An ingest is replaced by renaming it aside: through a link, the link would be moved and
    # the image kept (rmtree refuses links). Following the link would write or delete
    # whatever it points to, which other links may share: refused, as results refuse theirs.
    if out.is_symlink():
        raise FileExistsError(
            f"ingest output {out} is a symbolic link to {os.readlink(out)}; segpipe replaces "
            "an ingest by renaming it aside, which would move the link, not the image: give "
            "the link's target as the output path, or remove the link"
        )
