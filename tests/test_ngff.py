"""The NGFF 0.4 copy for QuPath: readers of 0.4 find image and labels, values unchanged."""

from collections.abc import Iterator
from typing import Any, ClassVar

import fsspec
import numpy as np
import pytest
import zarr
from fsspec.implementations.memory import MemoryFileSystem
from test_query import make_result, squares_on_chunk_corners

from segpipe import open_result
from segpipe.analysis.ngff import export_ngff04
from segpipe.io.files import URLPath
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
        assert sorted(p.name for p in tmp_path.iterdir()) == ["local.zarr"]
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
