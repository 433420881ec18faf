"""Synthetic H&E slides: determinism, shapes, plausibility, and the ground truth's consistency."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from segpipe.io.readers import open_image
from segpipe.synthetic import (
    AERIAL_CLASS_NAMES,
    CLASS_NAMES,
    SyntheticSlide,
    aerial_scene,
    tissue_slide,
)
from segpipe.synthetic.demo import make_demo_slide

SEEDS = (0, 1, 7)


@pytest.fixture(scope="module", params=SEEDS)
def slide(request: pytest.FixtureRequest) -> SyntheticSlide:
    return tissue_slide(512, seed=request.param)


def test_same_seed_same_slide_other_seed_other_slide() -> None:
    a = tissue_slide((160, 224), seed=3)
    b = tissue_slide((160, 224), seed=3)
    c = tissue_slide((160, 224), seed=4)
    for name in ("image", "labels", "instances"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.labels, c.labels)


@pytest.mark.parametrize("shape", [(512, 512), (200, 333), (64, 48)])
def test_shapes_and_dtypes(shape: tuple[int, int]) -> None:
    s = tissue_slide(shape, seed=2, pixel_size_um=0.25)
    assert s.image.shape == (*shape, 3)
    assert s.image.dtype == np.uint8
    assert s.labels.shape == shape
    assert s.labels.dtype == np.uint8
    assert s.instances.shape == shape
    assert s.instances.dtype == np.int32
    assert s.class_names == CLASS_NAMES == ("background", "tissue", "nucleus")
    assert s.pixel_size_um == 0.25
    assert set(np.unique(s.labels)) <= {0, 1, 2}
    assert s.shape == shape


def test_square_int_shape() -> None:
    assert tissue_slide(96).shape == (96, 96)


def test_class_fractions_plausible(slide: SyntheticSlide) -> None:
    background, tissue, nucleus = np.bincount(slide.labels.ravel(), minlength=3) / slide.labels.size
    np.testing.assert_allclose(slide.class_fractions(), [background, tissue, nucleus])
    assert 0.40 <= tissue + nucleus <= 0.70  # the slide is 40-70 % tissue
    assert 0.02 <= nucleus / (tissue + nucleus) <= 0.35  # nuclei are part of it, not all of it


def test_nucleus_label_exactly_where_instances(slide: SyntheticSlide) -> None:
    np.testing.assert_array_equal(slide.labels == 2, slide.instances > 0)
    ids = np.unique(slide.instances)
    assert ids[0] == 0
    np.testing.assert_array_equal(ids[1:], np.arange(1, len(ids)))  # ids 1..n, none skipped
    assert len(ids) - 1 >= 50


def test_nuclei_lie_inside_tissue(slide: SyntheticSlide) -> None:
    # Nuclei lie wholly inside tissue, so the 1-px ring around each is tissue or other nuclei,
    # but for a few pixels where a nucleus happens to touch the tissue's edge.
    glass_share = []
    for i, box in enumerate(ndimage.find_objects(slide.instances), start=1):
        grown = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        mine = slide.instances[grown] == i
        ring = ndimage.binary_dilation(mine) & ~mine
        glass_share.append(np.mean(slide.labels[grown][ring] == 0))
    assert max(glass_share) < 0.25
    assert np.mean(np.array(glass_share) > 0) < 0.1


def _neighbour_pairs(instances: np.ndarray, gap: int) -> set[tuple[int, int]]:
    """Pairs of nucleus ids ``gap + 1`` pixels apart along a row or column, with only
    background between them (gap 0: 4-adjacent)."""
    pairs = set()
    for axis in (0, 1):
        a = np.moveaxis(instances, axis, 0)
        near, far = a[: a.shape[0] - 1 - gap], a[1 + gap :]
        hit = (near > 0) & (far > 0) & (near != far)
        if gap == 1:
            hit &= a[1:-1] == 0
        pairs.update(
            (min(p), max(p)) for p in zip(near[hit].tolist(), far[hit].tolist(), strict=True)
        )
    return pairs


def test_touching_nuclei_exist(slide: SyntheticSlide) -> None:
    touching = _neighbour_pairs(slide.instances, gap=0)
    one_apart = _neighbour_pairs(slide.instances, gap=1)
    assert len(touching) >= 10, f"only {len(touching)} pairs of 4-adjacent nuclei"
    assert len(touching | one_apart) > len(touching)  # some are separated by one pixel


def test_background_brighter_than_tissue_brighter_than_nuclei(slide: SyntheticSlide) -> None:
    grey = slide.image.astype(np.float64).mean(axis=2)
    background, tissue, nucleus = (grey[slide.labels == c].mean() for c in range(3))
    assert background > 230  # near-white glass
    assert background > tissue + 10 > nucleus + 40
    # Glass is noisy, not flat.
    assert 0.5 < grey[slide.labels == 0].std() < 8
    # Eosin is pink: green absorbed most; hematoxylin is purple: blue brightest in nuclei.
    rgb = slide.image.reshape(-1, 3).astype(np.float64)
    r, g, b = rgb[slide.labels.ravel() == 1].mean(axis=0)
    assert g < r - 40 and g < b - 40
    r, g, b = rgb[slide.labels.ravel() == 2].mean(axis=0)
    assert b > r > g


@pytest.mark.parametrize("pixel_size_um", [0.5, 0.25])
def test_nucleus_size_follows_pixel_size(pixel_size_um: float) -> None:
    s = tissue_slide(512, seed=5, pixel_size_um=pixel_size_um)
    areas = np.bincount(s.instances.ravel())[1:]
    radius_um = np.sqrt(areas / np.pi) * pixel_size_um
    # Radii are drawn in 3-6 um; occlusion by neighbours and the tissue edge shrink some.
    assert 3.0 <= np.median(radius_um) <= 6.0
    assert radius_um.max() <= 6.5


def test_crops_are_views_of_the_slide() -> None:
    s = tissue_slide(128, seed=1)
    c = s.crop(10, 20, (30, 40))
    assert c.shape == (30, 40)
    np.testing.assert_array_equal(c.image, s.image[10:40, 20:60])
    np.testing.assert_array_equal(c.instances, s.instances[10:40, 20:60])
    assert np.shares_memory(c.labels, s.labels)
    rng = np.random.default_rng(0)
    crops = [s.random_crop(32, rng) for _ in range(20)]
    assert all(c.shape == (32, 32) for c in crops)
    assert len({c.image.ctypes.data for c in crops}) > 1  # not always the same place


@pytest.mark.parametrize(("y", "x", "size"), [(-1, 0, 8), (0, 0, 129), (120, 0, 16)])
def test_crop_outside_slide_is_refused(y: int, x: int, size: int) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        tissue_slide(128, seed=1).crop(y, x, size)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape": 8}, "at least 16"),
        ({"shape": (32, 32, 3)}, "int or"),
        ({"shape": 32, "pixel_size_um": 0.0}, "positive"),
        ({"shape": 32, "pixel_size_um": float("nan")}, "positive"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tissue_slide(**kwargs)


# --- the aerial scene -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def scene() -> SyntheticSlide:
    return aerial_scene(384, seed=2)


def test_aerial_same_seed_same_scene() -> None:
    a, b, c = (aerial_scene((96, 128), seed=s) for s in (3, 3, 4))
    for name in ("image", "labels", "instances"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (96, 128, 3) and a.image.dtype == np.uint8


def test_aerial_classes_and_instances_are_consistent(scene: SyntheticSlide) -> None:
    assert scene.class_names == AERIAL_CLASS_NAMES
    assert scene.labels.dtype == np.uint8 and scene.instances.dtype == np.int32
    np.testing.assert_array_equal(scene.labels == 1, scene.instances > 0)
    ids = np.unique(scene.instances)
    np.testing.assert_array_equal(ids, np.arange(len(ids)))  # 0, 1..n, none skipped
    fractions = scene.class_fractions()
    assert np.all(fractions > 0.005), fractions  # every class is there
    assert fractions[0] > 0.3  # mostly open ground


def test_buildings_are_rectangles_and_some_touch(scene: SyntheticSlide) -> None:
    for i, box in enumerate(ndimage.find_objects(scene.instances), start=1):
        assert (scene.instances[box] == i).all()  # fills its bounding box
    touching = _neighbour_pairs(scene.instances, gap=0)
    assert len(touching) >= 3  # rows of houses share walls


def test_aerial_classes_look_different(scene: SyntheticSlide) -> None:
    rgb = scene.image.reshape(-1, 3).astype(np.float64)
    mean = {c: rgb[scene.labels.ravel() == c].mean(axis=0) for c in range(5)}
    r, g, b = mean[3]
    assert g > r and g > b  # vegetation is green
    r, g, b = mean[4]
    assert b > r and sum(mean[4]) < sum(mean[0])  # water is dark and bluish
    assert abs(mean[2][0] - mean[2][2]) < 15  # roads are grey


def test_aerial_building_size_follows_pixel_size() -> None:
    coarse = aerial_scene(256, seed=1, pixel_size_um=1_000_000.0)
    fine = aerial_scene(256, seed=1, pixel_size_um=250_000.0)
    area = [np.bincount(s.instances.ravel())[1:].mean() for s in (coarse, fine)]
    assert area[1] > 8 * area[0]  # 4x finer pixels: 16x the pixels per building


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"shape": 8}, "at least 16"), ({"shape": 32, "pixel_size_um": -1.0}, "positive")],
)
def test_aerial_bad_arguments_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        aerial_scene(**kwargs)


# -- the demo slide's cache --------------------------------------------------------------------


def test_demo_slides_are_cached_under_every_parameter(tmp_path: Path) -> None:
    """The file name is the cache key: another pixel size or tissue fraction is another slide
    (0.5 µm was served 0.25 µm's file; 0.301 and 0.304 of tissue shared one). The defaults
    and whole percents keep the names they had, so existing caches stay valid."""
    fine = make_demo_slide(tmp_path, size=128, pixel_size_um=0.25)
    default = make_demo_slide(tmp_path, size=128)
    assert default.image.name == "synthetic-128px-seed0.ome.tif"
    assert fine.image != default.image
    for slide in (fine, default):
        assert open_image(slide.image).pixel_size_um == pytest.approx(slide.pixel_size_um)
    fractions = [make_demo_slide(tmp_path, size=128, tissue_fraction=f) for f in (0.301, 0.304)]
    assert fractions[0].image != fractions[1].image
    assert make_demo_slide(tmp_path, size=128, tissue_fraction=0.3).image.name == (
        "synthetic-128px-seed0-tissue30.ome.tif"
    )


def test_a_demo_slide_cached_at_another_pixel_size_is_made_again(tmp_path: Path) -> None:
    """A 0.25 µm slide under the default (0.5 µm) name, as the cache made before pixel sizes
    were in names, is not served as a 0.5 µm one."""
    fine = make_demo_slide(tmp_path / "fine", size=128, pixel_size_um=0.25)
    (tmp_path / "cache").mkdir()
    shutil.copy(fine.image, tmp_path / "cache" / "synthetic-128px-seed0.ome.tif")
    shutil.copytree(fine.truth, tmp_path / "cache" / "synthetic-128px-seed0.truth.zarr")
    default = make_demo_slide(tmp_path / "cache", size=128)
    assert open_image(default.image).pixel_size_um == pytest.approx(0.5)


def _make_demo(directory: str, start=None, results=None) -> str:
    if start is not None:
        start.wait()  # both processes ready: they make it at the same instant
    slide = make_demo_slide(directory, size=512)
    made = zarr_digest(slide.truth) + " " + slide.image.name
    if results is not None:
        results.put(made)
    return made


def zarr_digest(path: Path) -> str:
    import hashlib

    import zarr

    return hashlib.sha256(np.asarray(zarr.open_array(path, mode="r")[...]).tobytes()).hexdigest()


def test_two_processes_making_one_demo_slide_both_get_it_whole(tmp_path: Path) -> None:
    """Two at once (two test workers, two demos) deleted each other's truth ("Directory not
    empty", KeyError 'class_names') or met at the image's .partial (StoreBusyError): one
    makes it, the other waits and takes it."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(2), context.Queue()
    runs = [context.Process(target=_make_demo, args=(str(tmp_path), start, results)) for _ in "ab"]
    for run in runs:
        run.start()
    for run in runs:
        run.join(240)
    assert [run.exitcode for run in runs] == [0, 0]
    made = [results.get(timeout=5) for _ in runs]
    assert made[0] == made[1] == _make_demo(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "synthetic-512px-seed0.ome.tif",
        "synthetic-512px-seed0.truth.zarr",
    ]


def test_a_slide_larger_than_memory_is_refused_before_any_array() -> None:
    """`segpipe demo --size 10000000` grew to 21.8 GB before the kernel killed it; a smaller
    machine got numpy's MemoryError traceback after minutes."""
    import psutil

    side = int((psutil.virtual_memory().available / 20) ** 0.5 * 2)  # 4x the memory
    with pytest.raises(ValueError, match=rf"{side} x {side} px .* GiB to make, more than"):
        tissue_slide(side, seed=0)


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_a_seed_that_is_no_integer_from_zero_is_refused_naming_it(seed) -> None:
    with pytest.raises(ValueError, match=rf"seed must be an integer >= 0, got {seed!r}"):
        tissue_slide(64, seed=seed)
