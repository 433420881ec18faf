"""Images made of several files in an archive: one image per OME-TIFF set, every part in the
fingerprint (segpipe/archive/parts.py, through discover_images and fingerprint_image)."""

import os
import shutil

import numpy as np
import pytest
from test_vendor_formats import (
    KW,
    SHAPE,
    in_file,
    ome_image,
    ome_xml,
    write_channel_set,
    write_two_file_set,
)

from segpipe.archive import discover_images, fingerprint_image, image_paths, process_image
from segpipe.config import SegmentConfig
from segpipe.io.readers import open_image

CONFIG = SegmentConfig(tile=64, scheduler="sync")


def _keys(images):
    return [image.key for image in images]


def test_a_multi_file_ome_set_is_one_image_made_of_all_its_files(tmp_path):
    import tifffile

    opened, other = write_two_file_set(tmp_path, pyramid=False)
    tifffile.imwrite(tmp_path / "alone.ome.tif", np.zeros((8, 8, 3), np.uint8), **KW)
    alone, image = discover_images(tmp_path)
    assert (alone.key, alone.parts) == ("alone.ome.tif", ())
    assert (image.key, image.parts) == ("set.ome.tif", (str(other),))
    assert image.size == opened.stat().st_size + other.stat().st_size
    assert image.mtime == max(opened.stat().st_mtime, other.stat().st_mtime)
    # the image found reads the set's slide, which lies in the other file
    assert open_image(image.url).shape[:2] == (256, 384)


def test_the_file_naming_the_set_stands_for_it_whatever_its_name(tmp_path):
    """c1.ome.tif has an OME-XML of its own plane only and reads as that one channel: the
    image is the file that names both, though c1 sorts first once that is renamed."""
    c0, c1, planes = write_channel_set(tmp_path)
    c0.rename(tmp_path / "z.ome.tif")  # its OME-XML names it by its UUID too: it still reads
    (image,) = discover_images(tmp_path)
    assert (image.key, image.parts) == ("z.ome.tif", (str(c1),))
    np.testing.assert_array_equal(open_image(image.url).read(0, 256, 0, 384), planes)


@pytest.mark.parametrize("own", ["urn:uuid:1", None], ids=["own-uuid", "no-own-uuid"])
def test_single_file_ome_tiffs_renamed_or_copied_are_each_an_image(tmp_path, own):
    """Bio-Formats names a single file in its OME-XML (FileName and UUID): copies of one
    export, renamed since, each named "image.ome.tif" and were taken for one set, all but
    one slide never segmented."""
    import tifffile

    xml = ome_xml(ome_image(0, "s", SHAPE, 0.5, in_file("image.ome.tif", "urn:uuid:1")), uuid=own)
    for k, name in enumerate(("image.ome.tif", "patient1.ome.tif", "patient2.ome.tif")):
        pixels = np.full((*SHAPE, 3), 50 * k, np.uint8)
        tifffile.imwrite(tmp_path / name, pixels, description=xml, **KW)
    images = discover_images(tmp_path)
    assert [(i.key, i.parts) for i in images] == [
        ("image.ome.tif", ()),
        ("patient1.ome.tif", ()),
        ("patient2.ome.tif", ()),
    ]


def test_a_copy_of_a_sets_file_is_an_image_of_its_own(tmp_path):
    """Every file of a Bio-Formats set names the others; a copy of the first, under another
    name, names them too and opens the whole set: no other file names it, so it stays."""
    opened, other = write_two_file_set(tmp_path, pyramid=False)
    shutil.copy(opened, tmp_path / "copy.ome.tif")
    images = discover_images(tmp_path)
    assert [(i.key, i.parts) for i in images] == [
        ("copy.ome.tif", (str(other),)),
        ("set.ome.tif", (str(other),)),
    ]


def test_a_sets_image_named_by_a_later_files_set_too_stays_an_image(tmp_path):
    """a.ome.tif stands for its own set (it names c.ome.tif); z.ome.tif, sorting after it,
    names a.ome.tif as a file of its set too: a stays the image of its set, not swallowed as
    z's part (with it, its set's slide never segmented)."""
    import tifffile

    a = ome_image(0, "a", (8, 8), 0.5, in_file("a.ome.tif", "urn:uuid:1"))
    c = ome_image(1, "c", (8, 8), 0.5, in_file("c.ome.tif", "urn:uuid:3"))
    z = ome_image(0, "z", (8, 8), 0.5, in_file("z.ome.tif", "urn:uuid:9"))
    pixels = np.zeros((8, 8, 3), np.uint8)
    tifffile.imwrite(
        tmp_path / "a.ome.tif", pixels, description=ome_xml(a, c, uuid="urn:uuid:1"), **KW
    )
    tifffile.imwrite(tmp_path / "c.ome.tif", pixels, **KW)  # no OME-XML: no set's head
    tifffile.imwrite(
        tmp_path / "z.ome.tif", pixels, description=ome_xml(z, a, uuid="urn:uuid:9"), **KW
    )
    images = discover_images(tmp_path)
    assert [(i.key, i.parts) for i in images] == [
        ("a.ome.tif", (str(tmp_path / "c.ome.tif"),)),
        ("z.ome.tif", (str(tmp_path / "a.ome.tif"),)),
    ]


@pytest.mark.parametrize("pattern", ["set_1*", "set.ome.tif", "*.ome.tif"])
def test_a_pattern_matching_any_file_of_a_set_finds_the_set(tmp_path, pattern):
    write_two_file_set(tmp_path, pyramid=False)
    assert _keys(discover_images(tmp_path, pattern=pattern)) == ["set.ome.tif"]


def test_a_set_waits_while_any_of_its_files_is_young(tmp_path):
    opened, other = write_two_file_set(tmp_path, pyramid=False)
    os.utime(opened, (1e9, 1e9))
    assert discover_images(tmp_path, min_age_s=3600) == []
    os.utime(other, (1e9, 1e9))
    assert _keys(discover_images(tmp_path, min_age_s=3600)) == ["set.ome.tif"]


def test_the_fingerprint_of_a_set_sees_a_change_to_any_file_and_survives_a_move(tmp_path):
    (tmp_path / "a").mkdir()
    write_two_file_set(tmp_path / "a", pyramid=False)
    (image,) = discover_images(tmp_path / "a")
    before = fingerprint_image(image)
    assert before == fingerprint_image(image)

    shutil.copytree(tmp_path / "a", tmp_path / "b")  # same bytes, same mtimes (copy2)
    (moved,) = discover_images(tmp_path / "b")
    assert fingerprint_image(moved) == before

    other = tmp_path / "a" / "set_1.ome.tif"
    data = bytearray(other.read_bytes())
    data[-1] ^= 0xFF  # in the last sampled block of the other file only
    stat = other.stat()
    other.write_bytes(bytes(data))
    os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = fingerprint_image(image)
    assert (after.size, after.mtime) == (before.size, before.mtime)
    assert after.sample_sha256 != before.sample_sha256


def test_an_mrxs_slide_is_fingerprinted_with_its_data_folder(tmp_path):
    _write(tmp_path / "slide.mrxs", b"[GENERAL]\n")
    _write(tmp_path / "slide" / "Slidedat.ini", b"[GENERAL]\n")
    _write(tmp_path / "slide" / "Data0000.dat", os.urandom(1000))
    (image,) = discover_images(tmp_path)
    assert image.parts == tuple(
        str(tmp_path / "slide" / n) for n in ("Data0000.dat", "Slidedat.ini")
    )
    before = fingerprint_image(image)
    _write(tmp_path / "slide" / "Data0000.dat", os.urandom(1000))
    assert fingerprint_image(image).sample_sha256 != before.sample_sha256


def test_a_vms_slide_is_one_image_with_the_jpegs_it_names(tmp_path):
    """OpenSlide reads the JPEGs a VMS index names; each is no image of its own."""
    index = (
        "[Virtual Microscope Specimen]\nImageFile=s.jpg\nImageFile(1,0)=s_1.jpg\nMapFile=m.jpg\n"
    )
    _write(tmp_path / "s.vms", index.encode())
    for name in ("s.jpg", "s_1.jpg", "m.jpg", "unrelated.jpg"):
        _write(tmp_path / name, b"\xff\xd8 not decoded here")
    images = discover_images(tmp_path)
    assert _keys(images) == ["s.vms", "unrelated.jpg"]
    assert images[0].parts == tuple(str(tmp_path / n) for n in ("m.jpg", "s.jpg", "s_1.jpg"))


def test_an_archive_segments_a_set_once_and_again_when_another_file_changes(
    tmp_path, random_checkpoint
):
    source, out = tmp_path / "archive", tmp_path / "out"
    source.mkdir()
    write_two_file_set(source, pyramid=False)
    (image,) = discover_images(source)
    done = process_image(image, out, random_checkpoint, config=CONFIG)
    assert done.status == "segmented"
    assert image_paths(out, "set.ome.tif").state.exists()
    assert not image_paths(out, "set_1.ome.tif").state.exists()

    (image,) = discover_images(source)
    assert process_image(image, out, random_checkpoint, config=CONFIG).status == "skipped"
    other = source / "set_1.ome.tif"
    os.utime(other, (other.stat().st_atime, other.stat().st_mtime + 10))  # a rescan's file
    (image,) = discover_images(source)
    again = process_image(image, out, random_checkpoint, config=CONFIG)
    assert (again.status, again.reason) == ("segmented", "image changed")
    assert image_paths(out, "set.ome.tif").result.exists()


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
