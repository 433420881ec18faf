"""What wsidicom reads of a DICOM WSI series wrongly or with a misleading error, refused
from the headers (no pixel data read), naming the file:

- pixels it does not decode (MONOCHROME1, YCbCr or palette uncompressed, colour planes one
  after another, signed values, fewer bits stored than allocated uncompressed), which it
  passes over without a word (its error is then that the series has no level) or reads
  with a length error;
- TILED_SPARSE frames off the tile grid or at one position, which it snaps to the tile
  they fall in, one over another;
- a concatenation (a level split over files) with a part missing, whose frames it reads
  as blank (TILED_SPARSE) or fails on at the first read that needs them (TILED_FULL);
- a JPEG frame larger than its tiles or cut short, refused as it is read
  (:func:`guard_jpeg_frames`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from segpipe.io.readers.base import ImageReadError
from segpipe.io.readers.jpeg_streams import jpeg_ends_whole, jpeg_frame_size

if TYPE_CHECKING:
    from segpipe.io.readers.dicom_series import DicomInstance

__all__ = [
    "PIXEL_TAGS",
    "guard_jpeg_frames",
    "pixel_problem",
    "refuse_broken_concatenations",
    "refuse_unreadable_pixels",
    "sparse_frame_problem",
]

# The header elements pixel_problem reads, beside PhotometricInterpretation and BitsStored
PIXEL_TAGS = ("PlanarConfiguration", "PixelRepresentation", "BitsAllocated")
_TO_OME_TIFF = "or convert the slide to OME-TIFF"


def pixel_problem(ds: Any) -> str:
    """Why wsidicom cannot read the pixels of ``ds`` (a header, file meta included), as
    the rest of a sentence that names the file; empty when it can."""
    from pydicom.uid import UncompressedTransferSyntaxes

    photometric = str(ds.get("PhotometricInterpretation", ""))
    native = ds.file_meta.get("TransferSyntaxUID") in UncompressedTransferSyntaxes
    stored, allocated = ds.get("BitsStored"), ds.get("BitsAllocated")
    if photometric == "MONOCHROME1":
        return (
            "PhotometricInterpretation MONOCHROME1 (grey, white at 0), which wsidicom does "
            "not read (the DICOM WSI IOD takes MONOCHROME2 for grey); rewrite the files as "
            "MONOCHROME2, each value v as 2**BitsStored - 1 - v (e.g. with pydicom), "
            f"{_TO_OME_TIFF}"
        )
    # Uncompressed, wsidicom hands the bytes on as they are: RGB or grey.
    if native and photometric not in ("RGB", "MONOCHROME2"):
        return (
            f"PhotometricInterpretation {photometric} uncompressed, which wsidicom does not "
            "read (it reads uncompressed pixels as RGB or MONOCHROME2 only); rewrite the "
            f"pixels as RGB (e.g. with pydicom), {_TO_OME_TIFF}"
        )
    if ds.get("PlanarConfiguration") == 1:
        return (
            "PlanarConfiguration 1 (each colour's plane after another), which wsidicom "
            "does not read; rewrite the pixels with colours interleaved (PlanarConfiguration "
            f"0, e.g. with pydicom), {_TO_OME_TIFF}"
        )
    if ds.get("PixelRepresentation") == 1:
        return (
            "PixelRepresentation 1 (signed values), which wsidicom does not read; rewrite "
            f"the pixels unsigned (e.g. with pydicom), {_TO_OME_TIFF}"
        )
    if native and stored is not None and allocated is not None and stored != allocated:
        return (
            f"BitsStored {stored} of BitsAllocated {allocated} uncompressed, which wsidicom "
            f"does not read; rewrite the pixels with BitsStored {allocated}, each value "
            f"masked to its {stored} bits (e.g. with pydicom), {_TO_OME_TIFF}"
        )
    return ""


def sparse_frame_problem(frames: Any, tile: tuple[int, int]) -> str:
    """What of a TILED_SPARSE file's frames (its PerFrameFunctionalGroupsSequence) wsidicom
    would misplace, as the rest of a sentence that names the file: a frame off the grid of
    ``tile`` (Rows, Columns) pixels, which it reads at the tile it falls in, or two frames
    at one position (optical path and z too), of which it keeps one; empty when none."""
    rows, columns = tile
    seen: dict[tuple[Any, ...], int] = {}
    for number, item in enumerate(frames or (), 1):  # frames are numbered from 1
        plane = item.get("PlanePositionSlideSequence")
        if not plane:
            continue  # wsidicom refuses the frame for it
        x = int(plane[0].ColumnPositionInTotalImagePixelMatrix)
        y = int(plane[0].RowPositionInTotalImagePixelMatrix)
        where = f"column {x}, row {y}"
        if (x - 1) % columns or (y - 1) % rows:
            return (
                f"frame {number} states {where} (its Plane Position (Slide)), off the tile "
                f"grid of {columns} x {rows} px (X x Y) frames, which wsidicom would read at "
                "the tile it falls in; rewrite the frames at tiles' corners (1 + a multiple "
                f"of Columns and Rows, e.g. with pydicom), {_TO_OME_TIFF}"
            )
        path = item.get("OpticalPathIdentificationSequence")
        key = (
            str(path[0].get("OpticalPathIdentifier", "")) if path else None,
            plane[0].get("ZOffsetInSlideCoordinateSystem"),
            x,
            y,
        )
        if key in seen:
            return (
                f"frames {seen[key]} and {number} state one position ({where}, and one "
                "optical path and z), of which wsidicom would read one; remove the frame "
                f"that is no part of the slide (e.g. with pydicom), {_TO_OME_TIFF}"
            )
        seen[key] = number
    return ""


def _listing(files: list[Path]) -> str:
    """``files`` as the first's path, then the others' names: ``"/s/a.dcm, b.dcm and c.dcm"``."""
    more = "".join(f", {f.name}" for f in files[1:-1])
    return f"{files[0]}{more}" + (f" and {files[-1].name}" if files[1:] else "")


def refuse_unreadable_pixels(instances: list[DicomInstance]) -> None:
    """Refuse level files whose pixels wsidicom cannot read (:func:`pixel_problem`),
    naming them; where files differ in why, those of the first file's reason."""
    unreadable = [i for i in instances if i.image_type == "VOLUME" and i.pixel_problem]
    if unreadable:
        problem = unreadable[0].pixel_problem
        files = [i.path for i in unreadable if i.pixel_problem == problem]
        raise ImageReadError(f"{_listing(files)}: {problem}")


def refuse_broken_concatenations(instances: list[DicomInstance]) -> None:
    """Refuse a concatenation (one image's frames split over files) whose parts are not all
    in the series, naming a part there and the parts missing. Without an
    InConcatenationTotalNumber, only parts missing before the last one there are seen."""
    parts: dict[str, list[tuple[Path, int | None, int | None]]] = {}
    for i in instances:
        if i.concatenation is not None:
            uid, number, total = i.concatenation
            parts.setdefault(uid, []).append((i.path, number, total))
    for uid, there in parts.items():
        numbers = {number for _, number, _ in there if number is not None}
        totals = [total for _, _, total in there if total is not None]
        last = max(totals, default=max(numbers, default=0))
        missing = sorted(set(range(1, last + 1)) - numbers)
        if missing:
            path, number, _ = min(there, key=lambda part: part[0])
            raise ImageReadError(
                f"{path}: part {number} of a DICOM concatenation of {last} files "
                f"(ConcatenationUID {uid}), whose part(s) {', '.join(map(str, missing))} "
                "are not in the series: their frames would be read blank or fail at a read; "
                "copy the missing parts in beside it, or move the parts there out of the "
                "folder if the image is no part of the slide"
            )


def guard_jpeg_frames(slide: Any, path: str) -> None:
    """Make every image of ``slide`` (a wsidicom series, open) refuse, before decoding, a JPEG
    frame larger than its tiles or cut short: wsidicom decodes either into made-up pixels (a
    larger frame cut down, a short one's rest filled in) and allocates the size a frame states
    (20,000² px took 1.1 GiB). The TIFF reader checks its tiles so too
    (:func:`~segpipe.io.readers.tiff_checks.guard_jpeg_frames`)."""
    for pyramid in slide.pyramids:
        for level in pyramid:
            for instance in level.instances.values():
                _guard_frames(instance.image_data, path)


def _guard_frames(data: Any, path: str) -> None:
    # Every read of an encoded frame, whether decoded alone, in a batch or from wsidicom's
    # caches, goes through the image data's _get_tile_frame.
    frame = data._get_tile_frame
    if getattr(frame, "_guards_jpeg_frames", False):
        return
    tile = (int(data.tile_size.height), int(data.tile_size.width))

    def checked(index: int) -> bytes:
        stream = frame(index)
        stated = jpeg_frame_size(bytes(stream))  # None: not a JPEG stream (JPEG 2000, raw)
        if stated is None:
            return stream
        where = f"{path}: frame {index} of the level of {tile[1]} x {tile[0]} px tiles"
        if stated[0] > tile[0] or stated[1] > tile[1]:
            raise ImageReadError(
                f"{where} states {stated[1]} x {stated[0]} px in its JPEG stream: the stream "
                "or the file's Rows/Columns are damaged"
            )
        if not jpeg_ends_whole(stream):
            raise ImageReadError(
                f"{where}: its JPEG stream ({len(stream):,} bytes) has no end-of-image "
                "marker: it is cut short"
            )
        return stream

    checked._guards_jpeg_frames = True  # type: ignore[attr-defined]
    data._get_tile_frame = checked
