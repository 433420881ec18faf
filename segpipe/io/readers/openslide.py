"""Slide formats tifffile cannot read (3DHISTECH MRXS, Hamamatsu VMS/VMU, Sakura SVSLIDE),
through OpenSlide (``pip install segpipe[slides]``: openslide-python and openslide-bin).

OpenSlide's C library hands out premultiplied ARGB; openslide-python's ``read_region`` divides
the colour by the alpha (``_convert.argb2rgba``) and gives RGBA regions of straight colour,
with alpha 0 and black where the scanner recorded nothing (MRXS slides are mostly such empty
space). The reader gives the RGB channels as pixels and the alpha as its validity mask
(``mask_kind = "alpha"``; see :meth:`valid_mask`), so tissue-free empty space can be skipped
like a GeoTIFF's nodata.

OpenSlide reads regions of one handle from several threads at once, so reads are not
serialised; the handle is opened under the reader's lock, and closing it (on :meth:`close`,
or after an error) leaves it open under the reads in it (:mod:`segpipe.io.readers.handles`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.io.files import URLPath
from segpipe.io.readers.base import BaseReader, ImageReadError, RegionLevel
from segpipe.io.units import pixel_size_of_xy, positive_or_none

__all__ = ["OPENSLIDE_SUFFIXES", "OpenSlideReader"]

OPENSLIDE_SUFFIXES = (".mrxs", ".vms", ".vmu", ".svslide")

log = logging.getLogger(__name__)

_MPP = ("openslide.mpp-x", "openslide.mpp-y")


class OpenSlideReader(BaseReader):
    """A slide through OpenSlide: each OpenSlide level a pyramid level, ``(Y, X, 3)`` uint8.

    Any file OpenSlide opens works (it also reads SVS, NDPI, SCN, BIF, Philips TIFF and
    generic tiled TIFF); :func:`~segpipe.io.readers.open_image` sends it only the formats
    tifffile cannot read. The pixel size is OpenSlide's ``openslide.mpp-x`` (warned of where
    ``mpp-y`` differs; ``mpp-y`` where it is the only one).

    Only OpenSlide's levels of a whole-number downsample are levels here (MRXS and SVSLIDE
    declare powers of two; VMS levels are JPEG scalings by 2, 4, 8). OpenSlide places a
    window of a level by its level-0 corner divided by the downsample; for one such as
    2.0017 (a generic TIFF's level of 751 of 1503 pixels) that lands between the stored
    pixels, and OpenSlide resamples them.
    """

    def __init__(self, path: Path | URLPath, *, pixel_size_um: float | None = None) -> None:
        super().__init__(path, pixel_size_um)
        if self.url is not None:
            raise ImageReadError(
                f"{self.path}: OpenSlide reads local files only; copy the slide (and, for "
                "MRXS, its data folder) to a local disk"
            )
        self._slide: Any = None
        slide = self._open()
        props = slide.properties
        downsamples = [float(d) for d in slide.level_downsamples]
        # OpenSlide's index and downsample of each level kept (level 0's is 1)
        self._slide_levels = tuple((k, int(d)) for k, d in enumerate(downsamples) if d.is_integer())
        if len(self._slide_levels) < len(downsamples):
            log.debug(
                "%s: leaving out OpenSlide's levels of downsamples %s: not whole numbers, "
                "OpenSlide would resample their pixels",
                self.path,
                [d for d in downsamples if not d.is_integer()],
            )
        dims = [
            (int(h), int(w)) for w, h in (slide.level_dimensions[k] for k, _ in self._slide_levels)
        ]
        chunks: list[tuple[int, ...]] = []
        for (k, _), (h, w) in zip(self._slide_levels, dims, strict=True):
            th = int(props.get(f"openslide.level[{k}].tile-height", 0)) or 512
            tw = int(props.get(f"openslide.level[{k}].tile-width", 0)) or 512
            chunks.append((min(h, max(th, 256)), min(w, max(tw, 256)), 3))
        self.vendor = props.get("openslide.vendor")
        self.magnification = positive_or_none(props.get("openslide.objective-power"))
        self.channel_names = ("red", "green", "blue")
        self.mask_kind = "alpha"
        self._set_layout(
            ["YXC"] * len(dims), [(h, w, 3) for h, w in dims], chunks, np.dtype(np.uint8)
        )
        if self.pixel_size_um is None:  # along x, warned of where y's differs (as elsewhere)
            x, y = (positive_or_none(props.get(k), self.path, k) for k in _MPP)
            self.pixel_size_um = pixel_size_of_xy(x, y, str(self.path), "openslide.mpp")

    def _open(self) -> Any:
        # Under the lock: threads reading a reader just unpickled (or one whose handle an
        # error closed) would each open a handle, all but one left to the garbage collector.
        with self._lock:
            return self._open_locked()

    def _open_locked(self) -> Any:
        """The handle, opened if closed; the caller holds the reader's lock."""
        if self._slide is not None:
            return self._slide
        try:
            import openslide
        except ImportError as exc:
            raise ImageReadError(
                f"{self.path}: this slide format needs OpenSlide; install it with "
                "pip install 'segpipe[slides]' (openslide-python and openslide-bin)"
            ) from exc
        try:
            self._slide = openslide.OpenSlide(self._file())  # refused if replaced since
        except (openslide.OpenSlideError, OSError) as exc:
            raise ImageReadError(
                f"{self.path}: OpenSlide cannot open it ({type(exc).__name__}: {exc})"
            ) from exc
        return self._slide

    def _open_level(self, level: int) -> RegionLevel:
        # RGB of OpenSlide's region: empty space reads as its transparent black; the alpha
        # is valid_mask's.
        return RegionLevel(
            self.level_shapes[level],
            self.dtype,
            lambda y0, y1, x0, x1: self._rgba(level, y0, y1, x0, x1)[..., :3],
        )

    def _rgba(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """``(y1 - y0, x1 - x0, 4)`` RGBA of a window of ``level`` (OpenSlide wants the
        top-left corner in level-0 pixels)."""
        if y1 <= y0 or x1 <= x0:
            return np.zeros((max(y1 - y0, 0), max(x1 - x0, 0), 4), dtype=np.uint8)
        import openslide

        k, d = self._slide_levels[level]
        with self._reading(self._open_locked) as slide:
            try:
                image = slide.read_region((x0 * d, y0 * d), k, (x1 - x0, y1 - y0))
            except openslide.OpenSlideError as exc:
                # OpenSlide keeps the error on the handle and fails every later read of it:
                # closed (as the reads in it end) so that the next read opens afresh, once
                # (another failing read may find a new handle already).
                with self._lock:
                    if self._slide is slide:
                        self._close_locked()
                raise ImageReadError(
                    f"{self.path}: OpenSlide cannot read level {level} at y {y0}:{y1}, "
                    f"x {x0}:{x1}: the slide may be corrupt or truncated ({exc})"
                ) from exc
        return np.asarray(image)

    def valid_mask(self, y0: int, y1: int, x0: int, x1: int, level: int = 0) -> np.ndarray:
        """``(y1 - y0, x1 - x0)`` bool: True where the scanner recorded pixels (alpha > 0)."""
        self._check_level(level)
        return self._rgba(level, y0, y1, x0, x1)[..., 3] > 0

    def _handle_state(self) -> dict[str, Any]:
        return {"_slide": None}
