"""Archives of images segmented on a schedule: discover, fingerprint, decide, claim, process.

An *archive* is a folder (or an fsspec URL: ``s3://bucket/scans``, ``memory://...``) that a
scanner or an imagery feed fills. Every image in it gets a *key*, its path relative to the
archive root (``"2026-11-25/slide-0001.svs"``), and everything segpipe writes about it lies
under ``output_root`` at paths derived from that key alone::

    output_root/
        <key>.seg.zarr      the result store (segpipe.results)
        <key>.seg.json      state sidecar: fingerprint, model sha256, parameters, status
        <key>.report.md     per-image report (segpipe.reports)
        <key>.thumb.png     mask over the image, small
        <key>.lock          claim held while one run processes the image
        _catalog/           one record per result (segpipe.catalog)

An image is segmented again only when its fingerprint (size, mtime, sampled content hash), the
model's sha256 or the parameters differ from the sidecar's, or its result is not complete.
Two runs over the same archive never process an image at once: each claims the image with an
atomically created lock file first (:func:`segpipe.claims.try_claim`).

>>> images = discover_images("/data/scans")  # doctest: +SKIP
>>> outcome = process_image(images[0], "/data/segpipe", "tissue-unet")  # doctest: +SKIP
>>> outcome.status, outcome.reason  # doctest: +SKIP
('segmented', 'new image')
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from segpipe.claims import Claim, ClaimLostError, _now, read_lock, try_claim
from segpipe.readers import PILLOW_SUFFIXES, TIFF_SUFFIXES
from segpipe.results import is_complete, read_meta

__all__ = [
    "IMAGE_SUFFIXES",
    "ArchiveImage",
    "Claim",
    "ClaimLostError",
    "Decision",
    "Fingerprint",
    "ImageOutcome",
    "ImagePaths",
    "SegmentParams",
    "decide",
    "discover_images",
    "fingerprint_image",
    "image_paths",
    "model_sha256",
    "process_image",
    "read_state",
    "try_claim",
]

log = logging.getLogger("segpipe.archive")

IMAGE_SUFFIXES = TIFF_SUFFIXES + PILLOW_SUFFIXES
STATE_VERSION = 1

# Sampled-content hash: the first and last blocks hold a TIFF's header and (often, for BigTIFF
# and SVS) its IFDs; the blocks between catch re-scans that keep the size.
_SAMPLE_BLOCKS = 4
_SAMPLE_BLOCK_BYTES = 64 * 1024


# ------------------------------------------------------------------------------------------
# Discovery and fingerprints
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveImage:
    """One image found in an archive.

    Attributes
    ----------
    url
        What opens it: a local path, or an fsspec URL (``s3://bucket/scans/a.svs``).
    key
        Its path relative to the archive root, ``/``-separated; names its outputs.
    size
        Bytes.
    mtime
        Modification time, seconds since the epoch (as the file system reports it).
    """

    url: str
    key: str
    size: int
    mtime: float

    @property
    def is_local(self) -> bool:
        return "://" not in self.url


@dataclass(frozen=True)
class Fingerprint:
    """Cheap content identity: size, mtime and a SHA-256 of a few sampled blocks.

    All three must match for an image to count as unchanged, so a touched or rewritten file is
    segmented again even when the sampled blocks happen to agree.
    """

    size: int
    mtime: float
    sample_sha256: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def discover_images(
    source: str | os.PathLike[str],
    *,
    pattern: str = "*",
    suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
    min_age_s: float = 0.0,
    exclude: str | os.PathLike[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[ArchiveImage]:
    """Images under ``source``, sorted by key.

    Parameters
    ----------
    source
        A local folder or an fsspec URL of one (``s3://bucket/scans``); listed recursively.
    pattern
        ``fnmatch`` pattern over the key (the path relative to ``source``); ``*`` also crosses
        folders, so ``"2026-*/*.svs"`` and ``"*.svs"`` both reach nested files.
    suffixes
        File name endings to keep (case-insensitive); default every format segpipe reads
        from a single file (Zarr stores are directories and are not discovered).
    min_age_s
        Leave out files modified less than this many seconds ago: a scanner may still be
        writing them.
    exclude
        A folder to leave out, e.g. ``output_root`` when it lies inside the archive (its
        thumbnails are PNGs).
    storage_options
        Passed to fsspec for remote URLs (credentials, endpoint).

    Hidden files and folders (a name starting with ``.``) are ignored.
    """
    fs, root = _filesystem(str(source), storage_options)
    if not fs.isdir(root):
        raise FileNotFoundError(f"archive {source}: no such folder (or bucket prefix)")
    root = root.rstrip("/")
    skip = _filesystem(str(exclude), storage_options)[1].rstrip("/") + "/" if exclude else None
    now = time.time()
    found = []
    for path, info in fs.find(root, detail=True).items():
        if info.get("type") != "file" or (skip and path.startswith(skip)):
            continue
        key = str(PurePosixPath(path).relative_to(root))
        if any(part.startswith(".") for part in key.split("/")):
            continue
        if not key.lower().endswith(tuple(s.lower() for s in suffixes)):
            continue
        if not fnmatch.fnmatch(key, pattern):
            continue
        mtime = _mtime(info)
        if min_age_s and now - mtime < min_age_s:
            log.info("%s: modified %.0f s ago, left for a later run", key, now - mtime)
            continue
        url = path if _is_local(fs) else fs.unstrip_protocol(path)
        found.append(ArchiveImage(url=url, key=key, size=int(info["size"]), mtime=mtime))
    return sorted(found, key=lambda image: image.key)


def fingerprint_image(
    image: ArchiveImage,
    *,
    blocks: int = _SAMPLE_BLOCKS,
    block_bytes: int = _SAMPLE_BLOCK_BYTES,
    storage_options: Mapping[str, Any] | None = None,
) -> Fingerprint:
    """The image's :class:`Fingerprint`, reading at most ``blocks * block_bytes`` bytes.

    Size and mtime are read again (not taken from discovery), so a file replaced since it was
    listed gets its new identity.
    """
    fs, path = _filesystem(image.url, storage_options)
    info = fs.info(path)
    size = int(info["size"])
    h = hashlib.sha256(f"{size}\n".encode())
    if size <= blocks * block_bytes:
        h.update(fs.cat_file(path))
    else:
        step = (size - block_bytes) / (blocks - 1)
        for i in range(blocks):
            start = round(i * step)
            h.update(fs.cat_file(path, start=start, end=start + block_bytes))
    return Fingerprint(size=size, mtime=_mtime(info), sample_sha256=h.hexdigest())


def model_sha256(model: str | os.PathLike[str]) -> str:
    """SHA-256 of a shipped model (by name) or checkpoint, as results record it."""
    from segpipe import models

    return models.fingerprint(models.load(model))


def _filesystem(url: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url, **dict(storage_options or {}))


def _is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol


def _mtime(info: Mapping[str, Any]) -> float:
    # Local: "mtime"; memory: "created"; s3/gcs: "LastModified"/"updated" (datetime or str).
    for name in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(name)
        if value is None:
            continue
        if isinstance(value, dt.datetime):
            return value.timestamp()
        if isinstance(value, str):
            return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        return float(value)
    return 0.0


# ------------------------------------------------------------------------------------------
# Where outputs go, and whether an image needs segmenting
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentParams:
    """The :func:`segpipe.segment` knobs that change the numbers of a result.

    A change in any of them makes every image due again. Execution knobs (device, scheduler,
    workers, batch size) do not change the numbers and travel separately.
    """

    tile: int = 512
    mode: Literal["exact", "blend"] = "exact"
    level: int = 0
    pixel_size_um: float | None = None
    probability_dtype: str = "float16"
    window: int | None = None
    overlap: float = 0.25
    sigma_scale: float = 0.125

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ImagePaths:
    """Everything segpipe writes for one image, derived from its key (see the module doc)."""

    result: Path
    state: Path
    report: Path
    thumbnail: Path
    lock: Path


def image_paths(output_root: str | os.PathLike[str], key: str) -> ImagePaths:
    """Output paths of the image ``key`` (its path relative to the archive root).

    >>> image_paths("/out", "day-1/a.svs").result.as_posix()
    '/out/day-1/a.svs.seg.zarr'
    """
    parts = PurePosixPath(key).parts
    if not parts or PurePosixPath(key).is_absolute() or ".." in parts:
        raise ValueError(f"image key {key!r} must be a relative path without '..'")
    base = Path(output_root, *parts)
    # The full file name stays in the stem: a.tif and a.svs side by side get two results.
    return ImagePaths(
        result=base.with_name(base.name + ".seg.zarr"),
        state=base.with_name(base.name + ".seg.json"),
        report=base.with_name(base.name + ".report.md"),
        thumbnail=base.with_name(base.name + ".thumb.png"),
        lock=base.with_name(base.name + ".lock"),
    )


@dataclass(frozen=True)
class Decision:
    """Whether an image needs segmenting, and why; ``resume`` keeps an unfinished result."""

    process: bool
    reason: str
    resume: bool = False


def read_state(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The state sidecar of an image (``ImagePaths.state``), None when there is none."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError:
        log.warning("%s: unreadable state sidecar, treating the image as new", path)
        return None


def decide(
    paths: ImagePaths, fingerprint: Fingerprint, model_sha: str, params: SegmentParams
) -> Decision:
    """Skip an image whose complete result was made from the same fingerprint, model and
    parameters; otherwise say why it is due, resuming an unfinished run of the same inputs."""
    state = read_state(paths.state)
    if state is None:
        return Decision(True, "new image")
    changes = [
        what
        for what, old, new in (
            ("image changed", state.get("fingerprint"), fingerprint.as_dict()),
            ("model changed", state.get("model_sha256"), model_sha),
            ("parameters changed", state.get("params"), params.as_dict()),
        )
        if old != new
    ]
    if changes:
        return Decision(True, ", ".join(changes))
    previous = state.get("status", "unfinished")
    complete = is_complete(paths.result)
    if complete and previous == "complete":
        if read_meta(paths.result).get("model_sha256") == model_sha:
            return Decision(False, "up to date")
        return Decision(True, "result made by another model")
    if paths.result.exists():
        return Decision(True, f"previous run {previous}: resuming", resume=True)
    return Decision(
        True, f"previous run {previous}" if previous != "complete" else "result missing"
    )


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON atomically: readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------------------
# One image, start to finish
# ------------------------------------------------------------------------------------------

Status = Literal["segmented", "skipped", "busy", "failed"]


@dataclass(frozen=True)
class ImageOutcome:
    """What a run did with one image, for the run's table and logs."""

    image: str  # key
    status: Status
    reason: str
    result: str | None = None
    report: str | None = None
    thumbnail: str | None = None
    tiles_computed: int | None = None
    tiles_skipped: int | None = None
    seconds: float | None = None
    megapixels_per_second: float | None = None

    @classmethod
    def failure(cls, image: str, error: BaseException) -> ImageOutcome:
        """A failed image, its reason the exception type and message."""
        return cls(image=image, status="failed", reason=f"{type(error).__name__}: {error}")

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


SegmentFn = Callable[..., Any]


def process_image(
    image: ArchiveImage,
    output_root: str | os.PathLike[str],
    model: str | os.PathLike[str] = "tissue-unet",
    *,
    params: SegmentParams | None = None,
    model_sha: str | None = None,
    segment_options: Mapping[str, Any] | None = None,
    owner: str | None = None,
    ttl_s: float = 600.0,
    storage_options: Mapping[str, Any] | None = None,
    run_segment: SegmentFn | None = None,
) -> ImageOutcome:
    """Fingerprint, decide, claim, segment, report and catalog one image.

    Parameters
    ----------
    image
        From :func:`discover_images`.
    output_root
        Where results, reports and the catalog go.
    model
        A shipped model's name or a checkpoint path.
    params
        Parameters that shape the result (default :class:`SegmentParams()`).
    model_sha
        The model's sha256 when the caller computed it once for many images.
    segment_options
        Execution options for :func:`segpipe.segment` (``device``, ``scheduler``,
        ``n_workers``, ``batch_size``, ``on_progress``).
    owner, ttl_s
        The claim's owner label and staleness timeout (:func:`try_claim`).
    storage_options
        fsspec options for a remote archive.
    run_segment
        Called as ``run_segment(source, output, model, **params, **segment_options)``;
        default :func:`segpipe.segment`. Flows pass a Prefect task here, for its retries.

    Returns
    -------
    ImageOutcome
        ``segmented``, ``skipped`` (up to date) or ``busy`` (another run holds the claim).

    Raises
    ------
    Exception
        Whatever segmenting raised (e.g. :class:`~segpipe.readers.ImageReadError` naming a
        corrupt file), after the failure is written to the state sidecar and the claim is
        released.
    """
    from segpipe import catalog, reports

    params = params or SegmentParams()
    model_sha = model_sha or model_sha256(model)
    paths = image_paths(output_root, image.key)
    fingerprint = fingerprint_image(image, storage_options=storage_options)
    decision = decide(paths, fingerprint, model_sha, params)
    if not decision.process:
        if not catalog.record_path(output_root, image.key).exists():
            # e.g. the catalog folder was deleted: index the result again, no claim needed
            catalog.record_result(
                output_root,
                image.key,
                paths.result,
                source=image.url,
                fingerprint=fingerprint.as_dict(),
            )
        return _skipped(image.key, paths, decision.reason)
    claim = try_claim(paths.lock, owner=owner, ttl_s=ttl_s)
    if claim is None:
        holder = (read_lock(paths.lock) or {}).get("owner", "another run")
        return ImageOutcome(image.key, "busy", f"claimed by {holder}")
    with claim:
        # Decide again under the claim: another run may have finished it since.
        decision = decide(paths, fingerprint, model_sha, params)
        if not decision.process:
            return _skipped(image.key, paths, decision.reason)
        log.info("%s: segmenting (%s)", image.key, decision.reason)
        if not decision.resume:
            catalog.remove_record(output_root, image.key)
            _remove_result(paths.result)
        state = {
            "version": STATE_VERSION,
            "image": image.key,
            "source": image.url,
            "fingerprint": fingerprint.as_dict(),
            "model": str(model),
            "model_sha256": model_sha,
            "params": params.as_dict(),
            "status": "running",
            "owner": claim.owner,
            "updated": _now(),
        }
        _write_json(paths.state, state)
        segment = run_segment or _library_segment()
        try:
            with _local_copy(image, output_root, storage_options) as local:
                segment(local, paths.result, model, **params.as_dict(), **(segment_options or {}))
                claim.check()
                reports.write_thumbnail(local, paths.result, paths.thumbnail, level=params.level)
        except BaseException as exc:
            if claim.is_held():
                _write_json(
                    paths.state,
                    state | {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"},
                )
            raise
        claim.check()
        text = reports.image_report(paths.result, image=image.key, thumbnail=paths.thumbnail)
        paths.report.write_text(text, encoding="utf-8")
        catalog.record_result(
            output_root,
            image.key,
            paths.result,
            source=image.url,
            fingerprint=fingerprint.as_dict(),
        )
        _write_json(paths.state, state | {"status": "complete", "updated": _now()})
    return _from_result(image.key, paths, "segmented", decision.reason)


def _library_segment() -> SegmentFn:
    from segpipe.api import segment  # torch loads here, not when the archive is listed

    return segment


def _skipped(key: str, paths: ImagePaths, reason: str) -> ImageOutcome:
    outcome = _from_result(key, paths, "skipped", reason)
    # A skipped image computed nothing in this run, whatever its result once took.
    return replace(outcome, tiles_computed=0, seconds=0.0, megapixels_per_second=None)


def _from_result(key: str, paths: ImagePaths, status: Status, reason: str) -> ImageOutcome:
    meta = read_meta(paths.result)
    return ImageOutcome(
        image=key,
        status=status,
        reason=reason,
        result=str(paths.result),
        report=str(paths.report) if paths.report.exists() else None,
        thumbnail=str(paths.thumbnail) if paths.thumbnail.exists() else None,
        tiles_computed=meta.get("tiles_computed"),
        tiles_skipped=meta.get("tiles_skipped"),
        seconds=meta.get("seconds"),
        megapixels_per_second=meta.get("megapixels_per_second"),
    )


def _remove_result(result: Path) -> None:
    """Delete a stale result of older inputs; refuse anything that is not a segpipe result."""
    if not result.exists():
        return
    try:
        read_meta(result)
    except (FileNotFoundError, ValueError) as exc:
        raise FileExistsError(
            f"{result} exists and is not a segpipe result; move it away, segpipe will not delete it"
        ) from exc
    shutil.rmtree(result)


@contextlib.contextmanager
def _local_copy(
    image: ArchiveImage,
    output_root: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None,
) -> Iterator[str]:
    """A local path of the image: itself, or a download of a remote one, removed after.

    The download's path depends on the key alone: the result records its source path, and a
    resumed run must present the same one.
    """
    if image.is_local:
        yield image.url
        return
    fs, path = _filesystem(image.url, storage_options)
    local = Path(output_root, "_staging", *PurePosixPath(image.key).parts)
    local.parent.mkdir(parents=True, exist_ok=True)
    fs.get_file(path, str(local))
    try:
        yield str(local)
    finally:
        local.unlink(missing_ok=True)
