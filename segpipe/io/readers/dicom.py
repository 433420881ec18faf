"""DICOM whole-slide images (VL Whole Slide Microscopy, one instance per pyramid level)
through wsidicom (``pip install segpipe[dicom]``).

A DICOM slide is one series of files (``.dcm``, or without extension as on DICOM media) in a
folder; :func:`open_image` takes one file of the slide, and reads the files of its folder that
share its SeriesInstanceUID, or the folder when it holds one series (a folder of several is
refused, naming them). Pixels come as ``(Y, X, 3)`` RGB or ``(Y, X, 1)`` grey per optical
path, read by wsidicom region by region; several optical paths (fluorescence channels) are
stacked as channels in the order the files list them. Several focal planes are refused as a
stack. The pixel size is the base level's ``PixelSpacing`` (mm), which wsidicom requires.

Threads read one wsidicom handle at once (wsidicom locks each file's stream); closing it
leaves it open under the reads in it (:mod:`segpipe.io.readers.handles`). A read after
``close``, or by a pickled copy, opens the series again, refused where a file of it changed
since it was opened.

Which files make the slide, and which of wsidicom's pyramids of them is read:
:mod:`segpipe.io.readers.dicom_series`.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.io.files import URLPath, changed_file
from segpipe.io.readers.base import BaseReader, ImageReadError, RegionLevel
from segpipe.io.readers.dicom_checks import (
    guard_jpeg_frames,
    refuse_broken_concatenations,
    refuse_unreadable_pixels,
)
from segpipe.io.readers.dicom_series import (
    DICOM_SUFFIXES,
    DicomInstance,
    error_text,
    header_errors,
    is_dicom_file,
    is_dicom_folder,
    main_pyramid,
    refuse_misplaced_frames,
    series_instances,
)
from segpipe.io.units import pixel_size_of_xy

__all__ = ["DICOM_SUFFIXES", "DicomReader", "is_dicom_file", "is_dicom_folder"]


def _path_order(present: list[str], instances: list[DicomInstance]) -> tuple[list[str], list[str]]:
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


def _wsidicom_errors() -> tuple[type[Exception], ...]:
    from wsidicom import errors  # type: ignore[import-untyped]

    # wsidicom's errors share no base class beyond Exception
    return tuple(
        e for e in vars(errors).values() if isinstance(e, type) and issubclass(e, Exception)
    )


def _dicom_errors() -> tuple[type[Exception], ...]:
    """What wsidicom raises opening or reading a damaged series: its own errors, pydicom's
    (see header_errors) and marshmallow's (wsidicom loads metadata through its schemas)."""
    from marshmallow.exceptions import MarshmallowError

    return (*_wsidicom_errors(), *header_errors(), MarshmallowError)


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
        instances = series_instances(path)
        refuse_unreadable_pixels(instances)
        refuse_broken_concatenations(instances)
        refuse_misplaced_frames(instances)
        self._instance_files = tuple(str(i.path) for i in instances)
        self._instance_states = {str(i.path): i.state for i in instances}  # at each open
        slide = self._open()
        try:
            self._pyramid = main_pyramid(list(slide.pyramids), instances, self.path)
            pyramid = slide.pyramids[self._pyramid]
            base = pyramid.base_level
            paths, path_names = _path_order(list(base.optical_paths), instances)
            focal_planes = list(base.focal_planes)
            levels = [lv for lv in pyramid.levels if set(paths) <= set(lv.optical_paths)]
            corners = [np.asarray(self._read(slide, base.level, p, (0, 0), (1, 1))) for p in paths]
            # Each level's own: wsidicom gives a level of other samples as they are, which a
            # read of level 1 would view as the base's (a uint16 split into two channels).
            others = [
                (k, np.asarray(self._read(slide, lv.level, paths[0], (0, 0), (1, 1))))
                for k, lv in enumerate(levels)
                if k
            ]
            # Along x, as every reader takes a pixel size that differs in X and Y (warned of).
            mpp = pixel_size_of_xy(
                pyramid.mpp.width, pyramid.mpp.height, str(self.path), "PixelSpacing"
            )
        except ImageReadError:
            self.close()
            raise
        except _dicom_errors() as exc:
            self.close()
            raise ImageReadError(
                f"{self.path}: DICOM WSI metadata that wsidicom cannot use ({error_text(exc)})"
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
        for k, corner in others:
            if (corner.dtype, corner.size) != (corners[0].dtype, corners[0].size):
                self.close()
                raise ImageReadError(
                    f"{self.path}: level {k} stores {corner.dtype} x {corner.size} samples a "
                    f"pixel, level 0 {corners[0].dtype} x {corners[0].size}: segpipe reads a "
                    "pyramid of one pixel type; export its levels alike first"
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
        # Under the lock: threads reading a reader just unpickled would each open the series.
        with self._lock:
            return self._open_locked()

    def _open_locked(self) -> Any:
        """The handle, opened if closed; the caller holds the reader's lock."""
        if self._slide is not None:
            return self._slide
        # A worker's copy (pickled), or a read after close, opens by path: a scan saved
        # over the slide since would be read.
        if (changed := changed_file(self._instance_states)) is not None:
            raise ImageReadError(f"{changed} changed since it was opened; run again")
        wsidicom = self._wsidicom()
        # Levels of their own tile size (Bio-Formats shrinks small levels' tiles) are
        # read, not left out as wsidicom's strict default leaves them.
        lenient = replace(wsidicom.config.get_settings(), strict_tile_size_check=False)
        try:
            self._slide = wsidicom.WsiDicom.open(list(self._instance_files), settings=lenient)
        except wsidicom.errors.WsiDicomNoResolutionError as exc:
            raise ImageReadError(
                f"{self.path}: the slide states no PixelSpacing (Pixel Measures of its "
                "Shared Functional Groups), without which wsidicom cannot build its "
                "pyramid, so pixel_size_um cannot stand in for it; add PixelSpacing to "
                "the files (e.g. with pydicom) or convert the slide to OME-TIFF"
            ) from exc
        except _dicom_errors() as exc:
            files = self._failing_alone(exc, lenient)
            where = f": wsidicom cannot open {', '.join(files)}" if files else ""
            raise ImageReadError(
                f"{self.path}: no readable DICOM WSI series{where} ({error_text(exc)})"
            ) from exc
        guard_jpeg_frames(self._slide, str(self.path))
        return self._slide

    def _failing_alone(self, exc: Exception, settings: Any) -> list[str]:
        """Names of the series' files that, opened alone, fail as the series did with
        ``exc``: the file whose header holds what wsidicom cannot use. Empty for wsidicom's
        own errors, which a file alone raises for its own reasons (a label has no level)."""
        if isinstance(exc, _wsidicom_errors()):
            return []
        wsidicom = self._wsidicom()
        files = []
        for f in self._instance_files:
            try:
                wsidicom.WsiDicom.open([f], settings=settings).close()
            except _dicom_errors() as alone:
                if type(alone) is type(exc) and str(alone) == str(exc):
                    files.append(Path(f).name)
        return files

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
        try:
            with self._reading(self._open_locked) as slide:
                planes = [
                    np.asarray(
                        self._read(
                            slide, self._pyramid_levels[level], p, (x0, y0), (x1 - x0, y1 - y0)
                        )
                    )
                    for p in self._optical_paths
                ]
        except ImageReadError:  # opening the series again, which names its own problem
            raise
        except _dicom_errors() as exc:
            raise ImageReadError(
                f"{self.path}: cannot read level {level} at y {y0}:{y1}, x {x0}:{x1} "
                f"({error_text(exc)})"
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

    def _handle_state(self) -> dict[str, Any]:
        return {"_slide": None}
