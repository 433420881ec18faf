"""What an image file holds, for ``segpipe info IMAGE``: levels, pixel size, georeference,
channels, dtype, nodata, and the scanner or format that wrote it.

>>> info = describe_image("slide.ndpi")  # doctest: +SKIP
>>> print("\\n".join(info.lines()))  # doctest: +SKIP
image: slide.ndpi  (hamamatsu, uint8, 3 channels, 0.4527 µm/px, 20x)
levels: 0: 256 x 384, 1: 128 x 192
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, cast

from segpipe.io.files import URLPath, json_number
from segpipe.io.readers import Reader, open_image

__all__ = ["ImageInfo", "describe_image"]


@dataclass(frozen=True)
class ImageInfo:
    """A description of one image, every field plain data (``to_dict`` is JSON-ready).

    Attributes
    ----------
    path
        The file or store described.
    format
        The reader's format: ``"tiff"``, ``"zarr"``, ``"pillow"`` or ``"array"``.
    vendor
        Who wrote the file, where it says: ``"aperio"``, ``"hamamatsu"``, ``"leica"``,
        ``"philips"``, ``"ventana"``, ``"ome"``, ``"geotiff"``, ``"generic-tiff"``; else None.
    levels
        ``(Y, X, C)`` of each pyramid level, level 0 first.
    dtype
        The pixels' dtype as stored.
    channels
        Channels (bands) per pixel; ``channel_names`` names them where the file does.
    pixel_size_um
        Microns per pixel at level 0 (None when the file does not say).
    magnification
        The scan objective (20, 40), where the slide says.
    crs, crs_wkt, transform
        For a georeferenced raster: a short name of the CRS (``"EPSG:32633"``, or the WKT's
        name for a custom one), its full WKT, and the level-0 affine ``(a, b, c, d, e, f)``
        from pixel corners to CRS coordinates; None otherwise.
    nodata, mask_kind
        Per-band nodata values, and where invalid pixels are marked (``"nodata"``,
        ``"mask"``, ``"alpha"``); None when the file marks none.
    """

    path: str
    format: str
    vendor: str | None
    levels: tuple[tuple[int, int, int], ...]
    dtype: str
    channels: int
    channel_names: tuple[str, ...] | None = None
    pixel_size_um: float | None = None
    magnification: float | None = None
    crs: str | None = None
    crs_wkt: str | None = None
    transform: tuple[float, float, float, float, float, float] | None = None
    nodata: tuple[float | None, ...] | None = None
    mask_kind: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (tuples become lists, a nodata NaN or infinity its
        text, ``"NaN"``, ``"Infinity"``, ``"-Infinity"``); ``kind`` is ``"image"``."""
        out = {"kind": "image", **asdict(self)}
        if self.nodata is not None:
            out["nodata"] = tuple(json_number(v) for v in self.nodata)
        return {k: _listed(v) for k, v in out.items()}

    def lines(self) -> list[str]:
        """A few human-readable lines, as ``segpipe info`` prints them."""
        head = [self.vendor or self.format, self.dtype, f"{self.channels} channel(s)"]
        head.append(f"{self.pixel_size_um:g} µm/px" if self.pixel_size_um else "pixel size unknown")
        if self.magnification:
            head.append(f"{self.magnification:g}x")
        out = [f"image: {self.path}  ({', '.join(head)})"]
        out.append(
            "levels: " + ", ".join(f"{k}: {y} x {x}" for k, (y, x, _) in enumerate(self.levels))
        )
        if self.channel_names:
            out.append("channels: " + ", ".join(self.channel_names))
        if self.crs is not None and self.transform is not None:
            a, _, c, _, e, f = self.transform
            out.append(f"crs: {self.crs}")
            out.append(f"transform: origin (x {c:.10g}, y {f:.10g}), pixel {a:.10g} x {e:.10g}")
        if self.mask_kind is not None:
            values = "" if self.nodata is None else f" (nodata {_nodata_text(self.nodata)})"
            out.append(f"invalid pixels: marked by {self.mask_kind}{values}")
        return out


def describe_image(
    image: str | os.PathLike[str] | Reader, *, pixel_size_um: float | None = None
) -> ImageInfo:
    """Describe an image file (or an opened reader) without reading its pixels.

    Parameters
    ----------
    image
        Anything :func:`segpipe.io.readers.open_image` opens, or a reader.
    pixel_size_um
        Overrides the file's pixel size, as in ``open_image``.

    Raises
    ------
    ImageReadError
        As ``open_image``: naming the file and what is wrong with it.
    """
    if not isinstance(image, str | os.PathLike | URLPath):  # a URLPath is no os.PathLike
        return _described(image)
    reader = open_image(image, pixel_size_um=pixel_size_um)
    try:
        return _described(reader)
    finally:
        cast(Any, reader).close()  # opened here: closed here (BaseReader's), not by the GC


def _described(reader: Reader) -> ImageInfo:
    geo = getattr(reader, "georeference", None)
    return ImageInfo(
        path=str(reader.path),
        format=type(reader).__name__.removesuffix("Reader").lower(),
        vendor=getattr(reader, "vendor", None),
        levels=tuple((int(y), int(x), int(c)) for y, x, c in reader.level_shapes),
        dtype=str(reader.dtype),
        channels=int(reader.shape[2]),
        channel_names=getattr(reader, "channel_names", None),
        pixel_size_um=reader.pixel_size_um,
        magnification=getattr(reader, "magnification", None),
        crs=None if geo is None else geo.crs_name,
        crs_wkt=None if geo is None else geo.crs_wkt,
        transform=None if geo is None else geo.transform,
        nodata=getattr(reader, "nodata", None),
        mask_kind=getattr(reader, "mask_kind", None),
    )


def _listed(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_listed(v) for v in value]
    return value


def _nodata_text(values: tuple[float | None, ...]) -> str:
    """One value when every band shares it (NaN too, which equals no NaN), else each band's."""
    if len({str(v) for v in values}) == 1:
        return str(values[0])
    return ", ".join(str(v) for v in values)
