"""One palette everywhere: the thumbnail, the OME label image (napari) and the GeoJSON
(QuPath) colour class ``i`` as ``segpipe.palette.class_color(i)``; class 0 stays clear."""

import json

import numpy as np
import pytest
import zarr
from PIL import Image
from test_query import make_result

import segpipe
from segpipe.archive.reports import write_thumbnail
from segpipe.palette import class_color
from segpipe.results import LABEL_NAME, read_meta
from segpipe.vectors import export_geojson

# Twelve classes: past the ten colours of the palette, so its repetition is seen too.
MANY = ("background", *(f"class-{i}" for i in range(1, 12)))


def squares_of_every_class(shape=(48, 64)):
    """(y, x) labels: class 0 around an 8 x 8 square of each class 1..11."""
    labels = np.zeros(shape, np.uint8)
    for k in range(1, len(MANY)):
        r, c = divmod(k - 1, 4)
        labels[4 + 12 * r : 12 + 12 * r, 4 + 16 * c : 12 + 16 * c] = k
    return labels


@pytest.fixture(scope="module", params=["written", "segmented"])
def result(request, tmp_path_factory, random_checkpoint):
    """(image, result): a result written from known labels (every class present), and one
    segmented by a random-weight U-Net from a synthetic slide (the classes it finds)."""
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "written":
        labels = squares_of_every_class()
        path, _ = make_result(folder / "r.zarr", labels, classes=MANY)
        image = zarr.create_array(
            folder / "image.zarr",
            shape=(*labels.shape, 3),
            chunks=(32, 32, 3),
            dtype="uint8",
            dimension_names=("y", "x", "c"),
        )
        image[...] = np.random.default_rng(0).integers(0, 256, (*labels.shape, 3))
        return folder / "image.zarr", path
    from segpipe.synthetic.demo import make_demo_slide

    slide = make_demo_slide(folder, size=128, seed=2)
    path = segpipe.segment(
        slide.image, folder / "s.seg.zarr", random_checkpoint, tile=64, scheduler="sync"
    )
    return slide.image, path


def present(path):
    """Class indices found in the result's mask, background included."""
    return np.flatnonzero(np.bincount(segpipe.open_result(path)["mask"].values.ravel()))


def test_label_image_colours_are_the_palette_with_class_0_transparent(result):
    _, path = result
    attrs = zarr.open_group(path / "labels" / LABEL_NAME, mode="r").attrs.asdict()
    colors = attrs["ome"]["image-label"]["colors"]
    n = len(read_meta(path).class_names)
    assert [c["label-value"] for c in colors] == list(range(n))
    assert colors[0]["rgba"][3] == 0, "background must be transparent in napari"
    for i, c in enumerate(colors[1:], start=1):
        assert tuple(c["rgba"]) == (*class_color(i), 255)


def test_thumbnail_colours_are_the_palette(result, tmp_path):
    image, path = result
    # alpha 1: class pixels show their colour alone; max_side large: one pixel per pixel.
    out = write_thumbnail(image, path, tmp_path / "t.png", max_side=4096, alpha=1.0)
    thumb = np.asarray(Image.open(out).convert("RGB"))
    mask = segpipe.open_result(path)["mask"].values
    assert thumb.shape == (*mask.shape, 3)
    classes = present(path)
    assert (classes > 0).any(), "no class but background to see a colour of"
    for i in classes[classes > 0]:
        np.testing.assert_array_equal(
            np.unique(thumb[mask == i], axis=0), [class_color(int(i))], err_msg=f"class {i}"
        )
    # Class 0 is left clear: the image shows through, not black.
    pixels = np.asarray(segpipe.open_image(image).read(0, mask.shape[0], 0, mask.shape[1]))
    np.testing.assert_allclose(thumb[mask == 0], pixels[..., :3][mask == 0], atol=1)


def test_geojson_colours_are_the_palette(result, tmp_path):
    _, path = result
    out = export_geojson(path, tmp_path / "o.geojson")
    names = list(read_meta(path).class_names)
    features = json.loads(out.read_text())["features"]
    seen = set()
    for f in features:
        classification = f["properties"]["classification"]
        i = names.index(classification["name"])
        assert classification["color"] == list(class_color(i))
        seen.add(i)
    assert seen == set(present(path).tolist()) - {0}, "every class but background exported"
