"""The files of a DICOM whole-slide series, from their headers alone (no pixel data read):
which files are DICOM, which make one slide, and which of wsidicom's pyramids of them
:class:`~segpipe.io.readers.dicom.DicomReader` reads.

wsidicom groups a series' levels into pyramids by their place on the slide (and depth of
field); of several, the one of the most base-level pixels is read and the others are warned
of, as the TIFF reader does with a file of several images. A level file wsidicom places in
no pyramid is refused, naming it, where a level read has its pixel spacing (wsidicom keeps
one image a level: the pyramid read could mix two images); else (a codec wsidicom does not
decode) the slide is read without it, with a warning naming it. Files wsidicom would read
wrongly, or refuse with a misleading error, are refused naming them
(:mod:`segpipe.io.readers.dicom_checks`), as are files that start as DICOM files do but
whose header is damaged (wsidicom passes over those without a word). Level files beside a
file opened that are of its slide (study, frame of reference and container) but of another
series, as a garbled SeriesInstanceUID makes one, are left out with a warning naming them.
"""

from __future__ import annotations

import itertools
import math
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.io.files import file_state
from segpipe.io.readers.base import DECODE_ERRORS, ImageReadError
from segpipe.io.readers.dicom_checks import PIXEL_TAGS, pixel_problem, sparse_frame_problem

__all__ = [
    "DICOM_SUFFIXES",
    "DicomInstance",
    "error_text",
    "header_errors",
    "is_dicom_file",
    "is_dicom_folder",
    "main_pyramid",
    "refuse_misplaced_frames",
    "series_instances",
]

DICOM_SUFFIXES = (".dcm",)
# Files of a folder without ``.dcm`` names that is_dicom_folder opens: a DICOM folder holds
# little else, and a large folder of other files must not be read through to say no.
_SNIFFED_FILES = 4


def is_dicom_file(path: Path) -> bool:
    """Whether ``path`` is a local file that starts as DICOM files do: ``b"DICM"`` after the
    128-byte preamble (its first 132 bytes read)."""
    try:
        with path.open("rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_dicom_folder(path: Path) -> bool:
    """Whether ``path`` is a local folder (no Zarr store) holding ``.dcm`` files or, as DICOM
    media name them, files without extension of which one of the first few is DICOM."""
    if not path.is_dir() or (path / "zarr.json").exists():
        return False
    entries = sorted(path.iterdir())
    if any(p.suffix.lower() in DICOM_SUFFIXES for p in entries):
        return True
    files = (p for p in entries if p.is_file())
    return any(is_dicom_file(p) for p in itertools.islice(files, _SNIFFED_FILES))


@dataclass(frozen=True)
class DicomInstance:
    """What one DICOM WSI file's header says about the slide it belongs to."""

    path: Path
    series_uid: str
    instance_uid: str  # SOPInstanceUID
    image_type: str  # ImageType value 3: VOLUME (a pyramid level), LABEL, OVERVIEW, THUMBNAIL
    photometric: str  # PhotometricInterpretation
    shape: tuple[int, int]  # (Y, X) pixels of its total pixel matrix
    optical_paths: tuple[tuple[str, str | None], ...]  # (identifier, description) each
    spacing: float | None = None  # mm between rows (shared PixelMeasures' PixelSpacing)
    # The slide apart from the series: StudyInstanceUID, FrameOfReferenceUID (the slide's
    # coordinates) and ContainerIdentifier (the slide's label); None where not stated.
    slide: tuple[str, str | None, str | None] = ("", None, None)
    pixel_problem: str = ""  # why wsidicom cannot read its pixels (dicom_checks)
    # ConcatenationUID, InConcatenationNumber, InConcatenationTotalNumber: a part of an
    # image split over files; None where it is a whole one
    concatenation: tuple[str, int | None, int | None] | None = None
    state: tuple[int, ...] | None = None  # file_state as its header was read
    is_sparse: bool = False  # DimensionOrganizationType TILED_SPARSE: frames placed per frame
    tile: tuple[int, int] = (0, 0)  # (Rows, Columns): a frame's pixels


_SHARED = "SharedFunctionalGroupsSequence"
_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_SIZES = ("Rows", "Columns", "TotalPixelMatrixRows", "TotalPixelMatrixColumns")
# What wsidicom reads of every WSI file it opens (its WsiDataset.REQUIRED_ATTRIBUTES): it
# leaves a file that lacks one out with no more than a log line, so a damaged base level
# would have the slide read at its next level, at twice the pixel size.
_REQUIRED = (
    *_UIDS,
    *_SIZES,
    "ImageType",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsStored",
)
# What identifies the slide beside the study, read to find levels of it in another series
_SLIDE = ("FrameOfReferenceUID", "ContainerIdentifier")
# Read beside those: the file's kind, where it is on the slide, how its frames are laid out
_MORE = (
    "SOPClassUID",
    "OpticalPathSequence",
    _SHARED,
    "DimensionOrganizationType",
    "ConcatenationUID",
    "InConcatenationNumber",
    "InConcatenationTotalNumber",
)
_PER_FRAME = "PerFrameFunctionalGroupsSequence"
# ImageType value 3 as the WSI IOD defines it
_KINDS = ("VOLUME", "LABEL", "OVERVIEW", "THUMBNAIL", "LOCALIZER")
# The characters of a UID (VR UI); a non-conformant one (leading zeros) is still of these
_UID = re.compile(r"[0-9.]+")


def _row_spacing(ds: Any) -> float | None:
    """The shared PixelMeasures' PixelSpacing between rows (mm), None where not stated."""
    try:
        value = float(ds.get(_SHARED)[0].PixelMeasuresSequence[0].PixelSpacing[0])
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None
    return value if value > 0 else None


def header_errors() -> tuple[type[Exception], ...]:
    """What pydicom raises parsing a damaged header: its own errors, struct's (a value's
    length unpacked from a short read) and DECODE_ERRORS."""
    from pydicom.errors import BytesLengthException, InvalidDicomError

    return (InvalidDicomError, BytesLengthException, *DECODE_ERRORS)


def error_text(exc: Exception) -> str:
    """``exc`` as ``"Name: message"``, struct's ``error`` as ``struct.error``."""
    name = "struct.error" if isinstance(exc, struct.error) else type(exc).__name__
    return f"{name}: {exc}"


def _damaged(path: Path, problem: str) -> ImageReadError:
    return ImageReadError(
        f"{path}: a damaged DICOM header ({problem}); move it out of the slide's folder if it "
        "is no part of the slide"
    )


class _ReadsWithinTheFile:
    """A binary file (``size`` bytes) whose ``read(n)`` asks for no more than the bytes left.

    pydicom reads an element's value in one ``read`` of the length its header states, and a
    read allocates what it asks for before it reads: a damaged length of 0xFFFFFFF0 took 4 GiB
    (a MemoryError under an address-space limit) for a header of a few hundred bytes. Read so,
    the header parses as the file holds it, and is refused for what it lacks."""

    def __init__(self, file: Any, size: int) -> None:
        self._file, self._size = file, size

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            return bytes(self._file.read())
        return bytes(self._file.read(min(n, max(0, self._size - self._file.tell()))))

    def __getattr__(self, name: str) -> Any:  # seek, tell, name: the file's own
        return getattr(self._file, name)


def read_instance(path: Path) -> DicomInstance | None:
    """The header of ``path`` (no pixel data read) when it is a DICOM VL Whole Slide
    Microscopy file; None when it is no DICOM file or, by the SOP class it states, another
    kind of one (a DICOMDIR, an annotation). A file that starts as DICOM files do but does
    not state its SOP class, or states the WSI one but lacks or garbles what wsidicom needs,
    is refused as damaged: it may be a level of the slide, which would be left out."""
    if not is_dicom_file(path):
        return None
    from pydicom.uid import VLWholeSlideMicroscopyImageStorage

    state = file_state(path)  # before the header: a file rewritten under it is refused
    try:
        ds = _read_header(path, [*_REQUIRED, *_SLIDE, *_MORE, *PIXEL_TAGS])
        media_class = ds.file_meta.get("MediaStorageSOPClassUID")
        classes = [str(c) for c in (media_class, ds.get("SOPClassUID")) if c]
        if classes and all(
            _UID.fullmatch(c) and c != VLWholeSlideMicroscopyImageStorage for c in classes
        ):
            return None
        values = {key: ds.get(key) for key in _REQUIRED}
        paths = tuple(
            (str(p.get("OpticalPathIdentifier", "")), p.get("OpticalPathDescription") or None)
            for p in ds.get("OpticalPathSequence", [])
        )
        spacing = _row_spacing(ds)
        slide = tuple(str(v) if (v := ds.get(key)) else None for key in _SLIDE)
        uid = ds.get("ConcatenationUID")
        number, total = ds.get("InConcatenationNumber"), ds.get("InConcatenationTotalNumber")
        problem = pixel_problem(ds)
        is_sparse = ds.get("DimensionOrganizationType") == "TILED_SPARSE"
    except header_errors() as exc:
        raise _damaged(path, error_text(exc)) from exc
    problems = _header_problems({"MediaStorageSOPClassUID": media_class, **values})
    if problems:
        raise _damaged(path, problems)
    image_type = [str(v) for v in values["ImageType"]]
    ny, nx = values["TotalPixelMatrixRows"], values["TotalPixelMatrixColumns"]
    return DicomInstance(
        path,
        str(values["SeriesInstanceUID"]),
        str(values["SOPInstanceUID"]),
        image_type[2],
        str(values["PhotometricInterpretation"]),
        (ny, nx),
        paths,
        spacing,
        (str(values["StudyInstanceUID"]), slide[0], slide[1]),
        problem,
        (str(uid), number, total) if uid else None,
        state,
        is_sparse,
        (values["Rows"], values["Columns"]),
    )


def _read_header(path: Path, tags: list[str]) -> Any:
    """The elements ``tags`` of ``path``'s header (and its file meta); no pixel data read."""
    import pydicom

    with path.open("rb") as f:
        return pydicom.dcmread(
            _ReadsWithinTheFile(f, path.stat().st_size), stop_before_pixels=True, specific_tags=tags
        )


def _header_problems(values: dict[str, Any]) -> str:
    """What of ``values`` (keyword: value, None where absent) a WSI file could not state,
    e.g. ``"no SeriesInstanceUID; garbled Rows 0"``; empty when none."""
    from pydicom.uid import VLWholeSlideMicroscopyImageStorage

    missing, garbled = [], []
    for key, value in values.items():
        if value is None or (not isinstance(value, int) and not value):
            missing.append(key)
            continue
        if key == "MediaStorageSOPClassUID":
            is_sound = value == VLWholeSlideMicroscopyImageStorage
        elif key in _UIDS:
            is_sound = _UID.fullmatch(str(value)) is not None
        elif key in _SIZES:
            is_sound = isinstance(value, int) and value > 0
        elif key == "ImageType":
            kinds = [value] if isinstance(value, str | int) else list(value)
            is_sound = len(kinds) > 2 and str(kinds[2]) in _KINDS
        else:
            is_sound = True
        if not is_sound:
            garbled.append(f"{key} {value!r}")
    parts = ([f"no {', '.join(missing)}"] if missing else []) + (
        [f"garbled {', '.join(garbled)}"] if garbled else []
    )
    return "; ".join(parts)


def series_instances(path: Path) -> list[DicomInstance]:
    """The files of the slide ``path`` names: those of its folder sharing a file's
    SeriesInstanceUID, or a folder's files when they are of one series."""
    named = None if path.is_dir() else path.name
    folder = path.parent if named else path
    if named and read_instance(path) is None:  # said before a damaged neighbour's header is
        raise ImageReadError(
            f"{path}: no readable DICOM WSI series: the file is no DICOM VL Whole Slide "
            "Microscopy image"
        )
    instances = [
        i for p in sorted(folder.iterdir()) if p.is_file() and (i := read_instance(p)) is not None
    ]
    if named:
        own = next(i for i in instances if i.path.name == named)
        _warn_of_strays(path, own, instances)
        return [i for i in instances if i.series_uid == own.series_uid]
    series: dict[str, list[DicomInstance]] = {}
    for i in instances:
        series.setdefault(i.series_uid, []).append(i)
    if not series:
        raise ImageReadError(
            f"{path}: no readable DICOM WSI series: no file in it is a DICOM VL Whole Slide "
            "Microscopy image"
        )
    if len(series) > 1:
        sizes = {
            uid: max((i.shape for i in members), key=np.prod) for uid, members in series.items()
        }
        listing = "; ".join(
            f"{uid} ({sizes[uid][0]} x {sizes[uid][1]} px (Y x X), e.g. {members[0].path.name})"
            for uid, members in series.items()
        )
        raise ImageReadError(
            f"{path}: holds {len(series)} DICOM WSI series (slides): {listing}; pass one file "
            "of the wanted slide to read its series"
        )
    return instances


def _warn_of_strays(path: Path, own: DicomInstance, instances: list[DicomInstance]) -> None:
    """Warn of level files of ``own``'s slide (its study, stated frame of reference and
    container) in other series, which a garbled SeriesInstanceUID makes of a level or an
    optical path of it: they are left out. A slide's label or overview in a series of its
    own is no level, and no stray."""
    if own.slide[1] is None:  # without it, every slide of a study would be one
        return
    strays: dict[str, list[str]] = {}
    for i in instances:
        if i.series_uid != own.series_uid and i.image_type == "VOLUME" and i.slide == own.slide:
            strays.setdefault(i.series_uid, []).append(i.path.name)
    if not strays:
        return
    listing = "; ".join(f"{', '.join(names)} of series {uid}" for uid, names in strays.items())
    warnings.warn(
        f"{path}: reading its series {own.series_uid} only; pyramid level files beside it of "
        f"its slide (its study and frame of reference) in other series are left out: "
        f"{listing}; if they belong to it (a garbled SeriesInstanceUID, or optical paths kept "
        "in series of their own), give them its SeriesInstanceUID (e.g. with pydicom)",
        stacklevel=5,  # open_image's caller, as main_pyramid's warnings
    )


def refuse_misplaced_frames(instances: list[DicomInstance]) -> None:
    """Refuse a TILED_SPARSE file of frames wsidicom would misplace (sparse_frame_problem),
    naming it; the per-frame groups, an item a frame, are read only here, for the series'
    sparse files."""
    for i in instances:
        if not i.is_sparse:
            continue
        try:
            frames = _read_header(i.path, [_PER_FRAME]).get(_PER_FRAME)
            problem = sparse_frame_problem(frames, i.tile)
        except header_errors() as exc:
            raise _damaged(i.path, error_text(exc)) from exc
        if problem:
            raise ImageReadError(f"{i.path}: {problem}")


def main_pyramid(pyramids: list[Any], instances: list[DicomInstance], path: str) -> int:
    """Index of wsidicom's pyramid of the most base-level pixels; the others are warned of,
    naming their files. Level files in no pyramid are refused, naming them, where a level
    read has their pixel spacing (wsidicom keeps one image a level, by spacing: the pyramid
    could mix two images) or they state none; else warned of and left out (a codec wsidicom
    does not decode), as wsidicom leaves them."""
    uids = [{d.instance_uid for lv in p.levels for d in lv.datasets} for p in pyramids]
    spacings = [float(lv.pixel_spacing.height) for p in pyramids for lv in p.levels]
    left = [
        i
        for i in instances
        if i.image_type == "VOLUME" and not any(i.instance_uid in u for u in uids)
    ]
    # wsidicom's level of a spacing is its whole power of two over the base's: one level
    # within a factor of sqrt(2).
    twins = [
        i.path.name
        for i in left
        if i.spacing is None or any(abs(math.log2(i.spacing / s)) < 0.5 for s in spacings)
    ]
    if twins:
        raise ImageReadError(
            f"{path}: wsidicom places {', '.join(twins)} in no pyramid of the series, though "
            "a level it reads has its pixel spacing: a second image at the pixel spacing and "
            "place on the slide of another file's (the same origin, or no "
            "ImageOrientationSlide), of which it keeps one; move the files that are no part "
            "of the slide out of its folder"
        )
    if left:
        warnings.warn(
            f"{path}: wsidicom reads no pyramid level from {', '.join(i.path.name for i in left)} "
            "(of a pixel type, codec, photometric interpretation or planar configuration it "
            "does not take); the slide is read without them",
            stacklevel=4,
        )
    main = max(range(len(pyramids)), key=lambda k: pyramids[k].size.area)
    if len(pyramids) > 1:
        text = [
            _pyramid_text(k, p, [i.path.name for i in instances if i.instance_uid in uids[k]])
            for k, p in enumerate(pyramids)
        ]
        warnings.warn(
            f"{path}: holds {len(pyramids)} pyramids (images of other places on the slide or "
            f"depths of field); reading the largest, {text[main]}, and leaving out "
            f"{', '.join(t for k, t in enumerate(text) if k != main)}; to read one of those, "
            "move its files to a folder of their own",
            stacklevel=4,
        )
    return main


def _pyramid_text(index: int, pyramid: Any, files: list[str]) -> str:
    where = pyramid.image_coordinate_system
    at = (
        f", origin x {float(where.origin.x):g}, y {float(where.origin.y):g} mm"
        if where is not None
        else ""
    )
    size = pyramid.size
    return f"pyramid {index} ({size.height} x {size.width} px (Y x X){at}: {', '.join(files)})"
