"""The catalog: every result under an ``output_root`` with its per-class statistics.

Layout: one small JSON record per image, ``output_root/_catalog/records/<name>.json``, each
written atomically (a temporary file renamed over the old record). :func:`open_catalog`
assembles them into an :class:`xarray.Dataset` along a dimension ``image``::

    >>> ds = open_catalog("/data/segpipe")  # doctest: +SKIP
    >>> nucleus = ds["class_fraction"].sel({"class": "nucleus"}, drop=True)  # doctest: +SKIP
    >>> ds["image"][nucleus > 0.05].values  # doctest: +SKIP
    array(['day-1/a.svs', 'day-2/c.svs'], dtype=object)

Why records and not one Zarr array appended to: runs that finish at the same time each write
their own file, so they never contend and need no lock; a rename is atomic on local and network
file systems and a PUT is on object stores, where file locks do not exist. Appending to a
shared Zarr array instead means resizing its shape metadata from several processes, which Zarr
v3 does not synchronise (one append silently loses the other's row). Claims already make one
run at a time write a given image's record; should two ever do it, the last whole record wins.
Assembling reads one small file per image: fine for tens of thousands of images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from segpipe.io.files import URLPath, location, write_json_atomic
from segpipe.results import read_meta

__all__ = [
    "CATALOG_DIR",
    "gone_images",
    "open_catalog",
    "read_records",
    "record_path",
    "record_result",
    "remove_record",
]

log = logging.getLogger("segpipe.archive")

CATALOG_DIR = "_catalog"
RECORD_VERSION = 1

# Per-image numbers, as (record field, dtype, fill when absent).
_SCALARS = (
    ("pixel_size_um", "float64", np.nan),
    ("height", "int64", -1),
    ("width", "int64", -1),
    ("tiles_total", "int64", -1),
    ("tiles_computed", "int64", -1),
    ("tiles_skipped", "int64", -1),
    ("seconds", "float64", np.nan),
    ("megapixels_per_second", "float64", np.nan),
)
_STRINGS = ("result", "source", "model", "model_sha256", "finished", "sample_sha256")
_PER_CLASS = (
    ("class_pixels", "int64", 0),
    ("class_fraction", "float64", np.nan),
    ("class_area_um2", "float64", np.nan),
)


def record_path(output_root: str | os.PathLike[str], image: str) -> Path | URLPath:
    """The record file of ``image`` (its key): a readable slug plus a hash, so keys that slug
    alike (``a/b.tif``, ``a-b.tif``) still get files of their own."""
    slug = re.sub(r"[^a-z0-9]+", "-", image.lower()).strip("-")[:80]
    digest = hashlib.sha256(image.encode()).hexdigest()[:12]
    return location(output_root).joinpath(CATALOG_DIR, "records", f"{slug}-{digest}.json")


def record_result(
    output_root: str | os.PathLike[str],
    image: str,
    result: str | os.PathLike[str],
    *,
    source: str | None = None,
    fingerprint: Mapping[str, Any] | None = None,
) -> Path | URLPath:
    """Index a complete result under the key ``image``; replaces an older record of it.

    The statistics come from the result's metadata (class pixels, fractions, areas in µm²
    when the pixel size is known, tiles, time); ``source`` and ``fingerprint`` say which file
    it was made from.
    """
    meta = read_meta(result)
    if not meta.complete:
        raise ValueError(f"{result}: the result is not complete; only finished results go in")
    ny, nx = meta.shape
    stats: dict[str, Any] = {}  # none for a result finished without a run summary
    if (run := meta.summary) is not None:
        areas = meta.class_areas_um2
        stats = {
            "tiles_total": run.tiles_total,
            "tiles_computed": run.tiles_computed,
            "tiles_skipped": run.tiles_skipped,
            "seconds": run.seconds,
            "megapixels_per_second": run.megapixels_per_second,
            "class_pixels": list(run.class_pixels),
            "class_fraction": list(run.class_fraction),
            "class_area_um2": list(areas) if areas is not None else None,
        }
    record = {
        "version": RECORD_VERSION,
        "image": image,
        "result": str(result),
        "source": source or meta.source,
        "model": meta.model_name,
        "model_sha256": meta.model_sha256,
        "finished": meta.finished,
        "sample_sha256": (fingerprint or {}).get("sample_sha256"),
        "fingerprint": dict(fingerprint or {}),
        "pixel_size_um": meta.pixel_size_um,
        "height": ny,
        "width": nx,
        "class_names": list(meta.class_names),
        **stats,
    }
    path = record_path(output_root, image)
    write_json_atomic(path, record)
    return path


def remove_record(output_root: str | os.PathLike[str], image: str) -> None:
    """Drop ``image`` from the catalog (its result is about to be replaced)."""
    record_path(output_root, image).unlink(missing_ok=True)


def read_records(
    output_root: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Every record under ``output_root`` (a folder or an fsspec URL), sorted by image key."""
    return _records(output_root, storage_options, skip_unreadable=False)


def _records(
    output_root: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None,
    *,
    skip_unreadable: bool,
) -> list[dict[str, Any]]:
    """:func:`read_records`; ``skip_unreadable``: a record that cannot be read or is damaged
    is left out with a warning naming its file instead of raising (for views of the
    catalog that a run shows, which must not fail it: :func:`gone_images`)."""
    folder = location(output_root, storage_options).joinpath(CATALOG_DIR, "records")
    records = []
    # temporary files (".<name>.<random>.tmp") are left out
    paths: list[Path | URLPath] = sorted(folder.glob("*.json"), key=str)
    for path in paths:
        try:
            records.append(_read_record(path))
        except FileNotFoundError:  # removed while we listed
            continue
        except (ValueError, OSError) as exc:  # damaged (the cure is said), unreadable
            if not skip_unreadable:
                raise
            log.warning("%s: catalog record left out: %s", path, exc)
    return sorted(records, key=lambda r: r["image"])


def recorded_result(output_root: str | os.PathLike[str], image: str) -> str | None:
    """The result path the record of ``image`` names; None where there is no readable one
    (a damaged record stays as it is: :func:`_read_record`)."""
    try:
        result = _read_record(record_path(output_root, image)).get("result")
    except (ValueError, OSError):
        return None
    return result if isinstance(result, str) else None


def _read_record(path: Path | URLPath) -> dict[str, Any]:
    """One record file, or a ``ValueError`` naming it and what is wrong with it.

    Records are replaced whole (a rename, a PUT), never appended to, so a damaged one is no
    torn tail a killed writer leaves, to skip: it is a file damaged since (a disk, an edit).
    Skipping it would drop its image from every answer without a word, and it is never
    rewritten while it exists (a run rewrites missing records only), so it is refused, with
    the cure.
    """
    cure = "delete it, and the next run over its image writes it again"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError (its line and column), UnicodeDecodeError
        raise ValueError(f"{path}: catalog record cannot be parsed ({exc}); {cure}") from exc
    if not isinstance(record, dict) or not isinstance(record.get("image"), str):
        raise ValueError(f"{path}: catalog record with no image key; {cure}")
    if not isinstance(record.get("class_names"), list):
        raise ValueError(f"{path}: catalog record of {record['image']} has no class_names; {cure}")
    n = len(record["class_names"])
    for name, _, _ in _PER_CLASS:
        value = record.get(name)
        if value is not None and not (
            isinstance(value, list) and len(value) == n and all(map(_is_number, value))
        ):
            raise ValueError(
                f"{path}: catalog record of {record['image']} has {name} {value!r}, not "
                f"{n} numbers (one per class); {cure}"
            )
    for name, _, _ in _SCALARS:
        if (value := record.get(name)) is not None and not _is_number(value):
            raise ValueError(
                f"{path}: catalog record of {record['image']} has {name} {value!r}, not a "
                f"number; {cure}"
            )
    return record


def gone_images(
    output_root: str | os.PathLike[str],
    present: Collection[str] = (),
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """The keys of records whose source image no longer exists (renamed, moved, deleted),
    sorted; keys in ``present`` (images just found) are not looked at. Their records and
    results stay: a run never deletes a result whose image it cannot see.

    A view a run shows at its end, so it fails for no single record: a damaged or unreadable
    record is left out, and a source whose existence cannot be told (a folder that cannot be
    read, a store that refuses or does not answer) is not gone; each with a warning.
    ``storage_options`` reach both ``output_root`` and the sources.
    """
    records = [
        r
        for r in _records(output_root, storage_options, skip_unreadable=True)
        if r["image"] not in present
    ]
    exists = _sources_exist(records, storage_options)
    return [r["image"] for r, e in zip(records, exists, strict=True) if e is False]


def _sources_exist(
    records: list[dict[str, Any]], storage_options: Mapping[str, Any] | None
) -> list[bool | None]:
    """Whether each record's source exists; None where that cannot be told, said in one
    warning for all of them (a folder made unreadable holds many)."""
    states: list[bool | None] = []
    unknown: list[tuple[str, Exception]] = []
    for record in records:
        source = str(record.get("source") or "")
        try:
            states.append(bool(source) and _exists(location(source, storage_options)))
        except Exception as exc:  # a view: nothing a store or a folder raises may fail it
            states.append(None)
            unknown.append((source, exc))
    if unknown:
        (first, error), more = unknown[0], len(unknown) - 1
        log.warning(
            "cannot tell whether %s exists (%s)%s; taken as not gone",
            first,
            error,
            f", nor {more} other source(s)" if more else "",
        )
    return states


def _exists(where: Path | URLPath) -> bool:
    if isinstance(where, Path):
        return where.exists()  # False when not found; other errors (EACCES) raise
    # Not fs.exists(): fsspec's default answers False for any error, which would read "gone".
    fs, path = where.filesystem()
    try:
        fs.info(path)
    except FileNotFoundError:
        return False
    return True


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def open_catalog(
    output_root: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    check_sources: bool = False,
) -> xr.Dataset:
    """The catalog as a Dataset with dimensions ``image`` (keys) and ``class`` (names).

    Variables: per image ``pixel_size_um``, ``height``/``width`` (pixels), tile counts,
    ``seconds``, ``megapixels_per_second`` and the strings ``result``, ``source``, ``model``,
    ``model_sha256``, ``finished``, ``sample_sha256``; per image and class ``class_pixels``,
    ``class_fraction`` and ``class_area_um2``. Results made by models with other classes share
    the union of class names; a class a model lacks reads 0 pixels and NaN fraction and area.
    An empty catalog has ``image`` of size 0. ``storage_options`` are fsspec's for an
    ``output_root`` that is a URL (``s3://bucket/segpipe``).

    ``check_sources``: also the bool ``source_exists``, False for an image renamed, moved or
    deleted since (its record and result stay; :func:`gone_images` lists them). It looks at
    every record's source, a request each where they are URLs (reached with
    ``storage_options`` too), so only when asked; a source that cannot be looked at (a folder
    that cannot be read, a store that refuses) reads True, not known to be gone, with a
    warning, and never fails the call.
    """
    records = read_records(output_root, storage_options)
    classes: list[str] = []
    for r in records:
        classes += [c for c in r["class_names"] if c not in classes]
    n, c = len(records), len(classes)
    data: dict[str, Any] = {}
    for name, dtype, fill in _SCALARS:
        values = np.full(n, fill, dtype=dtype)
        for i, r in enumerate(records):
            if r.get(name) is not None:
                values[i] = r[name]
        data[name] = (("image",), values)
    for name in _STRINGS:
        data[name] = (("image",), np.array([str(r.get(name) or "") for r in records], object))
    if check_sources:
        exists = [e is not False for e in _sources_exist(records, storage_options)]
        data["source_exists"] = (("image",), np.array(exists, dtype=bool))
    for name, dtype, fill in _PER_CLASS:
        values = np.full((n, c), fill, dtype=dtype)
        for i, r in enumerate(records):
            if r.get(name) is None:
                continue
            for cls, v in zip(r["class_names"], r[name], strict=True):
                values[i, classes.index(cls)] = v
        data[name] = (("image", "class"), values)
    ds = xr.Dataset(
        data,
        coords={
            "image": ("image", np.array([r["image"] for r in records], dtype=object)),
            "class": ("class", np.array(classes, dtype=object)),
        },
        attrs={"output_root": str(output_root)},
    )
    ds["class_area_um2"].attrs["units"] = "µm²"
    ds["pixel_size_um"].attrs["units"] = "µm"
    return ds
