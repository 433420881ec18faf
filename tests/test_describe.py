"""segpipe.io.describe: what ``segpipe info`` prints and ``info --json`` writes of an image."""

from __future__ import annotations

import json
import math

import pytest

from segpipe.io.describe import ImageInfo


def _info(nodata: tuple[float | None, ...]) -> ImageInfo:
    return ImageInfo(
        path="x.zarr",
        format="zarr",
        vendor=None,
        levels=((10, 10, len(nodata)),),
        dtype="float32",
        channels=len(nodata),
        nodata=nodata,
        mask_kind="nodata",
    )


@pytest.mark.parametrize(
    ("nodata", "text"),
    [
        ((0.0, 65535.0), "(nodata 0.0, 65535.0)"),  # per band: each listed
        ((0.0, 0.0, 65535.0), "(nodata 0.0, 0.0, 65535.0)"),
        ((-9999.0, -9999.0), "(nodata -9999.0)"),  # one value for every band: once
        ((math.nan, float("nan")), "(nodata nan)"),  # NaN too, though no NaN equals another
        ((-math.inf,), "(nodata -inf)"),
    ],
    ids=["per-band", "two-alike-one-not", "one-for-all", "nan-for-all", "minus-infinity"],
)
def test_the_invalid_pixels_line_gives_each_bands_nodata(
    nodata: tuple[float, ...], text: str
) -> None:
    lines = [line for line in _info(nodata).lines() if line.startswith("invalid pixels")]
    assert lines == [f"invalid pixels: marked by nodata {text}"]


@pytest.mark.parametrize(
    ("value", "text"),
    [(math.nan, "NaN"), (math.inf, "Infinity"), (-math.inf, "-Infinity"), (-9999.0, -9999.0)],
)
def test_a_non_finite_nodata_is_strict_json_text_read_back_as_itself(
    value: float, text: str | float
) -> None:
    written = json.dumps(_info((value,)).to_dict(), allow_nan=False)
    assert json.loads(written)["nodata"] == [text]
    back = float(json.loads(written)["nodata"][0])
    assert back == value or (math.isnan(back) and math.isnan(value))
