"""segpipe.io.ome: the OME-Zarr attributes a result and an ingest carry, as napari and the
OME validators read them."""

from __future__ import annotations

import pytest

from segpipe.io.ome import omero_attributes


@pytest.mark.parametrize("maximum", [1.0, 255.0])  # float probabilities, uint8-packed ones
def test_the_rendering_window_spans_the_stored_probabilities(maximum: float) -> None:
    """napari's contrast limits come from the window: one ending at 1 over uint8 values
    0..255 shows every class saturated from 1/255 on."""
    channels = omero_attributes(("background", "tissue", "nucleus"), maximum=maximum)["channels"]
    assert [c["label"] for c in channels] == ["background", "tissue", "nucleus"]
    for channel in channels:
        assert channel["window"] == {"start": 0.0, "end": maximum, "min": 0.0, "max": maximum}


_LOCAL = 'LOCAL_CS["plan",LOCAL_DATUM["d",0],UNIT["{}",{}],AXIS["x",EAST],AXIS["y",NORTH]]'
_PROJECTED_IN = (
    'PROJCS["x",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563]],'
    'PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]],PROJECTION["Transverse_Mercator"],'
    'PARAMETER["latitude_of_origin",0],PARAMETER["central_meridian",15],PARAMETER["scale_factor",'
    '0.9996],PARAMETER["false_easting",500000],PARAMETER["false_northing",0],UNIT["{}",{}]]'
)


@pytest.mark.parametrize(
    ("crs", "units", "ome_unit"),
    [
        (_LOCAL.format("metre", 1), "metre", "meter"),
        (_LOCAL.format("Meter", 1), "metre", "meter"),  # ESRI's spelling
        (_LOCAL.format("kilometre", 1000), "kilometre", "kilometer"),
        (_LOCAL.format("millimetre", 0.001), "millimetre", "millimeter"),
        (_LOCAL.format("foot", 0.3048), "foot", "foot"),
        (_LOCAL.format("US survey foot", 1200 / 3937), "US survey foot", None),
        # A factor of 1 is what a WKT gives a unit it does not know: not metres
        (_LOCAL.format("unknown", 1), "unknown", None),
        (_LOCAL.format("Unit", 1), "unknown", None),
        (_LOCAL.format("smoot", 1.7018), "unknown", None),
        # "pixel" is segpipe's word for no georeference: taken, the CRS's placement was lost
        (_LOCAL.format("pixel", 1), "unknown", None),
        (_PROJECTED_IN.format("pixel", 1), "unknown", None),
        (_PROJECTED_IN.format("metre", 1), "metre", "meter"),
        ("EPSG:2263", "US survey foot", None),
        ("EPSG:4326", "degree", None),
    ],
)
def test_a_crs_unit_is_named_by_its_length_in_metres(crs, units, ome_unit):
    """rasterio says "unknown" of every local CRS's unit; its WKT name is free text."""
    from segpipe.io.ome import PixelGrid

    grid = PixelGrid.of(None, crs, (2.0, 0.0, 100.0, 0.0, -2.0, 80.0))
    assert (grid.units, grid.ome_unit) == (units, ome_unit)
    assert grid.origin == (79.0, 101.0)  # placed by the CRS, pixel centres, whatever the unit
