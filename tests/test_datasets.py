"""Folder datasets, pair sampling and augmentation: alignment of image, labels and weights."""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segpipe.geometry.tiling import Geometry
from segpipe.synthetic import SyntheticSlide, tissue_slide
from segpipe.training import Augmentation, elastic_deformation, intensity_jitter, sample_pairs
from segpipe.training.datasets import FolderImage, read_folder

GEOMETRY = Geometry(halo=20, multiple=4, input_offset=0, shrinks=True)  # valid U-Net, depth 2
PALETTE = np.array([[250, 250, 250], [200, 60, 150], [40, 30, 120]], dtype=np.uint8)


def write_folder(
    root: Path, slides: list[SyntheticSlide], *, instances: bool = True, prefix: str = "img"
) -> Path:
    for d in ("images", "labels", "instances"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(slides):
        name = f"{prefix}{i}.png"
        Image.fromarray(s.image).save(root / "images" / name)
        Image.fromarray(s.labels).save(root / "labels" / name)
        if instances:
            Image.fromarray(s.instances.astype(np.uint16)).save(root / "instances" / name)
    (root / "classes.txt").write_text("background\ntissue\nnucleus\n")
    return root


def test_read_folder_round_trips_images_labels_and_instances(tmp_path: Path) -> None:
    slides = [tissue_slide(64, seed=s) for s in (1, 2)]
    items = read_folder(write_folder(tmp_path, slides))
    assert [i.name for i in items] == ["img0", "img1"]
    for item, s in zip(items, slides, strict=True):
        np.testing.assert_array_equal(item.image, s.image)
        np.testing.assert_array_equal(item.labels, s.labels)
        np.testing.assert_array_equal(item.instances, s.instances)
        assert item.class_names == ("background", "tissue", "nucleus")
        assert item.shape == (64, 64)


def test_read_folder_without_instances_or_class_names(tmp_path: Path) -> None:
    slide = tissue_slide(64, seed=0)
    assert slide.labels.max() == 2
    write_folder(tmp_path, [slide], instances=False)
    (tmp_path / "classes.txt").unlink()
    (item,) = read_folder(tmp_path)
    assert item.instances is None
    assert item.class_names == ("class_0", "class_1", "class_2")  # up to the largest id


@pytest.mark.parametrize("form", ["rgba-tiff", "rgb-nir-tiff", "rgba16-png"])
def test_read_folder_leaves_out_an_alpha_channel_only(tmp_path: Path, form: str) -> None:
    """An alpha marks pixels, it is no image content (what segment feeds a model, too); a
    fourth band that is not alpha (near infrared) is kept."""
    import tifffile

    slide = tissue_slide(64, seed=1)
    write_folder(tmp_path, [slide])
    four = np.concatenate([slide.image, np.full((64, 64, 1), 255, np.uint8)], axis=2)
    (tmp_path / "images" / "img0.png").unlink()
    image = tmp_path / "images" / ("img0.png" if form.endswith("png") else "img0.tif")
    if form == "rgba-tiff":
        tifffile.imwrite(image, four, photometric="rgb", extrasamples=["unassalpha"])
    elif form == "rgb-nir-tiff":
        tifffile.imwrite(image, four, photometric="rgb", extrasamples=["unspecified"])
    else:
        import imagecodecs

        image.write_bytes(imagecodecs.png_encode(four.astype(np.uint16) * 257))
    (item,) = read_folder(tmp_path)
    expected = four if form == "rgb-nir-tiff" else four[..., :3]
    factor = 257 if form == "rgba16-png" else 1
    np.testing.assert_array_equal(item.image, expected.astype(item.image.dtype) * factor)


def test_read_folder_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="images"):
        read_folder(tmp_path)
    write_folder(tmp_path, [tissue_slide(64, seed=0)])  # has nuclei: ids 0, 1, 2
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "images" / "extra.png")
    with pytest.raises(FileNotFoundError, match="extra"):
        read_folder(tmp_path)
    (tmp_path / "images" / "extra.png").unlink()
    with pytest.raises(ValueError, match="class names"):
        read_folder(tmp_path, class_names=["a", "b"])


@pytest.mark.parametrize("what", ["labels", "instances"])
def test_read_folder_refuses_labels_without_their_image(tmp_path: Path, what: str) -> None:
    """An image renamed or never copied left its annotated example out without a word."""
    write_folder(tmp_path, [tissue_slide(64, seed=s) for s in (0, 1)])
    (tmp_path / "images" / "img1.png").unlink()
    (tmp_path / {"labels": "instances", "instances": "labels"}[what] / "img1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"images lacks .* \['img1'\]"):
        read_folder(tmp_path)


def test_read_folder_without_class_names_refuses_ids_that_skip_classes(tmp_path: Path) -> None:
    """A 0/255 mask trained a model of 256 classes, 254 of them never seen."""
    slide = tissue_slide(64, seed=0)
    write_folder(tmp_path, [slide], instances=False)
    (tmp_path / "classes.txt").unlink()
    Image.fromarray(np.where(slide.labels > 0, 255, 0).astype(np.uint8)).save(
        tmp_path / "labels" / "img0.png"
    )
    with pytest.raises(ValueError, match=r"labels: its labels hold the ids \[0, 255\].*255 to 1"):
        read_folder(tmp_path)
    (tmp_path / "classes.txt").write_text("\n".join(f"c{i}" for i in range(256)) + "\n")
    (item,) = read_folder(tmp_path)  # named: a class may go unlabelled
    assert len(item.class_names) == 256


@pytest.mark.parametrize("what", ["images", "labels", "instances"])
@pytest.mark.parametrize("other", ["img0.tif", "img0.PNG"])
def test_read_folder_refuses_two_files_of_one_name(tmp_path: Path, what: str, other: str) -> None:
    """img0.png beside img0.tif (or img0.PNG): one was dropped, or the image trained with
    the other file's labels, without a word."""
    write_folder(tmp_path, [tissue_slide(64, seed=0)])
    Image.fromarray(np.ones((64, 64), np.uint8)).save(tmp_path / what / other)
    if not (tmp_path / what / "img0.png").exists():  # a case-insensitive file system
        pytest.skip("img0.PNG is img0.png here")
    with pytest.raises(ValueError, match=rf"{what}/\w+\.\w+ and \w+\.\w+ share the name"):
        read_folder(tmp_path)


@pytest.mark.parametrize("what", ["labels", "instances"])
@pytest.mark.parametrize("value", [-1, -300])
def test_read_folder_refuses_negative_ids(tmp_path: Path, what: str, value: int) -> None:
    """A signed mask's -1 would become class 255 (or a huge object id) far from the file."""
    import tifffile

    slide = tissue_slide(64, seed=0)
    write_folder(tmp_path, [slide])
    signed = (slide.labels if what == "labels" else slide.instances).astype(np.int16)
    signed[3, 5] = value
    (tmp_path / what / "img0.png").unlink()
    tifffile.imwrite(tmp_path / what / "img0.tif", signed)
    with pytest.raises(ValueError, match=rf"{what}.img0\.tif.*{value}"):
        read_folder(tmp_path)


def test_read_folder_refuses_ids_its_arrays_cannot_hold(tmp_path: Path) -> None:
    """Labels are kept as uint8 and instances as int32: class 300 read as 44 and object
    2**31 as a negative id, silently."""
    import tifffile

    slide = tissue_slide(64, seed=0)
    write_folder(tmp_path, [slide])
    labels = slide.labels.astype(np.uint16)
    labels[3, 5] = 300
    (tmp_path / "labels" / "img0.png").unlink()
    tifffile.imwrite(tmp_path / "labels" / "img0.tif", labels)
    names = [f"c{i}" for i in range(301)]
    with pytest.raises(ValueError, match=r"301 classes.*at most 256"):
        read_folder(tmp_path, class_names=names)
    labels[3, 5] = 255
    tifffile.imwrite(tmp_path / "labels" / "img0.tif", labels)
    (item,) = read_folder(tmp_path, class_names=names[:256])
    assert item.labels[3, 5] == 255

    instances = slide.instances.astype(np.uint32)
    instances[3, 5] = 2**31
    (tmp_path / "instances" / "img0.png").unlink()
    tifffile.imwrite(tmp_path / "instances" / "img0.tif", instances)
    with pytest.raises(ValueError, match=r"img0\.tif: object id 2147483648"):
        read_folder(tmp_path, class_names=names[:256])


def test_read_folder_refuses_labels_that_are_not_integers(tmp_path: Path) -> None:
    import tifffile

    slide = tissue_slide(64, seed=0)
    write_folder(tmp_path, [slide])
    (tmp_path / "labels" / "img0.png").unlink()
    tifffile.imwrite(tmp_path / "labels" / "img0.tif", slide.labels.astype(np.float32))
    with pytest.raises(ValueError, match=r"img0\.tif: labels must .* class ids, got float32"):
        read_folder(tmp_path)


def test_validation_folder_must_be_held_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation on training images would report what the model memorised: the same folder,
    or a training image's pixels under another name, are refused, naming both files; another
    image named like a training one (folders numbered alike) is held out."""
    import shutil

    from segpipe.training import TrainConfig, make_slides

    train = write_folder(tmp_path / "train", [tissue_slide(48, seed=s) for s in (1, 2)])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="val_folder 'train/' is the training folder"):
        TrainConfig(dataset="folder", train_folder=str(train), val_folder="train/")

    val = write_folder(tmp_path / "val", [tissue_slide(48, seed=9)], prefix="val")
    config = TrainConfig(dataset="folder", train_folder=str(train), val_folder=str(val))
    assert len(make_slides(config)[1]) == 1  # held out: accepted
    for sub in ("images", "labels", "instances"):
        shutil.copy(train / sub / "img1.png", val / sub / "copy.png")
    with pytest.raises(
        ValueError, match=r"val.images.copy\.png .*same pixels.*train.images.img1\.png"
    ):
        make_slides(config)
    for sub in ("images", "labels", "instances"):
        (val / sub / "copy.png").unlink()
    write_folder(val, [tissue_slide(48, seed=5)])  # another image, named like a training one
    assert len(make_slides(config)[1]) == 2


def test_train_from_folders(tmp_path: Path) -> None:
    import torch

    from segpipe import models
    from segpipe.training import TrainConfig, class_names_for, train

    torch.set_num_threads(1)
    train_dir = write_folder(tmp_path / "train", [tissue_slide(64, seed=s) for s in (1, 2)])
    val_dir = write_folder(tmp_path / "val", [tissue_slide(48, seed=9)], prefix="val")
    config = TrainConfig(
        steps=2,
        batch_size=2,
        patch=16,
        val_tile=16,
        num_threads=1,
        progress=False,
        dataset="folder",
        train_folder=str(train_dir),
        val_folder=str(val_dir),
        loss_weights="unet",
    )
    names = class_names_for(config)
    torch.manual_seed(0)
    model = models.build("unet", class_names=names, width=4, depth=2)
    result = train(model, config)
    assert sum(map(sum, result["confusion"])) == 48 * 48


def _painted(labels: np.ndarray) -> SyntheticSlide:
    """A slide whose image is a flat colour per class: any misalignment shows."""
    return SyntheticSlide(PALETTE[labels], labels, np.zeros(labels.shape, np.int32))


def test_elastic_deformation_moves_image_and_labels_together() -> None:
    slide = _painted(tissue_slide(96, seed=3).labels)
    image = slide.image.transpose(2, 0, 1).astype(np.float32) / 255
    labels = slide.labels.astype(np.int64)
    weights = labels.astype(np.float32) * 2
    rng = np.random.default_rng(0)
    out_image, out_labels, out_weights = elastic_deformation(
        image, labels, rng, std_px=4.0, weights=weights
    )
    assert out_image.shape == image.shape
    assert out_labels.dtype == labels.dtype
    assert not np.array_equal(out_labels, labels)  # it did deform
    # Away from class edges, the (bilinear) image has its label's colour, and the weights too.
    colour_class = np.argmin(
        np.abs(out_image.transpose(1, 2, 0)[..., None, :] * 255 - PALETTE).sum(-1), axis=-1
    )
    assert np.mean(colour_class == out_labels) > 0.97
    assert np.mean(np.rint(out_weights / 2) == out_labels) > 0.97
    same = elastic_deformation(image, labels, rng, std_px=0.0)
    np.testing.assert_allclose(same[0], image, atol=1e-6)
    np.testing.assert_array_equal(same[1], labels)


def test_sample_pairs_keeps_weights_with_labels_under_every_augmentation() -> None:
    slide = _painted(tissue_slide(96, seed=4).labels)
    weight_map = slide.labels.astype(np.float32) + 1  # 1, 2, 3 per class
    batch = sample_pairs(
        [slide],
        GEOMETRY,
        16,
        16,
        np.random.default_rng(1),
        augmentation=Augmentation(elastic_std_px=3.0),
        weight_maps=[weight_map],
    )
    n = GEOMETRY.input_size(16)
    assert batch.images.shape == (16, 3, n, n)
    assert batch.labels.shape == batch.weights.shape == (16, n - 40, n - 40)
    assert np.mean(np.rint(batch.weights) == batch.labels + 1) > 0.97
    margin = 20
    centre = batch.images[:, :, margin:-margin, margin:-margin].transpose(0, 2, 3, 1) * 255
    colour_class = np.argmin(np.abs(centre[..., None, :] - PALETTE).sum(-1), axis=-1)
    assert np.mean(colour_class == batch.labels) > 0.97


def test_intensity_jitter_changes_grey_values_within_range() -> None:
    image = np.random.default_rng(0).uniform(0.2, 0.8, size=(3, 8, 8)).astype(np.float32)
    out = intensity_jitter(image, np.random.default_rng(1), 0.3)
    assert out.dtype == np.float32 and out.shape == image.shape
    assert out.min() >= 0 and out.max() <= 1
    assert not np.allclose(out, image)
    # An affine change per channel: the order of the pixels' values is kept.
    for a, b in zip(image, out, strict=True):
        inside = (b > 0) & (b < 1)
        assert np.array_equal(np.argsort(a[inside]), np.argsort(b[inside]))


def test_separate_touching_draws_a_gap_between_touching_objects_only() -> None:
    from segpipe.training.datasets import separate_touching, touching_borders

    inst = np.zeros((10, 16), dtype=np.int32)
    inst[2:8, 1:5], inst[2:8, 5:9] = 1, 2  # touching along x = 4 | 5
    inst[2:8, 11:14] = 3  # alone
    labels = np.where(inst > 0, 2, 1).astype(np.uint8)
    border = touching_borders(inst)
    expected = np.zeros_like(border)
    expected[2:8, 4:6] = True
    np.testing.assert_array_equal(border, expected)
    # Copies: the input's own arrays would compare equal to themselves even written over.
    item = SyntheticSlide(np.zeros((10, 16, 3), np.uint8), labels.copy(), inst.copy())
    out = separate_touching(item)
    np.testing.assert_array_equal(out.labels, np.where(expected, 1, labels))  # the surround
    assert (out.instances[expected] == 0).all()
    np.testing.assert_array_equal(out.instances[~expected], inst[~expected])
    np.testing.assert_array_equal(item.labels, labels)  # the input is left alone
    np.testing.assert_array_equal(item.instances, inst)


@pytest.mark.parametrize(
    "geometry",
    [GEOMETRY, Geometry(halo=12, multiple=4, shrinks=False)],
    ids=["valid", "same"],
)
def test_patch_pair_labels_are_what_the_model_predicts(geometry: Geometry) -> None:
    """As segpipe.training.sampling says: a valid model's labels are the crop inside the
    halo; a same-padding model's are its whole input window, halo included."""
    from segpipe.training import patch_pair

    slide = tissue_slide(96, seed=2)
    y, x = 30, 25
    image, labels = patch_pair(slide, y, x, geometry, 16)
    n = geometry.input_size(16)
    margin = geometry.halo if geometry.shrinks else 0
    o = n - 2 * margin
    assert image.shape == (3, n, n)
    np.testing.assert_array_equal(labels, slide.labels[y : y + o, x : x + o])
    window = slide.image[y - margin : y - margin + n, x - margin : x - margin + n]
    np.testing.assert_allclose(image, window.transpose(2, 0, 1) / 255, atol=1e-6)


def _plain_folder(root: Path, stems: tuple[str, ...] = ("a", "b", "c")) -> Path:
    """8x8 black images with all-background labels, ``classes.txt`` naming two classes."""
    for d in ("images", "labels"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for stem in stems:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / f"{stem}.png")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "labels" / f"{stem}.png")
    (root / "classes.txt").write_text("bg\nfg\n")
    return root


def test_read_folder_names_the_label_file_with_an_unnamed_class(tmp_path: Path) -> None:
    """Among many label files, the one to fix, not the folder."""
    root = _plain_folder(tmp_path)
    Image.fromarray(np.full((8, 8), 2, np.uint8)).save(root / "labels" / "b.png")
    with pytest.raises(ValueError, match="label id 2") as err:
        read_folder(root)
    assert str(root / "labels" / "b.png") in str(err.value)


@pytest.mark.parametrize("what", ["labels", "instances"])
def test_read_folder_names_both_files_whose_shapes_differ(tmp_path: Path, what: str) -> None:
    root = _plain_folder(tmp_path)
    (root / "instances").mkdir()
    for stem in ("a", "b", "c"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "instances" / f"{stem}.png")
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(root / what / "b.png")
    with pytest.raises(ValueError, match="8x9") as err:
        read_folder(root)
    assert str(root / what / "b.png") in str(err.value)
    assert str(root / "images" / "b.png") in str(err.value)


def test_instance_needs_name_the_image_without_them(tmp_path: Path) -> None:
    """separate_touching and the U-Net weights need instances: the message names the file
    that has none, not its place in a list."""
    from segpipe.training import TrainConfig, loss_weight_maps
    from segpipe.training.datasets import separate_touching

    items = read_folder(_plain_folder(tmp_path))
    with pytest.raises(ValueError, match="separate_touching") as err:
        separate_touching(items[1])
    assert str(tmp_path / "images" / "b.png") in str(err.value)
    config = TrainConfig(steps=4, loss_weights="unet")
    with pytest.raises(ValueError, match="loss_weights='unet'") as err:
        loss_weight_maps(items, config)
    assert str(tmp_path / "images" / "a.png") in str(err.value)


@pytest.mark.parametrize("form", ["bool tiff", "palette png"])
def test_read_folder_reads_label_ids_as_stored_as_evaluate_does(tmp_path: Path, form: str) -> None:
    """A bool mask tifffile wrote (1-bit min-is-white) trained as its inverse, and a palette
    PNG of class ids (PASCAL VOC's format) was refused, while evaluate read both as stored."""
    import tifffile

    slide = tissue_slide(64, seed=0)
    write_folder(tmp_path, [slide], instances=False)
    ids = (slide.labels > 0).astype(np.uint8)
    (tmp_path / "labels" / "img0.png").unlink()
    if form == "bool tiff":
        tifffile.imwrite(tmp_path / "labels" / "img0.tif", ids.astype(bool))
    else:
        palette = Image.fromarray(ids, mode="P")
        palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        palette.save(tmp_path / "labels" / "img0.png")
    (tmp_path / "classes.txt").write_text("background\nforeground\n")
    (item,) = read_folder(tmp_path)
    np.testing.assert_array_equal(item.labels, ids)


def test_read_folder_leaves_no_file_open(tmp_path: Path) -> None:
    """Each image was opened twice and never closed: 200 TIFFs held 23 more descriptors until
    garbage collection, a folder of thousands running into the process's limit."""
    import gc
    import os

    import tifffile

    write_folder(tmp_path, [tissue_slide(32, seed=s) for s in range(6)])
    for png in (tmp_path / "images").glob("*.png"):  # TIFF readers keep a handle open
        tifffile.imwrite(png.with_suffix(".tif"), np.asarray(Image.open(png)), photometric="rgb")
        png.unlink()
    read_folder(tmp_path)  # the first starts zarr's event loop (an epoll and two sockets)
    gc.collect()
    gc.disable()
    try:
        before = len(os.listdir("/proc/self/fd"))
        items = read_folder(tmp_path)
        assert len(items) == 6
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        gc.enable()


def test_given_class_names_override_a_damaged_classes_file(tmp_path: Path) -> None:
    """Given names override the folder's classes.txt, which was then read all the same: a
    damaged one (a name twice) failed a read that does not use it."""
    write_folder(tmp_path, [tissue_slide(32, seed=0)])
    (tmp_path / "classes.txt").write_text("x\nx\n")
    with pytest.raises(ValueError, match="distinct"):
        read_folder(tmp_path)
    (item,) = read_folder(tmp_path, class_names=["background", "tissue", "nucleus"])
    assert item.class_names == ("background", "tissue", "nucleus")


def test_training_images_of_two_pixel_sizes_record_none_with_one_warning(tmp_path: Path) -> None:
    """A folder of 0.25 and 0.5 µm images recorded no pixel size, silently: segment then ran
    the model on level 0 of every slide. The warning then came twice from ``segpipe train``
    (the data's contract for the model, then training's): training alone gives it."""
    from segpipe.training import TrainConfig, initial_model, pixel_contract_for
    from segpipe.training.config import training_contract
    from segpipe.training.datasets import FolderImage

    def item(name: str, size: float | None) -> FolderImage:
        image = np.full((8, 8, 3), 7, np.uint8)
        return FolderImage(image, np.zeros((8, 8), np.uint8), None, ("bg", "fg"), name, size)

    def trained_contract(config: TrainConfig, images: list[FolderImage]) -> float | None:
        # As segpipe train does: a model of the data's contract, then training's.
        contract = pixel_contract_for(config, images)
        net = initial_model("unet", class_names=("bg", "fg"), contract=contract, width=2, depth=1)
        return training_contract(net, config, images).pixel_size_um

    train, val = tmp_path / "train", tmp_path / "val"
    config = TrainConfig(dataset="folder", train_folder=str(train), val_folder=str(val))
    alike = [item("a", 0.5), item("b", 0.5)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trained_contract(config, alike) == 0.5
    for other in (0.25, None):
        mixed = [*alike, item("c", other)]
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            assert trained_contract(config, mixed) is None
        (warned,) = shown
        assert re.search(r"pixel sizes differ \((0.25 µm, )?0.5 µm", str(warned.message))
        given = dataclasses.replace(config, pixel_size_um=0.4)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the size given is recorded: nothing to say
            assert trained_contract(given, mixed) == 0.4


def _unnamed_folder(root: Path, labels: np.ndarray) -> Path:
    """One 8x8 image with ``labels``, no ``classes.txt``: class names from the ids."""
    _plain_folder(root, stems=("a",))
    (root / "classes.txt").unlink()
    Image.fromarray(labels.astype(np.uint8)).save(root / "labels" / "a.png")
    return root


@pytest.mark.parametrize(("ids", "unseen"), [((0, 2), [1]), ((0, 1, 3), [2]), ((1, 2), [0])])
def test_read_folder_without_class_names_refuses_one_skipped_id(
    tmp_path: Path, ids: tuple[int, ...], unseen: list[int]
) -> None:
    """A single id missing from 0..max is as unnamed a class as 254 of them."""
    labels = np.resize(np.array(ids), (8, 8))
    with pytest.raises(ValueError, match=re.escape(f"hold the ids {list(ids)}, none of {unseen}")):
        read_folder(_unnamed_folder(tmp_path, labels))


@pytest.mark.parametrize(("ids", "names"), [((0,), 2), ((0, 1), 2), ((0, 1, 2), 3)])
def test_read_folder_without_class_names_numbers_at_least_two_classes(
    tmp_path: Path, ids: tuple[int, ...], names: int
) -> None:
    """Labels all background still make a two-class model (background and one class): a
    one-class model has nothing to tell apart."""
    labels = np.resize(np.array(ids), (8, 8))
    (item,) = read_folder(_unnamed_folder(tmp_path, labels))
    assert item.class_names == tuple(f"class_{k}" for k in range(names))


@pytest.mark.parametrize(("count", "is_refused"), [(256, False), (257, True)])
def test_read_folder_holds_at_most_256_class_names(
    tmp_path: Path, count: int, is_refused: bool
) -> None:
    """uint8 labels hold ids 0..255: a 257th class could never be labelled."""
    root = _plain_folder(tmp_path, stems=("a",))
    names = [f"c{i}" for i in range(count)]
    if is_refused:
        with pytest.raises(ValueError, match=r"257 classes.*at most 256"):
            read_folder(root, class_names=names)
    else:
        (item,) = read_folder(root, class_names=names)
        assert len(item.class_names) == 256


@pytest.mark.parametrize(
    ("image_name", "label_name"),
    [("a.ome.tif", "a.png"), ("a.ome.tiff", "a.tif"), ("a.png", "a.ome.tif")],
)
def test_read_folder_pairs_ome_tiff_files_by_their_stem(
    tmp_path: Path, image_name: str, label_name: str
) -> None:
    """``a.ome.tif`` is named ``a`` (the longest suffix), so its labels are ``a.png`` or
    ``a.tif``, as with any other format."""
    import tifffile

    for d in ("images", "labels"):
        (tmp_path / d).mkdir()
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    labels = np.eye(8, dtype=np.uint8)
    for path, pixels in (
        (tmp_path / "images" / image_name, image),
        (tmp_path / "labels" / label_name, labels),
    ):
        if path.suffix == ".png":
            Image.fromarray(pixels).save(path)
        else:
            tifffile.imwrite(path, pixels, photometric="rgb" if pixels.ndim == 3 else None)
    (item,) = read_folder(tmp_path)
    assert item.name == "a"
    np.testing.assert_array_equal(item.image, image)
    np.testing.assert_array_equal(item.labels, labels)


def test_read_folder_skips_hidden_files(tmp_path: Path) -> None:
    """macOS leaves ``._img0.png`` (AppleDouble) beside every file copied from its disks, and
    editors their ``.img0.png`` swap files: not images of the data set, whatever they end in."""
    write_folder(tmp_path, [tissue_slide(64, seed=0)])
    for what in ("images", "labels", "instances"):
        (tmp_path / what / "._img0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
    (item,) = read_folder(tmp_path)
    assert item.name == "img0"


def test_read_folder_keeps_the_largest_object_id_int32_holds(tmp_path: Path) -> None:
    """Instances are kept as int32: 2**31 - 1 fits (and is kept as it is), 2**31 does not."""
    import tifffile

    slide = tissue_slide(64, seed=0)
    write_folder(tmp_path, [slide])
    instances = slide.instances.astype(np.uint32)
    instances[3, 5] = 2**31 - 1
    (tmp_path / "instances" / "img0.png").unlink()
    tifffile.imwrite(tmp_path / "instances" / "img0.tif", instances)
    (item,) = read_folder(tmp_path)
    assert item.instances is not None and item.instances[3, 5] == 2**31 - 1


def test_a_folder_image_refuses_instances_of_another_shape() -> None:
    """Instances that do not match the labels pixel for pixel would give another pixel's
    object to each label (border weights and separate_touching on the wrong pixels)."""
    image = np.zeros((8, 10, 3), np.uint8)
    labels = np.zeros((8, 10), np.uint8)
    FolderImage(image, labels, np.zeros((8, 10), np.int32), ("a", "b"), "ok")
    with pytest.raises(ValueError, match=r"bad: .* differ in shape"):
        FolderImage(image, labels, np.zeros((10, 8), np.int32), ("a", "b"), "bad")
