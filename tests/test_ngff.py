"""The NGFF 0.4 copy for QuPath: readers of 0.4 find image and labels, values unchanged; and
segpipe reading OME-Zarr that others wrote (bioformats2raw, missing scales) or that was edited."""

import re
from collections.abc import Iterator
from typing import Any, ClassVar

import fsspec
import numpy as np
import pytest
import zarr
from fsspec.implementations.memory import MemoryFileSystem
from test_query import file_tree, make_result, squares_on_chunk_corners

from segpipe import open_result
from segpipe.analysis import ngff
from segpipe.analysis.ngff import export_ngff04
from segpipe.io.files import URLPath
from segpipe.io.readers import Georeference, ImageReadError, open_image
from segpipe.results import LABEL_NAME, result_levels


class GuardedFileSystem(MemoryFileSystem):
    """An in-memory object store reached only with its ``storage_options`` (``key``), as S3
    is with its endpoint and credentials: code that drops a URLPath's options fails here."""

    protocol = "guarded"
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]

    def __init__(self, *args: Any, key: str | None = None, **kwargs: Any) -> None:
        if key != "k":
            raise PermissionError("guarded:// is reached with storage_options {'key': 'k'}")
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        return super()._strip_protocol(str(path).removeprefix("guarded://"))


fsspec.register_implementation("guarded", GuardedFileSystem, clobber=True)


def guarded(key: str) -> URLPath:
    """``guarded://<key>`` with the storage options that reach it."""
    return URLPath(f"guarded://{key}", {"key": "k"})


@pytest.fixture
def guarded_store() -> Iterator[None]:
    yield
    GuardedFileSystem.store.clear()
    GuardedFileSystem.pseudo_dirs[1:] = []


@pytest.fixture(scope="module", params=["float16", "uint8"])
def result(request, tmp_path_factory):
    labels, _ = squares_on_chunk_corners()
    path, _ = make_result(tmp_path_factory.mktemp("n") / "r.zarr", labels, dtype=request.param)
    return path


@pytest.fixture(scope="module")
def copy(result):
    return export_ngff04(result, result.parent / "r04.zarr")


def source_levels(result, name):
    """Stored (not CF-decoded) arrays of every level of the result, read with plain zarr."""
    group = zarr.open_group(result, mode="r")
    n = len(result_levels(result))
    if name == "mask":
        return [group[f"labels/{LABEL_NAME}/{k}/{LABEL_NAME}"][...] for k in range(n)]
    return [group[f"{k}/probabilities"][...] for k in range(n)]


def test_ome_zarr_py_reads_image_and_labels_of_the_copy(result, copy):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    location = parse_url(str(copy))
    assert location.version == "0.4"
    nodes = list(Reader(location)())
    image = nodes[0]
    assert any(isinstance(s, Multiscales) for s in image.specs)
    expected = source_levels(result, "probabilities")
    assert len(image.data) == len(expected) > 1
    for got, want in zip(image.data, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    assert image.metadata["channel_names"] == ["background", "tissue", "nucleus"]
    (label,) = [n for n in nodes if any(isinstance(s, Label) for s in n.specs)]
    for got, want in zip(label.data, source_levels(result, "mask"), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(np.asarray(label.data[0]), open_result(result)["mask"].values)


def test_strict_04_validator_accepts_the_copy(result, copy):
    from ome_zarr_models.v04.image import Image
    from ome_zarr_models.v04.image_label import ImageLabel

    image = Image.from_zarr(zarr.open_group(copy, mode="r"))
    (multiscale,) = image.attributes.multiscales
    assert multiscale.version == "0.4"
    assert [a.name for a in multiscale.axes] == ["c", "y", "x"]
    assert [a.unit for a in multiscale.axes[1:]] == ["micrometer"] * 2
    source = zarr.open_group(result, mode="r").attrs["ome"]["multiscales"][0]["datasets"]
    copied = zarr.open_group(copy, mode="r").attrs["multiscales"][0]["datasets"]
    assert [d["path"] for d in copied] == [str(k) for k in range(len(source))]
    got = [d["coordinateTransformations"] for d in copied]
    assert got == [d["coordinateTransformations"] for d in source]
    label = ImageLabel.from_zarr(zarr.open_group(copy / "labels" / LABEL_NAME, mode="r"))
    assert label.attributes.image_label.version == "0.4"
    # 0.4 readers get flat level paths, whatever the result's layout nests.
    flat = [str(k) for k in range(len(result_levels(result)))]
    assert [d.path for d in label.attributes.multiscales[0].datasets] == flat
    assert zarr.open_group(copy, mode="r")["0"].metadata.zarr_format == 2


def test_existing_output_needs_overwrite(result, copy):
    with pytest.raises(FileExistsError, match="overwrite"):
        export_ngff04(result, copy)
    assert export_ngff04(result, copy, overwrite=True) == copy


def test_export_from_and_to_urls_keeps_their_storage_options(guarded_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a URL taken for a local path would land
    labels, _ = squares_on_chunk_corners()
    source = make_result(guarded("ngff/r.zarr"), labels)[0]
    want = source_levels(source, "probabilities")
    local = export_ngff04(source, tmp_path / "local.zarr")
    remote = export_ngff04(source, guarded("ngff/r04.zarr"))
    assert remote == guarded("ngff/r04.zarr")
    memory = export_ngff04(source, "memory://segpipe-ngff-test/r04.zarr")
    try:
        assert isinstance(memory, URLPath)
        for copy in (local, remote, memory):
            group = zarr.open_group(copy, mode="r")
            assert group.attrs["multiscales"][0]["version"] == "0.4"
            np.testing.assert_array_equal(group["0"][...], want[0])
            np.testing.assert_array_equal(group[f"labels/{LABEL_NAME}/0"][...], labels)
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            ".local.zarr.lock",
            "local.zarr",
        ]  # no s3: folders
        with pytest.raises(FileExistsError, match="overwrite"):
            export_ngff04(source, remote)
        assert export_ngff04(source, remote, overwrite=True) == remote
        np.testing.assert_array_equal(zarr.open_group(remote, mode="r")["0"][...], want[0])
    finally:
        fsspec.filesystem("memory").rm("/segpipe-ngff-test", recursive=True)


def test_cli_export_ngff_and_annotations(result, tmp_path, capsys):
    import json

    from segpipe.cli import main

    out = tmp_path / "q.zarr"
    assert main(["export", str(result), "--ngff", "0.4", str(out)]) == 0
    assert zarr.open_group(out, mode="r").attrs["multiscales"][0]["version"] == "0.4"
    assert main(["export", str(result), "--ngff", "0.4", str(out)]) == 2  # exists
    assert main(["export", str(result), "--ngff", "0.4", str(out), "--overwrite"]) == 0
    assert main(["export", str(result), "--ngff", "0.3", str(tmp_path / "o.zarr")]) == 2
    assert "not supported" in capsys.readouterr().err
    assert main(["export", str(result)]) == 2
    assert "export needs an OUTPUT" in capsys.readouterr().err
    geojson = tmp_path / "tissue.geojson"
    args = ["export", str(result), "--geojson", str(geojson), "--class", "tissue"]
    assert main([*args, "--object-type", "annotation"]) == 0
    (ring,) = json.loads(geojson.read_text(encoding="utf-8"))["features"]
    assert ring["properties"]["objectType"] == "annotation"


# ---- replacing only what an export wrote, whole ----------------------------------------------


def _objects():
    """Every object of the guarded:// store and its bytes."""
    return {k: bytes(v.getvalue()) for k, v in GuardedFileSystem.store.items()}


@pytest.fixture
def fresh(tmp_path):
    """A result of this test's own, ``tmp_path/in/r.zarr``."""
    labels, _ = squares_on_chunk_corners()
    return make_result(tmp_path / "in" / "r.zarr", labels)[0]


def _interrupt_the_second_copy(monkeypatch):
    """The export stops (Ctrl-C) after its first array is copied."""
    real = ngff._copy_array
    copied = []

    def copy_one(*args):
        if copied:
            raise KeyboardInterrupt
        real(*args)
        copied.append(args)

    monkeypatch.setattr(ngff, "_copy_array", copy_one)


@pytest.mark.parametrize(
    ("cwd", "output", "error", "message"),
    [
        (".", "userdir", FileExistsError, "userdir exists and is not a segpipe NGFF export"),
        ("userdir", ".", FileExistsError, "output . exists and is not a segpipe NGFF export"),
        (".", "keep.png", FileExistsError, "keep.png exists and is not a segpipe NGFF export"),
        (".", "theirs04.zarr", FileExistsError, "theirs04.zarr exists and is not a segpipe NGFF"),
        (".", "in/r.zarr", ValueError, "output in/r.zarr is the result"),
        (".", "in/r.zarr/labels/x.zarr", ValueError, "x.zarr is inside the result"),
        (".", "in", ValueError, "output in holds the result"),
        ("in", ".", ValueError, "output . holds the result"),
    ],
)
def test_overwrite_replaces_nothing_but_an_earlier_export(
    fresh, tmp_path, monkeypatch, cwd, output, error, message
):
    (tmp_path / "userdir").mkdir()
    (tmp_path / "userdir" / "a.txt").write_text("mine")
    (tmp_path / "keep.png").write_bytes(b"\x89PNG\r\n\x1a\n not a copy")
    _ome_image(tmp_path / "theirs04.zarr", version="0.4")  # someone's NGFF 0.4, not an export
    before = file_tree(tmp_path)
    monkeypatch.chdir(tmp_path / cwd)
    with pytest.raises(error, match=re.escape(message)):
        export_ngff04(fresh, output, overwrite=True)
    assert file_tree(tmp_path) == before


def test_overwrite_replaces_an_earlier_export_whole(fresh, tmp_path):
    out = tmp_path / "e.zarr"
    export_ngff04(fresh, out)
    (out / "stale").write_text("in the earlier export only")
    (tmp_path / ".e.zarr.exporting-0123456789ab").mkdir()  # what a killed export left
    assert export_ngff04(fresh, out, overwrite=True) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == [".e.zarr.lock", "e.zarr", "in"]
    assert not (out / "stale").exists()
    group = zarr.open_group(out, mode="r")
    assert group.attrs["segpipe"] == {"kind": "ngff-export", "version": "0.4", "complete": True}
    np.testing.assert_array_equal(group["1"][...], source_levels(fresh, "probabilities")[1])


def test_a_link_to_an_export_is_refused(fresh, tmp_path):
    export_ngff04(fresh, tmp_path / "e.zarr")
    (tmp_path / "link.zarr").symlink_to(tmp_path / "e.zarr")
    before = file_tree(tmp_path)
    with pytest.raises(FileExistsError, match=r"link\.zarr is a symbolic link"):
        export_ngff04(fresh, tmp_path / "link.zarr", overwrite=True)
    assert file_tree(tmp_path) == before and (tmp_path / "link.zarr").is_symlink()


def test_an_export_under_way_is_not_touched_by_another(fresh, tmp_path, held_elsewhere):
    """Two exports to one output: the second took the first's copy under way for one a killed
    export left and deleted it, and the first then published an export missing levels."""
    from segpipe.io.locks import StoreBusyError

    out = tmp_path / "e.zarr"
    building = tmp_path / ".e.zarr.exporting-0123456789ab"
    building.mkdir()
    (building / "zarr.json").write_text("{}")
    proc = held_elsewhere(out)  # as the first export holds it
    with pytest.raises(StoreBusyError, match=r"e\.zarr is in use by another segpipe run"):
        export_ngff04(fresh, out)
    assert (building / "zarr.json").exists() and not out.exists()
    proc.kill()
    proc.wait()
    assert export_ngff04(fresh, out) == out  # a killed export's leftovers are cleared
    assert not building.exists()
    np.testing.assert_array_equal(
        zarr.open_group(out, mode="r")["0"][...], source_levels(fresh, "probabilities")[0]
    )


@pytest.mark.parametrize("earlier", [False, True], ids=["new", "over-an-earlier-export"])
def test_an_interrupted_export_leaves_the_output_as_it_was(fresh, tmp_path, monkeypatch, earlier):
    out = tmp_path / "e.zarr"
    if earlier:
        export_ngff04(fresh, out)
    before = file_tree(tmp_path)
    _interrupt_the_second_copy(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        export_ngff04(fresh, out, overwrite=True)
    assert file_tree(tmp_path) == before  # no folder listing a missing level, nothing beside it


def test_at_a_url_only_an_export_is_replaced_and_a_failed_one_removed(
    fresh, guarded_store, monkeypatch
):
    guarded("b/user/a.txt").write_bytes(b"mine")
    before = _objects()
    with pytest.raises(FileExistsError, match="user exists and is not a segpipe NGFF export"):
        export_ngff04(fresh, guarded("b/user"), overwrite=True)
    out = guarded("b/e.zarr")
    with monkeypatch.context() as patch:
        _interrupt_the_second_copy(patch)
        with pytest.raises(KeyboardInterrupt):
            export_ngff04(fresh, out)
    assert _objects() == before
    with monkeypatch.context() as patch:  # killed: nothing ran after the interruption
        _interrupt_the_second_copy(patch)
        patch.setattr(ngff, "delete_marked_store", lambda *args: None)
        with pytest.raises(KeyboardInterrupt):
            export_ngff04(fresh, out)
    left = zarr.open_group(out, mode="r").attrs.asdict()
    assert "multiscales" not in left and left["segpipe"]["complete"] is False
    with pytest.raises(FileExistsError, match=r"an unfinished segpipe NGFF export.*overwrite"):
        export_ngff04(fresh, out)
    assert export_ngff04(fresh, out, overwrite=True) == out
    group = zarr.open_group(out, mode="r")
    assert group.attrs["segpipe"]["complete"] is True
    np.testing.assert_array_equal(group["1"][...], source_levels(fresh, "probabilities")[1])
    assert guarded("b/user/a.txt").read_bytes() == b"mine"


# ---- reading OME-Zarr (segpipe.io.readers.ZarrReader) ---------------------------------------
# (most of it is tested in tests/test_readers.py and tests/test_ingest.py)


def _ome_image(path, *, version="0.5", transforms=None, segpipe=None):
    """A one-level (c, y, x) uint8 OME-Zarr image with micrometer axes (0.4: Zarr v2, else
    v3); ``transforms``: level 0's coordinateTransformations, none when None."""
    axes = [{"name": "c", "type": "channel"}]
    axes += [{"name": n, "type": "space", "unit": "micrometer"} for n in "yx"]
    dataset = {"path": "0"}
    if transforms is not None:
        dataset["coordinateTransformations"] = transforms
    ms = {"axes": axes, "datasets": [dataset]}
    v2 = version == "0.4"  # 0.4 puts its metadata at the top, 0.5 under "ome"
    if v2:
        attrs = {"multiscales": [{"version": version, **ms}]}
    else:
        attrs = {
            "ome": {"version": version, "multiscales": [ms]} if version else {"multiscales": [ms]}
        }
    if segpipe is not None:
        attrs["segpipe"] = segpipe
    root = zarr.open_group(path, mode="w", zarr_format=2 if v2 else 3, attributes=attrs)
    data = np.arange(3 * 16 * 24, dtype=np.uint8).reshape(3, 16, 24)
    names = {} if v2 else {"dimension_names": ("c", "y", "x")}
    root.create_array("0", data=data, chunks=(3, 16, 16), **names)
    return path


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_an_ome_zarr_without_the_scale_ngff_requires_is_refused(tmp_path, version):
    """Units and no scale read as 1 µm a pixel (the product of no scales)."""
    path = _ome_image(tmp_path / "noscale.zarr", version=version)
    with pytest.raises(
        ImageReadError, match=rf"noscale\.zarr: OME-Zarr {version} dataset '0' has no 'scale'"
    ):
        open_image(path)
    with pytest.warns(UserWarning, match="has no 'scale'.*using pixel_size_um=0.3"):
        reader = open_image(path, pixel_size_um=0.3)
    assert reader.pixel_size_um == 0.3
    assert reader.shape == (16, 24, 3)


def test_an_ome_zarr_of_no_version_without_scale_has_no_pixel_size(tmp_path):
    path = _ome_image(tmp_path / "old.zarr", version="")
    assert open_image(path).pixel_size_um is None
    # A scale for the whole multiscale (beside the datasets') still says it.
    group = zarr.open_group(path, mode="r+")
    ome = group.attrs.asdict()["ome"]
    ome["multiscales"][0]["coordinateTransformations"] = [{"type": "scale", "scale": [1, 2, 2]}]
    group.update_attributes({"ome": ome})
    assert open_image(path).pixel_size_um == 2.0
    scaled = [{"type": "scale", "scale": [1.0, 0.25, 0.25]}]
    assert open_image(_ome_image(tmp_path / "s.zarr", transforms=scaled)).pixel_size_um == 0.25


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_an_anisotropic_ome_zarr_is_warned_of_and_x_is_used(tmp_path, version):
    """As every other reader: taking y's size would make each model-scale decision 2x off."""
    scaled = [{"type": "scale", "scale": [1.0, 0.5, 0.25]}]  # c, y, x
    path = _ome_image(tmp_path / "aniso.zarr", version=version, transforms=scaled)
    differs = r"aniso\.zarr: OME-Zarr scale differs in X \(0\.25 µm\) and Y \(0\.5 µm\); using X"
    with pytest.warns(UserWarning, match=differs):
        reader = open_image(path)
    assert reader.pixel_size_um == 0.25


_UNIT_SCALE = [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]
_GOOD_TRANSFORM = [2.0, 0.0, 500_000.0, 0.0, -2.0, 5_000_000.0]


@pytest.mark.parametrize(
    ("crs", "transform", "fragment"),
    [
        pytest.param("EPSG:999999", _GOOD_TRANSFORM, "crs 'EPSG:999999' is no CRS", id="crs"),
        pytest.param("EPSG:32633", [2.0, 0.0, 5.0, 0.0, -2.0], "not six numbers", id="five"),
        pytest.param("EPSG:32633", [2.0, 0, "x", 0, -2.0, 1.0], "not six numbers", id="text"),
        pytest.param("EPSG:32633", [None, 0, 5.0, 0, -2.0, 1.0], "not six numbers", id="null"),
        pytest.param(
            "EPSG:32633", [2.0, 0, 5.0, 0, 0.0, 1.0], "not finite or has a pixel size of 0", id="e0"
        ),
    ],
)
def test_an_ingests_georeference_that_is_no_georeference_is_refused(
    tmp_path, crs, transform, fragment
):
    """Found only when describe or a result's coordinates parsed it, as rasterio's error."""
    geo = {"georeference": {"crs": crs, "transform": transform}}
    path = _ome_image(tmp_path / "geo.zarr", transforms=_UNIT_SCALE, segpipe=geo)
    with pytest.raises(ImageReadError, match=rf"geo\.zarr: segpipe\.georeference.*{fragment}"):
        open_image(path)


def test_an_ingests_georeference_reads_back(tmp_path):
    geo = {"georeference": {"crs": "EPSG:32633", "transform": _GOOD_TRANSFORM}}
    path = _ome_image(tmp_path / "geo.zarr", transforms=_UNIT_SCALE, segpipe=geo)
    assert open_image(path).georeference == Georeference("EPSG:32633", tuple(_GOOD_TRANSFORM))


def test_a_bioformats2raw_root_names_its_images(tmp_path):
    """bioformats2raw writes one image a group (0, 1, ...) beside an OME metadata group."""
    root = zarr.open_group(tmp_path / "b2r.zarr", mode="w")
    root.update_attributes({"ome": {"version": "0.5", "bioformats2raw.layout": 3}})
    scaled = [{"type": "scale", "scale": [1.0, 0.5, 0.5]}]
    for image in ("0", "1", "10", "2"):
        _ome_image(tmp_path / "b2r.zarr" / image, transforms=scaled)
    root.create_group("OME")
    with pytest.raises(ImageReadError) as info:
        open_image(tmp_path / "b2r.zarr")
    message = str(info.value)
    assert "bioformats2raw" in message
    assert "['0', '1', '2', '10']" in message
    assert f"open one of them, e.g. {tmp_path / 'b2r.zarr' / '0'}" in message
    assert open_image(tmp_path / "b2r.zarr" / "0").pixel_size_um == 0.5


def test_a_group_without_multiscales_lists_its_arrays_and_groups(tmp_path):
    root = zarr.open_group(tmp_path / "plain.zarr", mode="w")
    root.create_array("a", shape=(4, 4), dtype="u1", dimension_names=("y", "x"))
    root.create_group("images")
    with pytest.raises(
        ImageReadError, match=r"plain\.zarr: .*arrays: \['a'\], groups: \['images'\]"
    ):
        open_image(tmp_path / "plain.zarr")


def _restamp(result) -> None:
    """What a run replacing ``result`` leaves: its own ``started`` stamp."""
    group = zarr.open_group(result, mode="r+")
    group.attrs["segpipe"] = {**group.attrs["segpipe"], "started": "another run's"}


def test_a_result_being_exported_is_held_and_one_replaced_meanwhile_is_not_published(
    fresh, tmp_path, monkeypatch
):
    """Replaced after level 0 was copied (segment with overwrite), the copy's upper levels
    came from the new, empty result, and it was published complete."""
    from segpipe.results import ResultBusyError, ResultReplacedError, delete_result

    real, refused = ngff._copy_array, []

    def copy_then_replace(*args):
        real(*args)
        if not refused:
            with pytest.raises(ResultBusyError) as busy:
                delete_result(fresh)  # what segment's overwrite does first
            refused.append(busy.value)

    monkeypatch.setattr(ngff, "_copy_array", copy_then_replace)
    out = export_ngff04(fresh, tmp_path / "e.zarr")
    assert refused and open_result(fresh) is not None
    np.testing.assert_array_equal(
        zarr.open_group(out, mode="r")["1"][...], source_levels(fresh, "probabilities")[1]
    )

    # No lock stops a run elsewhere (a result at a URL): its stamp is checked before publishing.
    def copy_then_restamp(*args):
        real(*args)
        _restamp(fresh)

    monkeypatch.setattr(ngff, "_copy_array", copy_then_restamp)
    with pytest.raises(ResultReplacedError):
        export_ngff04(fresh, tmp_path / "f.zarr")
    assert not (tmp_path / "f.zarr").exists()


def _one_nucleus():
    """(32, 32) labels: background and one 5 x 5 nucleus."""
    labels = np.zeros((32, 32), np.uint8)
    labels[4:9, 4:9] = 2
    return labels


@pytest.mark.parametrize(
    ("stored", "exported"), [("float16", np.float32), ("float32", np.float32), ("uint8", np.uint8)]
)
def test_only_float16_probabilities_are_widened_in_the_export(tmp_path, stored, exported):
    """Java has no half floats: QuPath reads float32; float16 widens exactly."""
    path, _ = make_result(tmp_path / "r.zarr", _one_nucleus(), dtype=stored)
    group = zarr.open_group(export_ngff04(path, tmp_path / "e.zarr"), mode="r")
    levels = source_levels(path, "probabilities")
    assert levels[0].dtype == np.dtype(stored)
    for k, want in enumerate(levels):
        assert group[str(k)].dtype == exported
        np.testing.assert_array_equal(group[str(k)][...], want)


def test_every_label_image_of_the_result_is_listed_in_the_export(tmp_path, monkeypatch):
    """A run with a foreground mask stores it as a second label image beside the mask: a 0.4
    reader finds labels by the list in labels/.zattrs, so both are listed."""
    import json

    import test_query

    from segpipe.results.labels import add_label_image, label_images

    real = test_query.prepare_result

    def with_foreground(path, meta):  # as segment's driver prepares a run with a mask
        out = real(path, meta)
        add_label_image(path, "foreground", ["left out", "foreground"], long_name="foreground")
        return out

    monkeypatch.setattr(test_query, "prepare_result", with_foreground)
    path, _ = make_result(tmp_path / "r.zarr", _one_nucleus())
    names = label_images(path)
    assert names == [LABEL_NAME, "foreground"]
    out = export_ngff04(path, tmp_path / "e.zarr")
    assert json.loads((out / "labels" / ".zattrs").read_text())["labels"] == names
    for name in names:
        assert zarr.open_group(out / "labels" / name, mode="r").attrs["image-label"]


def test_a_failed_replacement_puts_the_earlier_export_back(fresh, tmp_path, monkeypatch):
    """The new copy cannot be renamed into place (EACCES, EXDEV): the earlier export, moved
    aside for it, is back at the output, not left as a hidden ".deleting-" folder."""
    import os

    out = tmp_path / "e.zarr"
    export_ngff04(fresh, out)
    before = file_tree(tmp_path)
    real = os.rename

    def refuse_the_new_copy(src, dst):
        if os.path.basename(src).startswith(".e.zarr.exporting-"):
            raise PermissionError(13, "Permission denied", str(src))
        return real(src, dst)

    monkeypatch.setattr(ngff.os, "rename", refuse_the_new_copy)
    with pytest.raises(PermissionError):
        export_ngff04(fresh, out, overwrite=True)
    assert file_tree(tmp_path) == before


def test_an_export_to_a_folder_taking_no_files_is_refused_naming_it(result, tmp_path, monkeypatch):
    """A read-only folder's error named the hidden copy built beside the export
    (".a.zarr.exporting-beb3eea8a02f: Permission denied")."""
    import segpipe.atomic as atomic

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(atomic.tempfile, "TemporaryFile", read_only)
    target = tmp_path / "a.zarr"
    with pytest.raises(OSError, match="takes no new files") as raised:
        export_ngff04(result, target)
    assert raised.value.filename == str(target) and "exporting" not in str(raised.value)
    assert [p.name for p in tmp_path.iterdir()] == [".a.zarr.lock"]  # the export's lock
