"""segpipe.archive.reports: the per-image markdown, the thumbnail, the run table."""

import numpy as np
import pytest
from PIL import Image

import segpipe
from segpipe.archive import ImageOutcome, reports
from segpipe.palette import class_color


@pytest.fixture(scope="module")
def segmented(tmp_path_factory, random_checkpoint):
    """A 256 x 256 slide as a three-level pyramid (256, 128, 64) and its complete result."""
    from segpipe.io.writers import write_pyramidal_tiff
    from segpipe.synthetic import tissue_slide

    folder = tmp_path_factory.mktemp("reports")
    slide = tissue_slide(256, seed=4, pixel_size_um=0.5)
    image = write_pyramidal_tiff(
        folder / "s.ome.tif", slide.image, pixel_size_um=0.5, tile=64, min_level_size=64
    )
    result = segpipe.segment(
        image, folder / "s.seg.zarr", random_checkpoint, tile=64, scheduler="sync"
    )
    return image, result


def test_report_gives_areas_fractions_tiles_and_speed(segmented):
    _, result = segmented
    mask = segpipe.open_result(result)["mask"].values
    counts = np.bincount(mask.ravel(), minlength=3)
    text = reports.image_report(result, image="day-1/s.ome.tif")
    assert text.startswith("# segpipe: day-1/s.ome.tif")
    assert "| size | 256 x 256 px at level 0, 0.5 µm/px |" in text
    assert "| tiles | 16 computed (0 of them by an earlier, resumed run), 16 in all |" in text
    assert "megapixels/s" in text
    assert "| class | pixels | area (µm²) | fraction |" in text  # 16 384 µm² in all
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in text.splitlines()}
    for name, n in zip(("background", "tissue", "nucleus"), counts, strict=True):
        pixels, area, fraction = rows[name]
        assert int(pixels) == n
        assert float(area.replace(",", "")) == pytest.approx(n * 0.5**2, rel=1e-3)
        assert fraction == f"{100 * n / counts.sum():.2f}% |"


@pytest.mark.parametrize(
    ("um2", "unit"), [(10.0, "µm²"), (2.5e6, "mm²"), (3e13, "m²"), (4e19, "km²"), (0.0, "µm²")]
)
def test_area_unit(um2, unit):
    assert reports.area_unit(um2)[0] == unit


@pytest.mark.parametrize(
    ("level", "max_side", "expected"), [(0, 100, 1), (0, 200, 0), (1, 100, 1), (0, 5000, 0)]
)
def test_thumbnail_level_is_the_coarsest_large_enough(level, max_side, expected):
    shapes = [(300, 300, 3), (150, 150, 3)]
    assert reports.thumbnail_level(shapes, level, max_side) == expected


def test_thumbnail_overlays_the_mask_and_reads_no_full_resolution_level(
    segmented, tmp_path, monkeypatch
):
    image, result = segmented
    from segpipe.io import readers

    reader = readers.open_image(image)
    assert [s[0] for s in reader.level_shapes] == [256, 128, 64]
    full_reads = []
    original = type(reader).level

    def spy(self, level=0):
        if level == 0:
            full_reads.append(level)
        return original(self, level)

    monkeypatch.setattr(type(reader), "level", spy)
    out = reports.write_thumbnail(image, result, tmp_path / "t.png", max_side=100)
    assert full_reads == [], "the image was read at full resolution"

    thumb = np.asarray(Image.open(out))
    assert thumb.shape == (86, 86, 3)  # the mask read every 3rd pixel
    small = segpipe.open_result(result)["mask"].values[::3, ::3]
    # Background pixels show the image itself; class pixels lean to their colour.
    base = np.asarray(
        Image.fromarray(reader.read(0, 128, 0, 128, level=1)).resize((86, 86), Image.BILINEAR),
        dtype=float,
    )
    background = small == 0
    np.testing.assert_allclose(thumb[background], base[background], atol=2)
    if (small == 2).any():
        red = np.array(class_color(2), dtype=float)
        closer = np.abs(thumb[small == 2] - red).sum(1) < np.abs(base[small == 2] - red).sum(1)
        assert closer.mean() > 0.9


def _outcomes():
    return [
        ImageOutcome("a.svs", "segmented", "new image", "/o/a.svs.seg.zarr", tiles_computed=4),
        ImageOutcome("b.svs", "skipped", "up to date", "/o/b.svs.seg.zarr", tiles_computed=0),
        ImageOutcome.failure("c.tif", ValueError("/in/c.tif: the TIFF holds no image")),
    ]


def test_run_table_has_a_row_per_image_naming_failures():
    rows = reports.run_table(_outcomes())
    assert [r["image"] for r in rows] == ["a.svs", "b.svs", "c.tif"]
    assert list(rows[0]) == list(reports.RUN_COLUMNS)
    assert rows[2]["status"] == "failed"
    assert rows[2]["reason"] == "ValueError: /in/c.tif: the TIFF holds no image"


def test_describe_run_says_when_nothing_was_segmented():
    skipped = [ImageOutcome(k, "skipped", "up to date") for k in ("a", "b")]
    assert reports.describe_run(skipped) == "2 images: nothing to segment, 2 up to date"
    assert reports.describe_run(skipped[:1]) == "1 image: nothing to segment, 1 up to date"
    # Due, and failed: there was something to segment.
    failed = [ImageOutcome.failure("a", ValueError("corrupt")), ImageOutcome("b", "busy", "x")]
    assert (
        reports.describe_run(failed) == "2 images: 0 segmented, 0 up to date, 1 busy in "
        "another run, 1 failed (a)"
    )
    text = reports.run_markdown(_outcomes())
    assert text.startswith("3 images: 1 segmented, 1 up to date, 1 failed (c.tif)")
    assert "- `c.tif`: ValueError: /in/c.tif: the TIFF holds no image" in text


def test_a_run_whose_image_changed_while_segmenting_tried_to_segment():
    """An image that changed under its segmentation was due and segmented (its result made
    for nothing): the run says "0 segmented", not "nothing to segment", which reads as an
    archive up to date."""
    changed = [ImageOutcome("a.svs", "changed", "image changed while segmenting")]
    assert reports.describe_run(changed) == (
        "1 image: 0 segmented, 0 up to date, 1 changed while segmenting, due again (a.svs)"
    )


def test_report_areas_are_in_the_unit_its_header_names(tmp_path):
    """64 x 64 px at 32 µm/px, 4.19 mm² in all: areas in mm², not µm² under an mm² header."""
    from test_query import make_result

    labels = np.zeros((64, 64), np.uint8)
    labels[:16] = 1  # 1024 px, 1.048576 mm²
    path, _ = make_result(tmp_path / "r.zarr", labels, pixel_size_um=32.0)
    text = reports.image_report(path)
    assert "| class | pixels | area (mm²) | fraction |" in text
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in text.splitlines()}
    for name, n in (("background", 3072), ("tissue", 1024), ("nucleus", 0)):
        pixels, area, _ = rows[name]
        assert int(pixels) == n
        assert float(area) == pytest.approx(n * 32.0**2 / 1e6, rel=1e-3)


def test_a_report_of_exactly_one_square_millimetre_writes_it_in_mm2(tmp_path):
    """64 x 64 px at 15.625 µm/px is 1,000,000 µm², exactly 1 mm²: the unit with the fewest
    digits is mm² (as for any larger area), not seven-digit µm²."""
    from test_query import make_result

    labels = np.zeros((64, 64), np.uint8)
    labels[:32] = 1  # half of it: 0.5 mm²
    path, _ = make_result(tmp_path / "r.zarr", labels, pixel_size_um=15.625)
    text = reports.image_report(path)
    assert "| class | pixels | area (mm²) | fraction |" in text
    assert "| tissue | 2048 | 0.5 | 50.00% |" in text


def test_a_report_writes_an_area_of_1000_with_a_thousands_separator(tmp_path):
    """Areas from 1000 on are written whole with separators ("1,000"), as larger ones are,
    so that a column of them reads alike: not "1000" beside "3,096"."""
    from test_query import make_result

    labels = np.zeros((64, 64), np.uint8)
    labels.flat[:1000] = 1  # 1000 px at 1 µm/px; 4096 µm² in all
    path, _ = make_result(tmp_path / "r.zarr", labels, pixel_size_um=1.0)
    text = reports.image_report(path)
    assert "| class | pixels | area (µm²) | fraction |" in text
    assert "| tissue | 1000 | 1,000 | 24.41% |" in text
    assert "| background | 3096 | 3,096 | 75.59% |" in text


@pytest.mark.parametrize(
    ("crs", "size", "unit", "per_pixel", "shown"),
    [
        ("EPSG:32633", 5.0, "m²", 25.0, "5 x 5 metre/px (EPSG:32633)"),  # 102,400 m²
        ("EPSG:32633", 500.0, "km²", 0.25, "500 x 500 metre/px (EPSG:32633)"),
        ("EPSG:2263", 10.0, "US survey foot**2", 100.0, "10 x 10 US survey foot/px (EPSG:2263)"),
        # A local CRS in metres (rasterio's linear_units says "unknown" of it): m², not
        # "CRS units" as it was
        (
            'LOCAL_CS["plan",LOCAL_DATUM["d",0],UNIT["metre",1],AXIS["x",EAST],AXIS["y",NORTH]]',
            0.5,
            "m²",
            0.25,
            "0.5 x 0.5 metre/px (a WKT CRS)",
        ),
        # One whose unit PROJ cannot name either: "unknown" is not a unit
        (
            'LOCAL_CS["plan",LOCAL_DATUM["d",0],UNIT["unknown",1],AXIS["x",EAST],AXIS["y",NORTH]]',
            0.5,
            "CRS units**2",
            0.25,
            "0.5 x 0.5 CRS units/px (a WKT CRS)",
        ),
    ],
)
def test_report_gives_a_georeferenced_results_areas_in_its_crs_units(
    tmp_path, crs, size, unit, per_pixel, shown
):
    """It said "pixel size unknown" and "n/a (no pixel size)" for every class, where `info`
    gives the areas in the CRS's units."""
    from test_query import make_result

    labels = np.zeros((64, 64), np.uint8)
    labels[:16] = 1
    transform = (size, 0.0, 500000.0, 0.0, -size, 4000000.0)
    path, _ = make_result(
        tmp_path / "r.zarr", labels, pixel_size_um=None, crs=crs, transform=transform
    )
    text = reports.image_report(path)
    assert f"| size | 64 x 64 px at level 0, {shown} |" in text
    assert f"| class | pixels | area ({unit}) | fraction |" in text
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in text.splitlines()}
    for name, n in (("background", 3072), ("tissue", 1024), ("nucleus", 0)):
        pixels, area, _ = rows[name]
        assert int(pixels) == n
        assert float(area.replace(",", "")) == pytest.approx(n * per_pixel, rel=1e-3)


@pytest.mark.parametrize(
    ("max_side", "expected"), [(2048, 0), (1024, 1), (600, 1), (512, 2), (256, 3), (255, 3)]
)
def test_thumbnail_level_keeps_a_level_of_exactly_max_side(max_side, expected):
    """A level whose larger side is exactly max_side is "at least max_side": it is chosen."""
    shapes = [(2048, 1536, 3), (1024, 768, 3), (512, 384, 3), (256, 192, 3)]
    assert reports.thumbnail_level(shapes, 0, max_side) == expected
