"""Physical units of pixel sizes: unit names to microns, and the checks every reader applies."""

from __future__ import annotations

import math
import warnings

__all__ = ["UM_PER_UNIT", "check_pixel_size", "pixel_size_of_xy", "positive_or_none"]

# Length units to micrometres: OME-XML symbols, OME-Zarr (UDUNITS-2) names and ImageJ's.
UM_PER_UNIT = {
    "pm": 1e-6,
    "Å": 1e-4,
    "nm": 1e-3,
    "µm": 1.0,
    "μm": 1.0,  # Greek mu, not the micro sign
    "um": 1.0,
    "mm": 1e3,
    "cm": 1e4,
    "dm": 1e5,
    "m": 1e6,
    "thou": 25.4,  # OME's imperial units
    "in": 25400.0,
    "ft": 304800.0,
    "yd": 914400.0,
    "picometer": 1e-6,
    "angstrom": 1e-4,
    "nanometer": 1e-3,
    "micrometer": 1.0,
    "micrometers": 1.0,  # UDUNITS-2 takes plurals and British spellings too
    "micrometre": 1.0,
    "micrometres": 1.0,
    "micron": 1.0,
    "microns": 1.0,  # ImageJ's calibration unit as users type it
    "millimeter": 1e3,
    "centimeter": 1e4,
    "meter": 1e6,
    "kilometer": 1e9,
    "millimetre": 1e3,  # PROJ's names of a CRS's units (rasterio's linear_units)
    "centimetre": 1e4,
    "metre": 1e6,
    "kilometre": 1e9,
    "inch": 25400.0,
    # The rest of NGFF's space units (UDUNITS-2 names) and of OME's UnitsLength symbols:
    # valid in a file, so read, however unlikely for a pixel.
    "yoctometer": 1e-18,
    "zeptometer": 1e-15,
    "attometer": 1e-12,
    "femtometer": 1e-9,
    "decimeter": 1e5,
    "hectometer": 1e8,
    "megameter": 1e12,
    "gigameter": 1e15,
    "terameter": 1e18,
    "petameter": 1e21,
    "exameter": 1e24,
    "zettameter": 1e27,
    "yottameter": 1e30,
    "foot": 304800.0,
    "yard": 914400.0,
    "mile": 1609344000.0,
    "parsec": 3.0856775814913673e22,
    "ym": 1e-18,
    "zm": 1e-15,
    "am": 1e-12,
    "fm": 1e-9,
    "dam": 1e7,
    "hm": 1e8,
    "km": 1e9,
    "Mm": 1e12,
    "Gm": 1e15,
    "Tm": 1e18,
    "Pm": 1e21,
    "Em": 1e24,
    "Zm": 1e27,
    "Ym": 1e30,
    "li": 25400.0 / 12,  # a line, a twelfth of an inch
    "pt": 25400.0 / 72,  # a typographic point
    "mi": 1609344000.0,
    "ua": 1.495978707e17,
    "ly": 9.4607304725808e21,
    "pc": 3.0856775814913673e22,
}


def check_pixel_size(value: float, what: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a positive number of microns per pixel, got {value}")
    return value


def pixel_size_of_xy(x: float | None, y: float | None, path: str, what: str) -> float | None:
    if x is None:
        x = y
    elif (
        y is not None
        and math.isfinite(x)
        and math.isfinite(y)  # NaN is close to nothing, itself included: no "differs"
        and not math.isclose(x, y, rel_tol=1e-3)
    ):
        warnings.warn(f"{path}: {what} differs in X ({x} µm) and Y ({y} µm); using X", stacklevel=4)
    return None if x is None else positive_or_none(x, path, what)


def positive_or_none(
    value: float | str | None, path: str | None = None, what: str = ""
) -> float | None:
    """``value`` (a number, or its text in a file's metadata) as a finite number > 0, else
    None: quietly for a value that is absent (None), with a warning naming ``path`` and
    ``what`` for one that is present but no positive number, when ``path`` is given.

    >>> positive_or_none("20"), positive_or_none(None), positive_or_none("inf")
    (20.0, None, None)
    """
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if math.isfinite(number) and number > 0:
        return number
    if path is not None:
        warnings.warn(f"{path}: ignoring {what} {value!r}: not a positive number", stacklevel=4)
    return None
