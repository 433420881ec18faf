"""What a finished result says: class areas in physical units and, given ground truth, Dice.

The numbers come from the result's typed metadata (:func:`segpipe.results.read_meta`): the
run's summary carries the per-class pixel counts, and :func:`segpipe.results.class_areas_um2`
turns them into areas. Dice reads the mask lazily and reduces it chunk by chunk, so a
gigapixel mask is never whole in memory.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from segpipe.analysis.metrics import LabelError, confusion_matrix, dice, iou
from segpipe.analysis.scores import score_or_none
from segpipe.io.files import is_url
from segpipe.io.labelfiles import label_plane
from segpipe.results import (
    ResultMeta,
    class_fractions,
    coordinate_areas,
    naming_damage,
    open_result,
    read_meta,
)

__all__ = ["ResultSummary", "confusion_against", "summarise"]


@dataclass(frozen=True)
class ResultSummary:
    """A result in numbers. Areas in square microns when the pixel size is known
    (``class_area_um2``), and in the result's coordinate units (``class_area``, also of a
    georeferenced result)."""

    path: str
    shape: tuple[int, int]  # (y, x) pixels of the segmented level
    pixel_size_um: float | None
    class_names: tuple[str, ...]
    class_pixels: tuple[int, ...]
    class_area_um2: tuple[float, ...] | None
    class_fraction: tuple[float, ...]
    tiles_total: int
    tiles_computed: int
    tiles_skipped: int  # already written by an earlier, interrupted run
    seconds: float
    megapixels_per_second: float
    dice: tuple[float, ...] | None = None  # per class, against ground truth
    iou: tuple[float, ...] | None = None
    # The foreground mask (SegmentConfig.foreground), None without one. Tiles without
    # foreground were not computed: their pixels count as class 0 in class_pixels, so class
    # fractions are of the whole image. The pixels computed are the boxes of cells around
    # the foreground, more than foreground_pixels: a class's pixels over foreground_pixels
    # is no share of the tissue (it passed 1); count the mask where the result's
    # labels/foreground label image is 1 for that.
    tiles_background: int = 0
    foreground_pixels: int | None = None
    foreground_area_um2: float | None = None
    foreground_fraction: float | None = None  # of the image's pixels
    # Areas in the result's coordinate units (µm², a CRS's metre² or foot²), None in pixels
    class_area: tuple[float, ...] | None = None
    area_units: str | None = None  # "micrometer**2", "metre**2"
    foreground_area: float | None = None  # in area_units
    # (y, x) µm where the source's level 0 lies (an OME-Zarr's translation); None at 0
    origin_um: tuple[float, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (tuples stay tuples; an undefined score, NaN: a class in
        neither the mask nor the truth, None, JSON's null, as ``Evaluation.as_dict``'s)."""
        fields = asdict(self)
        for name in ("dice", "iou"):
            if fields[name] is not None:
                fields[name] = tuple(score_or_none(float(v)) for v in fields[name])
        return fields


def confusion_against(mask: da.Array, truth: da.Array, num_classes: int) -> np.ndarray:
    """(C, C) confusion (rows truth, columns prediction) of two (y, x) label arrays, summed
    over chunks; ``truth`` is rechunked to ``mask``'s chunks."""
    if mask.shape != truth.shape:
        raise ValueError(f"mask {mask.shape} and ground truth {truth.shape} differ in shape")
    truth = truth.rechunk(mask.chunks)
    parts = [
        dask.delayed(confusion_matrix)(m, t, num_classes)
        for m, t in zip(mask.to_delayed().ravel(), truth.to_delayed().ravel(), strict=True)
    ]
    return np.sum(dask.compute(*parts), axis=0)


def summarise(
    result: str | os.PathLike, ground_truth: str | os.PathLike | None = None
) -> ResultSummary:
    """Summarise a complete result; ``ground_truth`` is a label image (one channel, class
    indices, same shape as the mask) readable by ``open_image``."""
    ds = open_result(result)  # refuses an incomplete result
    meta = read_meta(result)
    run = meta.summary
    if run is None:
        raise ValueError(
            f"{result} is complete but holds no run summary (class pixel counts, tiles, time); "
            "it was finished by another tool. Delete it (segpipe.results.delete_result) and "
            "segment the image again."
        )
    scores: dict[str, Any] = {}
    if ground_truth is not None:
        truth, n = label_plane(ground_truth, "ground truth"), len(meta.class_names)
        if truth.shape != ds["mask"].shape:
            raise ValueError(
                f"{ground_truth}: ground truth of {truth.shape[0]} x {truth.shape[1]} px, but "
                f"the result {result} is {meta.shape[0]} x {meta.shape[1]} px"
            )
        try:  # a damaged chunk of the result named (its zstd's RuntimeError came out raw)
            with naming_damage(result):
                conf = confusion_against(ds["mask"].data, truth, n)
        except LabelError:  # ids outside the result's classes: the file's range, not a chunk's
            mask = ds["mask"].data
            lo, hi, mlo, mhi = (int(v) for v in dask.compute(truth.min(), truth.max(),
                                                             mask.min(), mask.max()))  # fmt: skip
            if not 0 <= mlo <= mhi < n:  # the result's own mask: damaged, not the truth
                raise ValueError(
                    f"{result}: its mask holds class ids in [{mlo}, {mhi}], outside its "
                    f"{n} classes; the result is damaged: segment it again"
                ) from None
            raise ValueError(
                f"{ground_truth} (ground truth of {result}): holds class ids in [{lo}, {hi}], "
                f"outside the result's {n} classes [0, {n}); map those pixels (ignored ones, "
                "e.g. 255) to one of its classes first"
            ) from None
        except ValueError as exc:  # a damaged chunk of either: zarr's message names neither
            what = f"{result} or its ground truth {ground_truth}"
            raise ValueError(f"{what} cannot be read: {exc}") from exc
        scores = {"dice": tuple(dice(conf).tolist()), "iou": tuple(iou(conf).tolist())}
    areas = coordinate_areas(run.class_pixels, meta)
    return ResultSummary(
        path=str(result if is_url(result) else Path(result)),
        shape=meta.shape,
        pixel_size_um=meta.pixel_size_um,
        class_names=meta.class_names,
        class_pixels=run.class_pixels,
        class_area_um2=meta.class_areas_um2,
        class_fraction=class_fractions(run.class_pixels),
        tiles_total=run.tiles_total,
        tiles_computed=run.tiles_computed,
        tiles_skipped=run.tiles_skipped,
        seconds=run.seconds,
        megapixels_per_second=run.megapixels_per_second,
        **scores,
        class_area=areas[0] if areas else None,
        area_units=areas[1] if areas else None,
        **_foreground(run.foreground_pixels, run.tiles_background, meta),
        origin_um=meta.origin_um,
    )


def _foreground(pixels: int | None, tiles: int, meta: ResultMeta) -> dict[str, Any]:
    if pixels is None:
        return {"tiles_background": tiles}
    area = coordinate_areas([pixels], meta)  # a georeferenced result's in its CRS units
    return {
        "tiles_background": tiles,
        "foreground_pixels": pixels,
        "foreground_area_um2": pixels * meta.pixel_size_um**2 if meta.pixel_size_um else None,
        "foreground_fraction": pixels / (meta.shape[0] * meta.shape[1]),
        "foreground_area": area[0][0] if area else None,
    }
