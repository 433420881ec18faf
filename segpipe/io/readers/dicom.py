"""DICOM whole-slide images (VL Whole Slide Microscopy, one instance per pyramid level)
through wsidicom (``pip install segpipe[dicom]``).

A DICOM slide is a folder of ``.dcm`` files (one series); :func:`open_image` takes the folder
or any ``.dcm`` file in it. Pixels come as ``(Y, X, 3)`` RGB or ``(Y, X, 1)`` grey, read by
wsidicom region by region; the pixel size is the base level's ``PixelSpacing`` (mm).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from segpipe.io.files import URLPath
from segpipe.io.readers.base import DECODE_ERRORS, BaseReader, ImageReadError, RegionLevel

__all__ = ["DICOM_SUFFIXES", "DicomReader", "is_dicom_folder"]

DICOM_SUFFIXES = (".dcm",)


def is_dicom_folder(path: Path) -> bool:
    """Whether ``path`` is a local folder holding ``.dcm`` files (and is no Zarr store)."""
    return (
        path.is_dir()
        and not (path / "zarr.json").exists()
        and any(p.suffix.lower() in DICOM_SUFFIXES for p in path.iterdir())
    )


class DicomReader(BaseReader):
    """A DICOM WSI series through wsidicom: each pyramid level of its selected pyramid a level.

    ``path`` is the folder; a ``.dcm`` file stands for the folder it is in.
    """

    def __init__(self, path: Path | URLPath, *, pixel_size_um: float | None = None) -> None:
        if isinstance(path, URLPath):
            raise ImageReadError(f"{path}: DICOM slides are read from a local folder only")
        folder = path.parent if path.suffix.lower() in DICOM_SUFFIXES else path
        super().__init__(folder, pixel_size_um)
        self._slide: Any = None
        slide = self._open()
        from wsidicom import errors  # type: ignore[import-untyped]

        # wsidicom's errors share no base class beyond Exception
        wsidicom_errors = (
            errors.WsiDicomError,
            errors.WsiDicomFileError,
            errors.WsiDicomMatchError,
            errors.WsiDicomNotFoundError,
            errors.WsiDicomNoResolutionError,
            errors.WsiDicomNotSupportedError,
            errors.WsiDicomStrictRequirementError,
        )
        try:
            levels = list(slide.pyramid.levels)
            self._pyramid_levels = tuple(int(lv.level) for lv in levels)
            corner = np.asarray(
                slide.read_region((0, 0), self._pyramid_levels[0], (1, 1), as_array=True)
            )
            mpp = slide.mpp.width
        except (*wsidicom_errors, *DECODE_ERRORS) as exc:
            self.close()
            raise ImageReadError(
                f"{self.path}: DICOM WSI metadata that wsidicom cannot use "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        channels = corner.shape[2] if corner.ndim == 3 else 1
        shapes: list[tuple[int, ...]] = [
            (int(lv.size.height), int(lv.size.width), channels) for lv in levels
        ]
        chunks: list[tuple[int, ...]] = [
            (min(h, int(lv.tile_size.height)), min(w, int(lv.tile_size.width)), channels)
            for (h, w, _), lv in zip(shapes, levels, strict=True)
        ]
        self.vendor = "dicom"
        self.channel_names = ("red", "green", "blue") if channels == 3 else None
        self._set_layout(["YXC"] * len(shapes), shapes, chunks, corner.dtype)
        if self.pixel_size_um is None and mpp:
            self.pixel_size_um = float(mpp)

    def _open(self) -> Any:
        try:
            import wsidicom  # type: ignore[import-untyped]
        except ImportError as exc:
            raise ImageReadError(
                f"{self.path}: DICOM slides need wsidicom; install it with "
                "pip install 'segpipe[dicom]'"
            ) from exc
        if self._slide is None:
            try:
                self._slide = wsidicom.WsiDicom.open(self.path)
            except (wsidicom.errors.WsiDicomNotFoundError, *DECODE_ERRORS) as exc:
                raise ImageReadError(
                    f"{self.path}: no readable DICOM WSI series ({type(exc).__name__}: {exc})"
                ) from exc
        return self._slide

    def _open_level(self, level: int) -> RegionLevel:
        return RegionLevel(
            self.level_shapes[level],
            self.dtype,
            lambda y0, y1, x0, x1: self._region(level, y0, y1, x0, x1),
        )

    def _region(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        pixels = self._open().read_region(
            (x0, y0), self._pyramid_levels[level], (x1 - x0, y1 - y0), as_array=True
        )
        pixels = np.asarray(pixels)
        return pixels if pixels.ndim == 3 else pixels[..., None]

    def _close_handles(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def _handle_state(self) -> dict[str, Any]:
        return {"_slide": None}
