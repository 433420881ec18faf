"""Reports people read without a notebook: one per image (markdown + thumbnail), one per run.

The per-image text comes from the result's own metadata (the numbers from
:func:`segpipe.analysis.summary.summarise`, the provenance from
:func:`segpipe.results.read_meta`), so it can be rebuilt for any complete result at any time.
Thumbnail, label image and GeoJSON colour each class alike (:mod:`segpipe.palette`).
The thumbnail is read at low resolution: the image from the coarsest pyramid level that is
still large enough, the mask by strided reads chunk by chunk; neither is ever whole in memory
at full resolution.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from segpipe.analysis.summary import summarise
from segpipe.archive.state import ImageOutcome
from segpipe.atomic import replaced_file
from segpipe.io.files import URLPath, location
from segpipe.io.places import check_replaceable
from segpipe.io.readers import open_image
from segpipe.io.units import UM_PER_UNIT
from segpipe.palette import class_color
from segpipe.results import coordinate_areas, open_result, read_meta

__all__ = [
    "area_unit",
    "describe_run",
    "image_report",
    "run_markdown",
    "run_table",
    "thumbnail_level",
    "write_thumbnail",
]

# (name, square microns per unit), smallest first.
_AREA_UNITS = (("µm²", 1.0), ("mm²", 1e6), ("m²", 1e12), ("km²", 1e18))


def area_unit(total_um2: float) -> tuple[str, float]:
    """The area unit that writes ``total_um2`` with the fewest digits, and its size in µm².

    >>> area_unit(3.2e7)
    ('mm²', 1000000.0)
    >>> area_unit(5e15)[0]
    'm²'
    """
    name, size = _AREA_UNITS[0]
    for candidate, candidate_size in _AREA_UNITS:
        if total_um2 >= candidate_size:
            name, size = candidate, candidate_size
    return name, size


def image_report(
    result: str | os.PathLike[str],
    *,
    image: str | None = None,
    thumbnail: Path | URLPath | None = None,
    source: str | None = None,
) -> str:
    """Markdown report of one complete result: classes (pixels, area, fraction), tiles
    computed and skipped, time and throughput, provenance.

    ``image`` is the name to title it with (default the result's source); ``thumbnail``, when
    given, is linked by file name (it lies next to the result and the report); ``source``,
    the image's place now (default the result's source: where it was when segmented).
    """
    summary = summarise(result)
    meta = read_meta(result)
    title = image or meta.source
    ny, nx = summary.shape
    px = summary.pixel_size_um
    # A georeferenced result's areas are in its CRS's units (µm² otherwise), as `info` gives.
    values, units = coordinate_areas(summary.class_pixels, meta) or ((), None)
    if units and units.startswith("unknown"):  # a local or engineering CRS PROJ cannot name
        units = "CRS units**2"
    if meta.transform and units:
        a, e, unit = meta.transform[0], meta.transform[4], units.removesuffix("**2")
        crs = meta.crs if len(meta.crs or "") <= 32 else "a WKT CRS"  # not the whole WKT
        size = f"{abs(a):.4g} x {abs(e):.4g} {unit}/px ({crs}) |"
    else:
        size = f"{px:.4g} µm/px |" if px else "pixel size unknown |"
    lines = [
        f"# segpipe: {title}",
        "",
        "| | |",
        "|---|---|",
        f"| result | `{result}` |",
        f"| source | `{source or meta.source}` |",
        f"| model | {meta.model_name} (sha256 `{meta.model_sha256[:12]}`) |",
        f"| size | {ny} x {nx} px at level {meta.config.level}, {size}",
        f"| tiles | {summary.tiles_computed} computed ({summary.tiles_skipped} of them by an"
        f" earlier, resumed run), {summary.tiles_total} in all |",
        f"| time | {summary.seconds:.1f} s, {summary.megapixels_per_second:.3g} megapixels/s |",
        f"| finished | {meta.finished} |",
        "",
        "## Classes",
        "",
    ]
    # Metric units become µm² so the unit that takes fewest digits is chosen (m², km²) as for
    # µm; feet and degrees stay as they are.
    um = UM_PER_UNIT.get((units or "").removesuffix("**2"))
    per_um2 = um**2 if um else None
    if units and per_um2:
        unit, scale = area_unit(sum(values) * per_um2)
        lines += [f"| class | pixels | area ({unit}) | fraction |", "|---|---:|---:|---:|"]
        areas: Sequence[float | None] = [v * per_um2 / scale for v in values]
    elif units:  # feet, degrees: as they are
        lines += [f"| class | pixels | area ({units}) | fraction |", "|---|---:|---:|---:|"]
        areas = list(values)
    else:
        lines += ["| class | pixels | area | fraction |", "|---|---:|---:|---:|"]
        areas = [None] * len(summary.class_names)
    for name, count, area, fraction in zip(
        summary.class_names, summary.class_pixels, areas, summary.class_fraction, strict=True
    ):
        shown = _number(area) if area is not None else "n/a (no pixel size)"
        lines.append(f"| {name} | {count} | {shown} | {100 * fraction:.2f}% |")
    if thumbnail is not None:
        lines += ["", f"Thumbnail: `{thumbnail.name}` (mask over the image)"]
    return "\n".join(lines) + "\n"


def _number(x: float) -> str:
    """``12,345`` for large numbers, four significant digits for small ones."""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def thumbnail_level(level_shapes: Sequence[tuple[int, ...]], level: int, max_side: int) -> int:
    """The coarsest pyramid level at or above ``level`` whose larger side is still at least
    ``max_side`` pixels (``level`` itself when none is).

    >>> thumbnail_level([(4096, 4096, 3), (2048, 2048, 3), (1024, 1024, 3), (512, 512, 3)], 0, 600)
    2
    """
    best = level
    for k in range(level, len(level_shapes)):
        if max(level_shapes[k][:2]) >= max_side:
            best = k
    return best


# How each file the archive writes begins: it replaces or removes only such a file, never
# a user's of the same name (kept in the output root, or put there by mistake).
_BEGINS = {"report": b"# segpipe: ", "thumbnail": b"\x89PNG\r\n\x1a\n"}


def check_made(path: Path | URLPath, kind: Literal["report", "thumbnail"]) -> None:
    """ValueError naming ``path`` unless it is missing or begins as the archive's ``kind``
    of file does (:func:`image_report`'s title, a PNG's signature)."""
    with contextlib.suppress(FileNotFoundError):
        check_replaceable(path, f"archive {kind}", _BEGINS[kind])


def write_thumbnail(
    image: str | os.PathLike[str],
    result: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    level: int = 0,
    max_side: int = 512,
    alpha: float = 0.45,
) -> Path | URLPath:
    """Write a PNG of the result's mask over the image, at most ``max_side`` pixels a side.

    Parameters
    ----------
    image
        The image that was segmented (any path :func:`segpipe.open_image` reads).
    result
        Its complete result store.
    out
        The PNG to write (replaced atomically).
    level
        The image level the result was segmented at.
    max_side
        Larger side of the thumbnail, pixels.
    alpha
        Opacity of the class colours; background (class 0) stays clear.
    """
    from PIL import Image

    from segpipe.geometry.pixels import to_float01

    mask = open_result(result)["mask"].data  # (y, x), dask, chunked like the tiles
    ny, nx = mask.shape
    step = max(1, math.ceil(max(ny, nx) / max_side))
    small = np.asarray(mask[::step, ::step].compute(scheduler="sync"))
    ty, tx = small.shape

    reader = open_image(image)
    try:
        k = thumbnail_level(reader.level_shapes, level, max_side)
        ly, lx, _ = reader.level_shapes[k]
        # Stride the chosen level down to about the thumbnail's size; Pillow does the last bit.
        stride = max(1, min(ly // ty, lx // tx))
        pixels = reader.level(k)[::stride, ::stride]
        rgb = np.asarray(to_float01(pixels).compute(scheduler="sync"))
    finally:
        cast(Any, reader).close()  # opened here: closed here (BaseReader's), not by the GC
    rgb = _as_rgb(rgb)
    level_image = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8), "RGB")
    base = np.asarray(level_image.resize((tx, ty), Image.Resampling.BILINEAR), dtype=np.float32)

    colours = np.array([class_color(i) for i in range(int(small.max()) + 1)], dtype=np.float32)
    overlay = colours[small]
    weight = np.where(small[..., None] > 0, alpha, 0.0).astype(np.float32)
    blended = (base * (1 - weight) + overlay * weight).round().astype(np.uint8)

    out = location(out)
    if isinstance(out, URLPath):  # one PUT: whole or not at all
        png = io.BytesIO()
        Image.fromarray(blended, "RGB").save(png, format="PNG")
        out.write_bytes(png.getvalue())
        return out
    with replaced_file(out) as tmp:
        Image.fromarray(blended, "RGB").save(tmp, format="PNG")
    return out


def _as_rgb(pixels: np.ndarray) -> np.ndarray:
    """``(y, x, C)`` floats as ``(y, x, 3)``: grey repeated, alpha or extra bands dropped."""
    if pixels.shape[2] == 1:
        return np.repeat(pixels, 3, axis=2)
    if pixels.shape[2] == 2:  # grey + alpha
        return np.repeat(pixels[..., :1], 3, axis=2)
    return pixels[..., :3]


# ------------------------------------------------------------------------------------------
# Per run
# ------------------------------------------------------------------------------------------

RUN_COLUMNS = (
    "image",
    "status",
    "reason",
    "tiles_computed",
    "tiles_skipped",
    "seconds",
    "megapixels_per_second",
    "result",
)


def run_table(outcomes: Iterable[ImageOutcome]) -> list[dict[str, Any]]:
    """One row per image (columns :data:`RUN_COLUMNS`), for a Prefect table artifact."""
    return [{c: outcome.as_row()[c] for c in RUN_COLUMNS} for outcome in outcomes]


def describe_run(outcomes: Sequence[ImageOutcome], gone: Sequence[str] = ()) -> str:
    """One sentence on what a run did, e.g. ``"3 images: nothing to segment, 3 up to date"``;
    ``gone``: keys of the catalog's images no longer in the archive (their results stay)."""
    counts = {s: sum(o.status == s for o in outcomes) for s in ("segmented", "skipped")}
    busy = sum(o.status == "busy" for o in outcomes)
    tried = counts["segmented"] or any(o.status in ("failed", "changed") for o in outcomes)
    parts = [
        f"{counts['segmented']} segmented" if tried else "nothing to segment",
        f"{counts['skipped']} up to date",
    ]
    if busy:
        parts.append(f"{busy} busy in another run")
    for status, what in _LISTED:
        if keys := [o.image for o in outcomes if o.status == status]:
            parts.append(f"{len(keys)} {what} ({', '.join(keys)})")
    if gone:
        parts.append(f"{len(gone)} recorded but gone from the archive ({', '.join(gone)})")
    n = len(outcomes)
    return f"{n} image{'' if n == 1 else 's'}: " + ", ".join(parts)


# Statuses a run's summary names image by image, and how (the markdown gives their reasons).
_LISTED = (
    ("failed", "failed"),
    ("held", "held after failing"),
    ("changed", "changed while segmenting, due again"),
)


def run_markdown(outcomes: Sequence[ImageOutcome], gone: Sequence[str] = ()) -> str:
    """Markdown summary of a run: the sentence, then each image failed, held back after
    failing or changed while segmenting, with its reason."""
    lines = [describe_run(outcomes, gone)]
    for status, what in _LISTED:
        if listed := [o for o in outcomes if o.status == status]:
            lines += ["", f"## {what.capitalize()}", ""]
            lines += [f"- `{o.image}`: {o.reason}" for o in listed]
    return "\n".join(lines) + "\n"
