"""The CLI is a shell over the API: same results, one-line errors that name the file."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import segpipe
from segpipe.cli import main


def test_segment_and_info(small_slide, random_checkpoint, tmp_path, capsys):
    out = tmp_path / "r.zarr"
    args = [
        "segment",
        str(small_slide.image),
        str(out),
        "--model",
        str(random_checkpoint),
        "--tile",
        "64",
        "--scheduler",
        "sync",
    ]
    assert main(args) == 0
    assert capsys.readouterr().out.strip().endswith("r.zarr")
    direct = segpipe.segment(
        small_slide.image, tmp_path / "d.zarr", random_checkpoint, tile=64, scheduler="sync"
    )
    np.testing.assert_array_equal(
        segpipe.open_result(out)["mask"].values, segpipe.open_result(direct)["mask"].values
    )

    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["summary"]["shape"] == [300, 300]
    assert info["provenance"]["tile"] == 64
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "nucleus" in text and "µm²" in text


def test_every_flag_of_earlier_releases_still_works(small_slide, tmp_path, monkeypatch):
    from segpipe.config import SegmentConfig

    seen = []
    monkeypatch.setattr(
        "segpipe.execution.segment.segment", lambda *a, **kw: seen.append((a, kw)) or "out"
    )
    args = {
        "--tile": "256",
        "--mode": "blend",
        "--window": "64",
        "--overlap": "0.5",
        "--sigma-scale": "0.25",
        "--level": "1",
        "--pixel-size": "0.25",
        "--probability-dtype": "uint8",
        "--task-tiles": "1",
        "--min-level-size": "128",
        "--batch-size": "8",
        "--device": "cpu",
        "--workers": "3",
        "--scheduler": "tcp://127.0.0.1:8786",
    }
    argv = ["segment", str(small_slide.image), str(tmp_path / "r.zarr"), "--model", "m.pt"]
    assert main([*argv, *[x for kv in args.items() for x in kv], "--no-amp", "--overwrite"]) == 0
    ((_, _, model, config), kwargs) = seen[0]
    assert model == "m.pt"
    assert kwargs["overwrite"] is True
    assert config == SegmentConfig(
        tile=256,
        mode="blend",
        window=64,
        overlap=0.5,
        sigma_scale=0.25,
        level=1,
        pixel_size_um=0.25,
        probability_dtype="uint8",
        task_tiles=1,
        min_level_size=128,
        amp=False,
        batch_size=8,
        device="cpu",
        n_workers=3,
        scheduler="tcp://127.0.0.1:8786",
    )


@pytest.mark.parametrize("command", ["segment", "archive", "serve", "demo"])
def test_help_lists_every_setting_with_its_default(command, capsys):
    from segpipe.config import settings

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in settings():
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        assert flag in text
        assert " ".join(f.metadata["help"].split()) in text
    assert "(default: 512)" in text and "--amp, --no-amp" in text


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--tile", "0"], "SegmentConfig.tile must be >= 1, got 0"),
        (["--overlap", "1"], "SegmentConfig.overlap must be in [0, 1), got 1.0"),
        (["--device", "gpu"], "SegmentConfig.device must be 'auto', 'cpu'"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(option, message, small_slide, tmp_path, capsys):
    code = main(["segment", str(small_slide.image), str(tmp_path / "r.zarr"), *option])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"segpipe segment: error: {message}")
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.zarr").exists()


def test_info_on_an_image(small_slide, capsys):
    assert main(["info", str(small_slide.image)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "image"
    assert info["levels"][0] == [300, 300, 3]
    assert info["pixel_size_um"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d: d / "missing.tif", "missing.tif"),
        (
            lambda d: (d / "junk.tif").write_bytes(b"not a tiff at all") and d / "junk.tif",
            "junk.tif",
        ),
    ],
)
def test_bad_input_is_one_line_naming_the_file(make, expected, tmp_path, capsys, random_checkpoint):
    bad = make(tmp_path)
    code = main(
        [
            "segment",
            str(bad),
            str(tmp_path / "r.zarr"),
            "--model",
            str(random_checkpoint),
            "--scheduler",
            "sync",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("segpipe segment: error:")
    assert expected in err
    assert not (tmp_path / "r.zarr").exists(), "no half-written result"


def test_unknown_model_lists_the_shipped_ones(small_slide, tmp_path, capsys):
    code = main(
        [
            "segment",
            str(small_slide.image),
            str(tmp_path / "r.zarr"),
            "--model",
            "no-such-model",
            "--scheduler",
            "sync",
        ]
    )
    assert code == 2
    assert "no shipped model or checkpoint file 'no-such-model'" in capsys.readouterr().err


@pytest.mark.integration
def test_demo_runs_the_flow(random_checkpoint, tmp_path):
    """The real command in a fresh process, on Prefect's temporary local server."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "segpipe.cli",
            "demo",
            "--size",
            "256",
            "--out",
            str(tmp_path),
            "--model",
            str(random_checkpoint),
            "--tile",
            "128",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "mean Dice (tissue, nucleus)" in run.stdout
    assert "µm²" in run.stdout
    result = next(tmp_path.glob("*.seg.zarr"))
    assert f"result: {result}" in run.stdout
    assert segpipe.open_result(result).attrs["segpipe"]["complete"] is True


@pytest.mark.integration
def test_archive_command_segments_each_image_once(prefect_harness, random_checkpoint, tmp_path):
    from segpipe.archive.catalog import open_catalog
    from segpipe.synthetic.demo import make_demo_slide

    archive = tmp_path / "archive"
    for seed in (1, 2):
        make_demo_slide(archive, size=128, seed=seed)
    for truth in archive.glob("*.truth.zarr"):  # only the slides belong to the archive
        shutil.rmtree(truth)
    out = tmp_path / "results"
    args = [
        "archive",
        str(archive),
        str(out),
        "--model",
        str(random_checkpoint),
        "--scheduler",
        "sync",
        "--tile",
        "64",
    ]
    assert main(args) == 0
    catalog = open_catalog(out)
    assert catalog.sizes["image"] == 2
    results = sorted(out.rglob("*.seg.zarr"))
    assert len(results) == 2
    finished = [segpipe.open_result(r).attrs["segpipe"]["finished"] for r in results]
    assert main(args) == 0  # nothing new: nothing recomputed
    assert [segpipe.open_result(r).attrs["segpipe"]["finished"] for r in results] == finished


def test_query_and_export(small_slide, random_checkpoint, tmp_path, capsys):
    from scipy import ndimage

    out = segpipe.segment(
        small_slide.image, tmp_path / "r.zarr", random_checkpoint, tile=64, scheduler="sync"
    )
    mask = segpipe.open_result(out)["mask"].values
    csv = tmp_path / "nuclei.csv"
    args = ["query", str(out), "--class", "nucleus", "--objects", "--json", "--table", str(csv)]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    (nucleus,) = report["classes"]
    assert nucleus["pixels"] == int((mask == 2).sum())
    assert nucleus["area"] == pytest.approx((mask == 2).sum() * 0.25)
    _, count = ndimage.label(mask == 2)
    assert report["objects"]["count"] == count
    assert len(csv.read_text().strip().splitlines()) == count + 1

    geojson = tmp_path / "nuclei.geojson"
    assert main(["export", str(out), "--geojson", str(geojson), "--class", "nucleus"]) == 0
    collection = json.loads(geojson.read_text())
    assert collection["type"] == "FeatureCollection"
    assert len(collection["features"]) == count


def test_train_then_evaluate(small_slide, tmp_path, capsys):
    import zarr

    from segpipe import models
    from segpipe.analysis.metrics import confusion_matrix, dice

    ckpt = tmp_path / "tiny.pt"
    args = [
        "train",
        str(ckpt),
        "--steps",
        "3",
        "--slide-size",
        "128",
        "--num-slides",
        "1",
        "--val-size",
        "128",
        "--batch-size",
        "2",
        "--patch",
        "16",
        "--width",
        "4",
        "--depth",
        "2",
        "--no-progress",
    ]
    assert main(args) == 0
    net = models.load(ckpt)
    assert net.class_names == ("background", "tissue", "nucleus")
    assert (net.config.width, net.config.depth) == (4, 2)

    out = segpipe.segment(small_slide.image, tmp_path / "r.zarr", ckpt, tile=64, scheduler="sync")
    capsys.readouterr()
    assert main(["evaluate", str(out), str(small_slide.truth), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    mask = segpipe.open_result(out)["mask"].values
    truth = zarr.open_array(small_slide.truth, mode="r")[...]
    expected = dice(confusion_matrix(mask, truth, 3))
    got = [scores["dice"][k] for k in ("background", "tissue", "nucleus")]
    np.testing.assert_allclose(got, expected, equal_nan=True)
