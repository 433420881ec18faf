"""DICOM whole-slide images (VL Whole Slide Microscopy, one instance per pyramid level)
through wsidicom (``pip install segpipe[dicom]``).

A DICOM slide is one series of files (``.dcm``, or without extension as on DICOM media) in a
folder; :func:`open_image` takes one file of the slide, and reads the files of its folder that
share its SeriesInstanceUID, or the folder when it holds one series (a folder of several is
refused, naming them). Pixels come as ``(Y, X, 3)`` RGB or ``(Y, X, 1)`` grey per optical
path, read by wsidicom region by region; several optical paths (fluorescence channels) are
stacked as channels in the order the files list them. Several focal planes are refused as a
stack. The pixel size is the base level's ``PixelSpacing`` (mm), which wsidicom requires.

wsidicom groups a series' levels into pyramids by their place on the slide (and depth of
field); of several, the one of the most base-level pixels is read and the others are warned
of, as the TIFF reader does with a file of several images. A level file wsidicom places in
no pyramid (one it cannot read, or a second image of a level's pixel spacing that it cannot
tell apart and overwrites) is refused, naming it: the pyramid read could mix two images.
"""

from __future__ import annotations

import itertools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.io.files import URLPath
from segpipe.io.readers.base import DECODE_ERRORS, BaseReader, ImageReadError, RegionLevel

__all__ = ["DICOM_SUFFIXES", "DicomReader", "is_dicom_file", "is_dicom_folder"]

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
class _Instance:
    """What one DICOM WSI file's header says about the slide it belongs to."""

    path: Path
    series_uid: str
    instance_uid: str  # SOPInstanceUID
    image_type: str  # ImageType value 3: VOLUME (a pyramid level), LABEL, OVERVIEW, THUMBNAIL
    photometric: str  # PhotometricInterpretation
    shape: tuple[int, int]  # (Y, X) pixels of its total pixel matrix
    optical_paths: tuple[tuple[str, str | None], ...]  # (identifier, description) each


def _read_instance(path: Path) -> _Instance | None:
    """The header of ``path`` (no pixel data read) when it is a DICOM VL Whole Slide
    Microscopy file; None when it is no DICOM file or another kind of one."""
    if not is_dicom_file(path):
        return None
    import pydicom
    from pydicom.errors import BytesLengthException, InvalidDicomError
    from pydicom.uid import VLWholeSlideMicroscopyImageStorage

    tags = ["SeriesInstanceUID", "SOPInstanceUID", "PhotometricInterpretation"]
    sizes = ["TotalPixelMatrixRows", "TotalPixelMatrixColumns"]
    try:
        ds = pydicom.dcmread(
            path,
            stop_before_pixels=True,
            specific_tags=[*tags, *sizes, "ImageType", "OpticalPathSequence"],
        )
        if ds.file_meta.get("MediaStorageSOPClassUID") != VLWholeSlideMicroscopyImageStorage:
            return None
        series_uid, instance_uid, photometric = (str(ds.get(tag) or "") for tag in tags)
        ny, nx = (int(ds.get(tag) or 0) for tag in sizes)
        image_type = list(ds.get("ImageType") or [])
        paths = tuple(
            (str(p.get("OpticalPathIdentifier", "")), p.get("OpticalPathDescription") or None)
            for p in ds.get("OpticalPathSequence", [])
        )
        kind = str(image_type[2]) if len(image_type) > 2 else ""
        return _Instance(path, series_uid, instance_uid, kind, photometric, (ny, nx), paths)
    except (InvalidDicomError, BytesLengthException, *DECODE_ERRORS) as exc:
        raise ImageReadError(
            f"{path}: a damaged DICOM header ({type(exc).__name__}: {exc}); move it out of "
            "the slide's folder if it is no part of the slide"
        ) from exc


def _series(path: Path) -> list[_Instance]:
    """The files of the slide ``path`` names: those of its folder sharing a file's
    SeriesInstanceUID, or a folder's files when they are of one series."""
    named = None if path.is_dir() else path.name
    folder = path.parent if named else path
    instances = [
        i for p in sorted(folder.iterdir()) if p.is_file() and (i := _read_instance(p)) is not None
    ]
    if named:
        own = next((i for i in instances if i.path.name == named), None)
        if own is None:
            raise ImageReadError(
                f"{path}: no readable DICOM WSI series: the file is no DICOM VL Whole Slide "
                "Microscopy image"
            )
        return [i for i in instances if i.series_uid == own.series_uid]
    series: dict[str, list[_Instance]] = {}
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


def _path_order(present: list[str], instances: list[_Instance]) -> tuple[list[str], list[str]]:
    """The optical paths wsidicom found (in a set's order) in the order the files' headers
    list them, and a name for each: its description where every path has a distinct one,
    else its identifier."""
    described: dict[str, str | None] = {}
    for instance in instances:
        for identifier, description in instance.optical_paths:
            described.setdefault(identifier, description)
    order = [p for p in described if p in present] + sorted(set(present) - described.keys())
    descriptions = [described.get(p) for p in order]
    if all(descriptions) and len(set(descriptions)) == len(order):
        return order, [str(d) for d in descriptions]
    return order, order


def _channel_names(path_names: list[str], samples: int) -> tuple[str, ...] | None:
    colours = ("red", "green", "blue") if samples == 3 else None
    if len(path_names) == 1:
        return colours
    if samples == 1:  # grey per path: fluorescence channels
        return tuple(path_names)
    if colours is None:
        return None
    return tuple(f"{name} {colour}" for name in path_names for colour in colours)


def _refuse_min_is_white(instances: list[_Instance]) -> None:
    """Refuse level files of MONOCHROME1 grey, which wsidicom passes over without a word
    (its error would be that the series has no level, or a level would be missing)."""
    files = [
        i.path for i in instances if i.image_type == "VOLUME" and i.photometric == "MONOCHROME1"
    ]
    if files:
        more = f" and {', '.join(f.name for f in files[1:])}" if files[1:] else ""
        raise ImageReadError(
            f"{files[0]}{more}: PhotometricInterpretation MONOCHROME1 (grey, white at 0), "
            "which wsidicom does not read (the DICOM WSI IOD takes MONOCHROME2 for grey); "
            "rewrite the files as MONOCHROME2, each value v as 2**BitsStored - 1 - v (e.g. "
            "with pydicom), or convert the slide to OME-TIFF"
        )


def _main_pyramid(pyramids: list[Any], instances: list[_Instance], path: str) -> int:
    """Index of wsidicom's pyramid of the most base-level pixels; the others are warned of,
    naming their files. Level files in no pyramid are refused, naming them."""
    uids = [{d.instance_uid for lv in p.levels for d in lv.datasets} for p in pyramids]
    left = [
        i.path.name
        for i in instances
        if i.image_type == "VOLUME" and not any(i.instance_uid in u for u in uids)
    ]
    if left:
        raise ImageReadError(
            f"{path}: wsidicom places {', '.join(left)} in no pyramid of the series: files "
            "it cannot read (of a pixel type, photometric interpretation or planar "
            "configuration it does not take), or a second image at the pixel spacing and "
            "place on the slide of another file's (the same origin, or no "
            "ImageOrientationSlide), of which it keeps one; move the files that are no part "
            "of the slide out of its folder"
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


def _wsidicom_errors() -> tuple[type[Exception], ...]:
    from wsidicom import errors  # type: ignore[import-untyped]

    # wsidicom's errors share no base class beyond Exception
    return tuple(
        e for e in vars(errors).values() if isinstance(e, type) and issubclass(e, Exception)
    )


class DicomReader(BaseReader):
    """A DICOM WSI series through wsidicom: each level of its pyramid a level, each optical
    path's samples channels.

    ``path`` is one file of the slide (its series is read) or a folder of one series.
    """

    def __init__(self, path: Path | URLPath, *, pixel_size_um: float | None = None) -> None:
        if isinstance(path, URLPath):
            raise ImageReadError(f"{path}: DICOM slides are read from a local folder only")
        super().__init__(path, pixel_size_um)
        self._slide: Any = None
        self._wsidicom()  # before pydicom, which comes with it, reads the headers
        instances = _series(path)
        _refuse_min_is_white(instances)
        self._instance_files = tuple(str(i.path) for i in instances)
        slide = self._open()
        try:
            self._pyramid = _main_pyramid(list(slide.pyramids), instances, self.path)
            pyramid = slide.pyramids[self._pyramid]
            base = pyramid.base_level
            paths, path_names = _path_order(list(base.optical_paths), instances)
            focal_planes = list(base.focal_planes)
            levels = [lv for lv in pyramid.levels if set(paths) <= set(lv.optical_paths)]
            corners = [np.asarray(self._read(slide, base.level, p, (0, 0), (1, 1))) for p in paths]
            mpp = pyramid.mpp.width
        except ImageReadError:
            self.close()
            raise
        except _wsidicom_errors() + DECODE_ERRORS as exc:
            self.close()
            raise ImageReadError(
                f"{self.path}: DICOM WSI metadata that wsidicom cannot use "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        if len(focal_planes) > 1:
            self.close()
            planes = ", ".join(f"{z:g}" for z in focal_planes)
            raise ImageReadError(
                f"{self.path}: {len(focal_planes)} focal planes (z = {planes} um): segpipe "
                "segments 2D images, not stacks; export one focal plane (e.g. the best focus) "
                "first"
            )
        if len({(c.dtype, c.shape) for c in corners}) > 1:
            self.close()
            raise ImageReadError(
                f"{self.path}: optical paths {', '.join(paths)} of different pixel types "
                f"({', '.join(f'{c.dtype} x {c.size}' for c in corners)} samples); segpipe "
                "stacks paths as channels of one dtype: export them alike first"
            )
        self._optical_paths = tuple(paths)
        self._pyramid_levels = tuple(int(lv.level) for lv in levels)
        samples = corners[0].shape[2] if corners[0].ndim == 3 else 1
        channels = samples * len(paths)
        shapes: list[tuple[int, ...]] = [
            (int(lv.size.height), int(lv.size.width), channels) for lv in levels
        ]
        chunks: list[tuple[int, ...]] = [
            (min(h, int(lv.tile_size.height)), min(w, int(lv.tile_size.width)), channels)
            for (h, w, _), lv in zip(shapes, levels, strict=True)
        ]
        self.vendor = "dicom"
        self.channel_names = _channel_names(path_names, samples)
        self._set_layout(["YXC"] * len(shapes), shapes, chunks, corners[0].dtype)
        if self.pixel_size_um is None and mpp:
            self.pixel_size_um = float(mpp)

    def _wsidicom(self) -> Any:
        try:
            import wsidicom  # type: ignore[import-untyped]
        except ImportError as exc:
            raise ImageReadError(
                f"{self.path}: DICOM slides need wsidicom; install it with "
                "pip install 'segpipe[dicom]'"
            ) from exc
        return wsidicom

    def _open(self) -> Any:
        wsidicom = self._wsidicom()
        # Under the lock: threads reading a reader just unpickled would each open the series.
        with self._lock:
            if self._slide is not None:
                return self._slide
            try:
                self._slide = wsidicom.WsiDicom.open(list(self._instance_files))
            except wsidicom.errors.WsiDicomNoResolutionError as exc:
                raise ImageReadError(
                    f"{self.path}: the slide states no PixelSpacing (Pixel Measures of its "
                    "Shared Functional Groups), without which wsidicom cannot build its "
                    "pyramid, so pixel_size_um cannot stand in for it; add PixelSpacing to "
                    "the files (e.g. with pydicom) or convert the slide to OME-TIFF"
                ) from exc
            except _wsidicom_errors() + DECODE_ERRORS as exc:
                raise ImageReadError(
                    f"{self.path}: no readable DICOM WSI series ({type(exc).__name__}: {exc})"
                ) from exc
            return self._slide

    def _read(
        self, slide: Any, level: int, path: str, xy: tuple[int, int], size: tuple[int, int]
    ) -> Any:
        """A region of ``path`` (an optical path) of the pyramid read: ``xy`` its top-left
        corner, ``size`` its (width, height), in pixels of ``level`` (wsidicom's number)."""
        return slide.read_region(xy, level, size, path=path, pyramid=self._pyramid, as_array=True)

    def _open_level(self, level: int) -> RegionLevel:
        return RegionLevel(
            self.level_shapes[level],
            self.dtype,
            lambda y0, y1, x0, x1: self._region(level, y0, y1, x0, x1),
        )

    def _region(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        slide = self._open()
        try:
            planes = [
                np.asarray(
                    self._read(slide, self._pyramid_levels[level], p, (x0, y0), (x1 - x0, y1 - y0))
                )
                for p in self._optical_paths
            ]
        except _wsidicom_errors() as exc:
            raise ImageReadError(
                f"{self.path}: cannot read level {level} at y {y0}:{y1}, x {x0}:{x1} "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        planes = [p if p.ndim == 3 else p[..., None] for p in planes]
        return planes[0] if len(planes) == 1 else np.concatenate(planes, axis=2)

    def _token(self) -> tuple[Any, ...]:
        # The slide is its series' files, not the one named nor the folder (whose stamp
        # does not change when a file in it is rewritten).
        stamps: list[tuple[Any, ...]] = []
        for f in self._instance_files:
            try:
                stat = os.stat(f)
                stamps.append((f, stat.st_mtime_ns, stat.st_size))
            except OSError:
                stamps.append((f,))
        return (type(self).__name__, self.path, *stamps)

    def _close_handles(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def _handle_state(self) -> dict[str, Any]:
        return {"_slide": None}
