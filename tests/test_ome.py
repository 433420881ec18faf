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
