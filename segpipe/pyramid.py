"""Result pyramids: level geometry, OME-Zarr 0.5 metadata and the chunk-wise 2x reductions.

Level ``k`` of a result halves level ``k - 1`` (an odd last row or column is dropped, as
:func:`segpipe.pixels.pyramid_shapes` does), so its pixel ``i`` covers level-0 pixels
``[2**k * i, 2**k * (i + 1))`` and sits at their centre::

    level 0   | 0 | 1 | 2 | 3 |        y = s * i
    level 1   |   0   |   1   |        y = s * (2 * i + 0.5)
    level 2   |       0       |        y = s * (4 * i + 1.5)

which is OME's ``scale`` ``s * 2**k`` and ``translation`` ``s * (2**k - 1) / 2``.
Probabilities are averaged (:func:`segpipe.pixels.downsample_mean_2x`), the mask takes the
most frequent class of each 2x2 block (:func:`mode_2x`). Every level is computed from the one
below it read back from the store, one shard per Dask task, so no level is ever whole in
memory and every write is a whole shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np

from segpipe.pixels import downsample_mean_2x

__all__ = [
    "OME_VERSION",
    "PixelGrid",
    "class_colors",
    "label_attributes",
    "level_coordinates",
    "mode_2x",
    "multiscale_attributes",
    "reduce_level",
]

OME_VERSION = "0.5"

# Tab10-like, background transparent: a label layer in napari/QuPath shows only foreground.
_PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


def level_coordinates(n: int, level: int, pixel_size: float) -> np.ndarray:
    """Centres of the ``n`` pixels of ``level`` along one axis, in units of ``pixel_size``.

    >>> level_coordinates(3, 0, 0.5).tolist()
    [0.0, 0.5, 1.0]
    >>> level_coordinates(2, 1, 0.5).tolist()
    [0.25, 1.25]
    """
    f = 2**level
    return pixel_size * (f * np.arange(n, dtype=np.float64) + (f - 1) / 2)


@dataclass(frozen=True)
class PixelGrid:
    """Where level-0 pixel centres lie: ``origin + step * index`` per axis (y, x), in ``units``.

    Microns when the pixel size is known, the CRS's units (``step[0] < 0``: north up) for a
    georeferenced input, else pixels.

    >>> g = PixelGrid.of(0.5, None, None)
    >>> g.units, g.coordinates(1, 3, 0).tolist(), g.coordinates(1, 2, 1).tolist()
    ('micrometer', [0.0, 0.5, 1.0], [0.25, 1.25])
    """

    origin: tuple[float, float]
    step: tuple[float, float]
    units: str
    ome_unit: str | None  # OME-Zarr's name for ``units``; None for pixels
    crs_wkt: str | None = None
    transform: tuple[float, ...] | None = None  # level 0, pixel corners (a, b, c, d, e, f)

    @classmethod
    def of(
        cls,
        pixel_size_um: float | None,
        crs: str | None,
        transform: tuple[float, ...] | None,
    ) -> PixelGrid:
        if transform is not None and crs is not None:
            from rasterio.crs import CRS

            ref = CRS.from_user_input(crs)
            a, _, c, _, e, f = transform
            units = ref.linear_units or "unknown"
            ome = {"metre": "meter", "meter": "meter", "foot": "foot"}.get(units)
            # The affine maps pixel corners; coordinates are pixel centres, half a pixel in.
            return cls((f + e / 2, c + a / 2), (e, a), units, ome, ref.to_wkt(), transform)
        if pixel_size_um:
            return cls((0.0, 0.0), (pixel_size_um, pixel_size_um), "micrometer", "micrometer")
        return cls((0.0, 0.0), (1.0, 1.0), "pixel", None)

    def coordinates(self, axis: int, n: int, level: int) -> np.ndarray:
        """Centres of the ``n`` pixels of ``level`` along ``axis`` (0: y, 1: x)."""
        return self.origin[axis] + level_coordinates(n, level, self.step[axis])


def class_colors(n: int) -> list[tuple[int, int, int, int]]:
    """RGBA per class: class 0 (background) transparent, then a qualitative palette."""
    return [(0, 0, 0, 0)] + [(*_PALETTE[(i - 1) % len(_PALETTE)], 255) for i in range(1, n)]


def _datasets(
    paths: list[str], pixel_size: tuple[float, float], leading: int
) -> list[dict[str, Any]]:
    out = []
    for k, path in enumerate(paths):
        step = [p * 2**k for p in pixel_size]
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": [1.0] * leading + step}]
        if k:
            shift = [p * (2**k - 1) / 2 for p in pixel_size]
            transforms.append({"type": "translation", "translation": [0.0] * leading + shift})
        out.append({"path": path, "coordinateTransformations": transforms})
    return out


def _axes(unit: str | None, channel: str | None) -> list[dict[str, Any]]:
    space: dict[str, Any] = {"type": "space"}
    if unit:
        space["unit"] = unit
    axes = [{"name": channel, "type": "channel"}] if channel else []
    return [*axes, {"name": "y", **space}, {"name": "x", **space}]


def multiscale_attributes(
    name: str,
    paths: list[str],
    pixel_size: tuple[float, float],
    unit: str | None,
    *,
    channel: str | None,
    method: str,
) -> dict[str, Any]:
    """One OME-Zarr 0.5 ``multiscales`` entry over ``paths`` (level 0 first).

    ``channel`` names the leading channel axis (``None`` for a (y, x) label image);
    ``pixel_size`` is level 0's (y, x), in ``unit`` (``None``: level-0 pixels, no unit).
    """
    return {
        "name": name,
        "axes": _axes(unit, channel),
        "datasets": _datasets(paths, pixel_size, 1 if channel else 0),
        "type": method,
        "metadata": {"method": f"segpipe.pyramid.reduce_level ({method} of 2x2 blocks)"},
    }


def label_attributes(
    name: str,
    n_levels: int,
    pixel_size: tuple[float, float],
    unit: str | None,
    class_names: tuple[str, ...],
) -> dict[str, Any]:
    """The ``ome`` attribute of the mask's label group, ``labels/<name>``."""
    colors = class_colors(len(class_names))
    return {
        "version": OME_VERSION,
        "multiscales": [
            multiscale_attributes(
                name,
                [str(k) for k in range(n_levels)],
                pixel_size,
                unit,
                channel=None,
                method="mode",
            )
        ],
        "image-label": {
            "version": OME_VERSION,
            "colors": [{"label-value": i, "rgba": list(c)} for i, c in enumerate(colors)],
            "properties": [
                {"label-value": i, "class": c, "name": c} for i, c in enumerate(class_names)
            ],
            "source": {"image": "../../"},
        },
    }


def mode_2x(labels: np.ndarray) -> np.ndarray:
    """Most frequent value of each 2x2 block of a (y, x) label array with even sides.

    Ties go to the block's top-left pixel when it is among the most frequent, else to the
    smaller value, so the result is deterministic.

    >>> mode_2x(np.array([[1, 2, 3, 3], [2, 1, 0, 3]], dtype=np.uint8))
    array([[1, 3]], dtype=uint8)
    """
    ny, nx = labels.shape[0] // 2, labels.shape[1] // 2
    blocks = (
        labels[: 2 * ny, : 2 * nx].reshape(ny, 2, nx, 2).transpose(0, 2, 1, 3).reshape(ny, nx, 4)
    )
    # Each pixel's count among its block: the mode is a pixel with the largest count.
    counts = (blocks[..., :, None] == blocks[..., None, :]).sum(-1)
    # Prefer the top-left pixel on ties (score + 0.5), then the smaller label.
    score = counts * 2 * 256 - blocks.astype(np.int64)
    score[..., 0] += 256
    best = np.argmax(score, axis=-1)
    return np.take_along_axis(blocks, best[..., None], -1)[..., 0].astype(labels.dtype)


def reduce_level(previous: Any, kind: str, shards: tuple[int, ...]) -> da.Array:
    """Level ``k + 1`` of a (…, y, x) Zarr array ``previous`` (level ``k``), lazily.

    Reads ``previous`` in blocks of twice the output ``shards``, so every output chunk is one
    whole shard of the next level. ``kind``: ``"mean"`` or ``"mode"``.
    """
    read = tuple(s if i < len(shards) - 2 else 2 * s for i, s in enumerate(shards))
    src = da.from_zarr(previous, chunks=read)
    if kind == "mean":
        return downsample_mean_2x(src, yx_axes=(src.ndim - 2, src.ndim - 1))
    if kind != "mode":
        raise ValueError(f"kind must be 'mean' or 'mode', got {kind!r}")
    ny, nx = src.shape[-2] // 2, src.shape[-1] // 2
    src = src[..., : 2 * ny, : 2 * nx]
    chunks = tuple(tuple(c // 2 for c in cs) for cs in src.chunks)
    return src.map_blocks(mode_2x, chunks=chunks, dtype=src.dtype)
