"""segpipe.io.units through the files that carry pixel sizes: every length unit segpipe knows,
in an OME-TIFF's PhysicalSize and an ImageJ TIFF's calibration, and the X/Y checks.

The microns per unit below are written out by hand (the SI prefixes; an inch is 25.4 mm, a
foot 12 inches, a yard 3 feet, a thou 1/1000 inch), not taken from ``UM_PER_UNIT``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

from segpipe.io.readers import open_image
from segpipe.io.units import UM_PER_UNIT

MICRONS_PER_UNIT = {
    "pm": 1e-6,
    "picometer": 1e-6,
    "Å": 1e-4,
    "angstrom": 1e-4,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "µm": 1.0,  # the micro sign
    "μm": 1.0,  # the Greek mu
    "um": 1.0,
    "micrometer": 1.0,
    "micrometers": 1.0,
    "micrometre": 1.0,
    "micrometres": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "mm": 1e3,
    "millimeter": 1e3,
    "cm": 1e4,
    "centimeter": 1e4,
    "dm": 1e5,
    "m": 1e6,
    "meter": 1e6,
    "kilometer": 1e9,
    "millimetre": 1e3,  # British spellings: UDUNITS-2's, and PROJ's names of a CRS's units
    "centimetre": 1e4,
    "metre": 1e6,
    "kilometre": 1e9,
    "thou": 25.4,
    "in": 25_400.0,
    "inch": 25_400.0,
    "ft": 304_800.0,
    "yd": 914_400.0,
    # NGFF's other space units and OME's other UnitsLength symbols (read from an OME-Zarr
    # they were "unknown", the pixel size dropped)
    "yoctometer": 1e-18,
    "ym": 1e-18,
    "zeptometer": 1e-15,
    "zm": 1e-15,
    "attometer": 1e-12,
    "am": 1e-12,
    "femtometer": 1e-9,
    "fm": 1e-9,
    "decimeter": 1e5,
    "dam": 1e7,
    "hectometer": 1e8,
    "hm": 1e8,
    "km": 1e9,
    "megameter": 1e12,
    "Mm": 1e12,
    "gigameter": 1e15,
    "Gm": 1e15,
    "terameter": 1e18,
    "Tm": 1e18,
    "petameter": 1e21,
    "Pm": 1e21,
    "exameter": 1e24,
    "Em": 1e24,
    "zettameter": 1e27,
    "Zm": 1e27,
    "yottameter": 1e30,
    "Ym": 1e30,
    "foot": 304_800.0,
    "yard": 914_400.0,
    "mile": 5280 * 304_800.0,
    "mi": 5280 * 304_800.0,
    "li": 25_400.0 / 12,
    "pt": 25_400.0 / 72,
    "ua": 149_597_870_700e6,  # the IAU's astronomical unit, exactly
    "ly": 299_792_458e6 * 365.25 * 86_400,  # a Julian year of light
    "parsec": 149_597_870_700e6 * 648_000 / np.pi,
    "pc": 149_597_870_700e6 * 648_000 / np.pi,
}
PIXEL = np.zeros((16, 16), np.uint8)


def _opened(path: Path) -> tuple[float | None, list[str]]:
    """The pixel size read from ``path``, and the warnings about it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        px = open_image(path).pixel_size_um
    return px, [str(w.message) for w in caught if not issubclass(w.category, ResourceWarning)]


def _ome_tiff(path: Path, **sizes: float | str) -> Path:
    tifffile.imwrite(path, PIXEL, metadata={"axes": "YX", **sizes}, ome=True)
    return path


def test_every_unit_segpipe_knows_is_checked_here() -> None:
    assert set(UM_PER_UNIT) == set(MICRONS_PER_UNIT)


@pytest.mark.parametrize(("unit", "um"), MICRONS_PER_UNIT.items())
def test_an_ome_physical_size_in_any_length_unit_reads_in_microns(
    tmp_path: Path, unit: str, um: float
) -> None:
    size = {"PhysicalSizeX": 0.5 / um, "PhysicalSizeY": 0.5 / um}
    path = _ome_tiff(tmp_path / "u.ome.tif", **size, PhysicalSizeXUnit=unit, PhysicalSizeYUnit=unit)
    px, said = _opened(path)
    assert px == pytest.approx(0.5, rel=1e-9)
    assert said == []


@pytest.mark.parametrize(
    ("unit", "um"),
    # ImageJ escapes µ and Å; a TIFF rational (32-bit numerator and denominator) holds pixels
    # per unit of 1e-9 to 1e9 µm, not an attometre's or a light year's.
    [(u, um) for u, um in MICRONS_PER_UNIT.items() if u.isascii() and 1e-9 <= um <= 1e9],
)
def test_an_imagej_calibration_in_any_length_unit_reads_in_microns(
    tmp_path: Path, unit: str, um: float
) -> None:
    path = tmp_path / "ij.tif"
    per_unit = um / 0.5  # pixels per unit: ImageJ's X/YResolution, ResolutionUnit none
    tifffile.imwrite(
        path, PIXEL, imagej=True, resolution=(per_unit, per_unit), metadata={"unit": unit}
    )
    px, said = _opened(path)
    assert px == pytest.approx(0.5, rel=1e-6)  # a TIFF rational holds the resolution
    assert said == []


@pytest.mark.parametrize(
    ("y", "is_warned"),
    [
        (0.525, True),  # 5% taller than wide
        (0.501, True),  # 0.2%
        (0.5004, False),  # 0.08%: a rounding in the file, not another pixel shape
        (0.4996, False),
        (0.5, False),
    ],
)
def test_pixels_of_another_height_than_width_are_warned_of_past_a_tenth_of_a_percent(
    tmp_path: Path, y: float, is_warned: bool
) -> None:
    path = _ome_tiff(tmp_path / "a.ome.tif", PhysicalSizeX=0.5, PhysicalSizeY=y)
    px, said = _opened(path)
    assert px == 0.5  # X's, either way
    differs = [m for m in said if "differs in X (0.5 µm) and Y" in m]
    assert len(differs) == int(is_warned), said


@pytest.mark.parametrize("axis", ["X", "Y"])
def test_a_pixel_size_given_for_one_axis_only_is_taken_for_both(tmp_path: Path, axis: str) -> None:
    path = _ome_tiff(tmp_path / "one.ome.tif", **{f"PhysicalSize{axis}": 0.5})
    assert _opened(path) == (0.5, [])
