"""What the commands print for people, in one place (areas, result summaries), and the one
shape of an option's old spelling (:class:`DeprecatedAlias`)."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["DeprecatedAlias", "area_key", "area_text", "print_summary"]

# The units of segpipe's area values (pint spelling, `class_areas`) -> (JSON key suffix, text).
_AREA_UNITS = {
    "micrometer**2": ("um2", "µm²"),
    "metre**2": ("m2", "m²"),
    "meter**2": ("m2", "m²"),
    # The other lengths a CRS measures in (rasterio's names, and io.ome's for a local CRS).
    "kilometre**2": ("km2", "km²"),
    "centimetre**2": ("cm2", "cm²"),
    "millimetre**2": ("mm2", "mm²"),
    "foot**2": ("ft2", "ft²"),
    "US survey foot**2": ("ftUS2", "US survey ft²"),
    # A result without a pixel size measures areas in pixels of level 0 (its x and y are),
    # whatever level is read: its level-1 pixel is 4 of them.
    "pixel**2": ("px", "level-0 px²"),
    # A geographic CRS's: degrees² of longitude by latitude, not an area on the ground.
    "degree**2": ("deg2", "deg²"),
    # A local CRS whose unit PROJ cannot name: its areas in it, as the archive report says.
    "unknown**2": ("unknown2", "CRS units²"),
}


def area_key(units: str) -> str:
    """The JSON key of an area in ``units``: ``area_um2``, ``area_m2``, ``area_px`` (pixels
    of level 0, as ``area_text`` says); a name of units segpipe does not know in word
    characters, so that the key is one identifier.

    >>> area_key("micrometer**2"), area_key("Clarke's link**2")
    ('area_um2', 'area_Clarke_s_link2')
    """
    known = _AREA_UNITS.get(units)
    return "area_" + (known[0] if known else re.sub(r"\W+", "_", units.replace("**", "")))


def area_text(value: float, units: str = "micrometer**2") -> str:
    """An area for people, in the result's units, µm² for a microscopy result.

    >>> area_text(1234567.25)
    '1,234,567.2 µm²'
    >>> area_text(12.0, "pixel**2")
    '12 level-0 px²'
    >>> area_text(1e-06, "furlong**2"), area_text(0.25), area_text(2e4, "US survey foot**2")
    ('1e-06 furlong**2', '0.25 µm²', '20,000.0 US survey ft²')
    >>> area_text(1500.0, "unknown**2")
    '1,500.0 CRS units²'
    """
    suffix, text = _AREA_UNITS.get(units, ("", units))
    if suffix == "px":
        return f"{value:,.0f} {text}"
    # Significant figures where one decimal would round a real area to 0.0 or blur it: in units
    # segpipe does not know, or below one unit (a geographic CRS's pixel: 1e-8 degrees²).
    if not suffix or 0 < abs(value) < 1:
        return f"{value:.4g} {text}"
    return f"{value:,.1f} {text}"


def print_summary(s: Mapping[str, Any]) -> None:
    """A finished result's summary (``segpipe.analysis.summary.summarise(...).as_dict()``)."""
    print(f"result: {s['path']}  ({s['shape'][0]} x {s['shape'][1]} px", end="")
    print(f", {s['pixel_size_um']} µm/px)" if s["pixel_size_um"] else ")")
    if s.get("origin_um"):  # where napari and the micron GeoJSON place it
        print(f"origin: y {s['origin_um'][0]:g}, x {s['origin_um'][1]:g} µm (the source's)")
    # A georeferenced result's in its CRS units; a summary of an older release's in µm²
    areas, units = s.get("class_area"), s.get("area_units") or "micrometer**2"
    if areas is None:
        areas, units = s["class_area_um2"], "micrometer**2"
    for i, name in enumerate(s["class_names"]):
        line = f"  {name:<12} {100 * s['class_fraction'][i]:6.2f} %"
        if areas:
            line += f"  {area_text(areas[i], units):>20}"
        if s.get("dice"):
            line += f"  Dice {s['dice'][i]:.4f}"
        print(line)
    if s.get("foreground_pixels") is not None:
        area = s.get("foreground_area")
        print(
            f"foreground: {100 * s['foreground_fraction']:.2f} % of the image"
            + (f", {area_text(area, units)}" if area is not None else "")
            + f"; {s['tiles_background']} tiles without it left as {s['class_names'][0]}"
        )
    print(
        f"tiles: {s['tiles_computed']} computed of {s['tiles_total']}; "
        f"{s['seconds']:.1f} s segmenting ({s['megapixels_per_second']:.2f} Mpx/s)"
    )


class DeprecatedAlias(argparse.Action):
    """An option's old spelling: hidden from the help, takes the same value(s) into the same
    ``dest``, and says on stderr what to write instead (``new``)."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, new: str, **kw: Any) -> None:
        kw.setdefault("default", argparse.SUPPRESS)  # the new option's default stands
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kw)
        self.new = new

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(f"{parser.prog}: warning: {option_string} is deprecated; {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)
