"""Archives of images segmented on a schedule: discover, fingerprint, decide, claim, process.

An *archive* is a folder (or an fsspec URL: ``s3://bucket/scans``, ``memory://...``) that a
scanner or an imagery feed fills. Every image in it gets a *key*, its path relative to the
archive root (``"2026-11-25/slide-0001.svs"``), and everything segpipe writes about it lies
under ``output_root`` at paths derived from that key alone::

    output_root/
        <key>.seg.zarr      the result store (segpipe.results)
        <key>.seg.json      state sidecar: fingerprint, model sha256, parameters, status
        <key>.report.md     per-image report (segpipe.archive.reports)
        <key>.thumb.png     mask over the image, small
        <key>.lock          claim held while one run processes the image
        _catalog/           one record per result (segpipe.archive.catalog)

An image is segmented again only when its fingerprint (size, mtime, sampled content hash), the
model's sha256 or the result settings of its ``SegmentConfig`` differ from the sidecar's, or its
result is not complete; execution settings (batch size, device, workers) never count.
Two runs over the same archive never process an image at once: each claims the image with an
atomically created lock file first (:func:`segpipe.archive.claims.try_claim`).

>>> images = discover_images("/data/scans")  # doctest: +SKIP
>>> outcome = process_image(images[0], "/data/segpipe", "tissue-unet")  # doctest: +SKIP
>>> outcome.status, outcome.reason  # doctest: +SKIP
('segmented', 'new image')
"""

from __future__ import annotations

from segpipe.archive.checks import check_output_root, check_run_inputs
from segpipe.archive.claims import Claim, ClaimLostError, try_claim
from segpipe.archive.discover import (
    ArchiveImage,
    Fingerprint,
    discover_images,
    fingerprint_image,
)
from segpipe.archive.process import LoadedModel, RunStopped, load_model, process_image
from segpipe.archive.sidecars import killed_last
from segpipe.archive.state import (
    Decision,
    ImageOutcome,
    ImagePaths,
    SourceConflictError,
    decide,
    image_paths,
    read_state,
)
from segpipe.io.readers import IMAGE_SUFFIXES

__all__ = [
    "IMAGE_SUFFIXES",
    "ArchiveImage",
    "Claim",
    "ClaimLostError",
    "Decision",
    "Fingerprint",
    "ImageOutcome",
    "ImagePaths",
    "LoadedModel",
    "RunStopped",
    "SourceConflictError",
    "check_output_root",
    "check_run_inputs",
    "decide",
    "discover_images",
    "fingerprint_image",
    "image_paths",
    "killed_last",
    "load_model",
    "process_image",
    "read_state",
    "try_claim",
]
