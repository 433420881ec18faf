"""The CLI is a shell over the API: same results, one-line errors that name the file."""

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import segpipe
from segpipe.cli import main
from segpipe.results import is_complete


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


def test_the_gc_freeze_comes_after_the_heavy_imports(tmp_path):
    """Frozen objects stay out of the collector's full passes: torch, Dask and Zarr must be
    loaded when a model command freezes, or the freeze spares nothing (the commands import
    them lazily, inside their handlers)."""
    code = textwrap.dedent(
        """
        import gc, sys
        import segpipe.cli as cli
        seen = []
        gc.freeze = lambda: seen.append(sorted(
            m for m in ("torch", "distributed", "zarr", "dask") if m in sys.modules))
        code = cli.main(["segment", "missing.tif", "out.zarr"])
        print(code, seen)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert done.stdout.split()[0] == "2", done.stderr[-2000:]  # the missing file: a user error
    assert "[['dask', 'distributed', 'torch', 'zarr']]" in done.stdout, done.stdout


def test_a_model_command_gives_the_calling_process_its_collector_back(tmp_path, monkeypatch):
    """main() freezes what is alive when a model command starts; a process that called it
    (a notebook, a script, this test) has every object collectable again once it returns,
    and a caller's own freeze is left as it was."""
    import gc

    frozen = []
    freeze = gc.freeze

    def recording():
        freeze()
        frozen.append(gc.get_freeze_count())

    monkeypatch.setattr(gc, "freeze", recording)
    monkeypatch.chdir(tmp_path)
    assert main(["segment", "missing.tif", "out.zarr"]) == 2
    assert frozen and frozen[0] > 0
    assert gc.get_freeze_count() == 0
    try:
        freeze()  # the caller's own
        frozen.clear()
        assert main(["segment", "missing.tif", "out.zarr"]) == 2
        assert not frozen and gc.get_freeze_count() > 0  # neither frozen again nor unfrozen
    finally:
        gc.unfreeze()


def test_the_segpipe_executable_keeps_its_freeze_to_its_exit(tmp_path):
    """Its process is the command's own: unfrozen, its exit would walk every frozen object."""
    code = textwrap.dedent(
        """
        import atexit, gc, sys
        from segpipe import cli
        atexit.register(lambda: print("frozen at exit", gc.get_freeze_count() > 0))
        sys.argv = ["segpipe", "segment", "missing.tif", "out.zarr"]
        cli.command()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "frozen at exit True" in done.stdout, done.stdout


def test_commands_that_run_models_tune_malloc_and_gc_before_they_run(monkeypatch):
    # keep_freed_memory binds threads yet to allocate: it must come before the command runs.
    import segpipe.cli as cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("malloc") or True)
    monkeypatch.setattr(cli, "_freeze_imports", lambda: calls.append("freeze"))
    real = cli.build_parser

    def parser():
        p = real()
        parse = p.parse_args

        def parse_args(argv):
            args = parse(argv)
            args.run = lambda _: calls.append("run") or 0
            return args

        p.parse_args = parse_args
        return p

    monkeypatch.setattr(cli, "build_parser", parser)
    assert main(["segment", "in.tif", "out.zarr"]) == 0
    assert calls == ["malloc", "freeze", "run"]
    calls.clear()
    assert main(["info", "out.zarr"]) == 0
    assert calls == ["run"], "a command that runs no model keeps glibc's and gc's defaults"


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
        (["--tile", "0"], "--tile must be >= 1, got 0"),
        (["--overlap", "1"], "--overlap must be in [0, 1), got 1.0"),
        (["--device", "gpu"], "--device must be 'auto', 'cpu'"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(option, message, small_slide, tmp_path, capsys):
    code = main(["segment", str(small_slide.image), str(tmp_path / "r.zarr"), *option])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"segpipe segment: error: {message}")
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.zarr").exists()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--workers", "0"], "--workers must be >= 1, got 0"),
        (["--pixel-size", "-1"], "--pixel-size must be a positive number of microns, got -1.0"),
        (["--min-level-size", "0"], "--min-level-size must be >= 1, got 0"),
    ],
)
@pytest.mark.parametrize("command", ["segment", "archive"])
def test_a_bad_setting_names_the_option_typed_not_the_field(
    command, option, message, tmp_path, capsys, monkeypatch
):
    """ "SegmentConfig.n_workers must be >= 1" named no option of the command (--workers);
    the library's message still names its field."""
    import segpipe.flows.archive
    from segpipe.config import SegmentConfig

    ran = []
    monkeypatch.setattr(segpipe.flows.archive, "process_archive", lambda *a, **k: ran.append(a))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    code = main([command, str(tmp_path / "in.tif"), str(tmp_path / "out"), *option])
    assert (code, capsys.readouterr().err) == (2, f"segpipe {command}: error: {message}\n")
    assert ran == []
    with pytest.raises(ValueError, match=r"^SegmentConfig\.n_workers must be >= 1, got 0"):
        SegmentConfig(n_workers=0)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--chunk", "1"], "--chunk must be an integer >= 2 (pixels), got 1"),
        (
            ["--pixel-size", "0"],
            "--pixel-size must be a positive number of microns per pixel, got 0.0",
        ),
        (
            ["--pixel-size", "nan"],
            "--pixel-size must be a positive number of microns per pixel, got nan",
        ),
    ],
)
def test_ingest_names_the_option_typed_not_the_parameter(option, message, tmp_path, capsys):
    """ "chunk must be an integer >= 2" and "pixel_size_um must be ..." named ingest()'s
    parameters, not the options."""
    code = main(["ingest", str(tmp_path / "in.tif"), str(tmp_path / "out.zarr"), *option])
    assert (code, capsys.readouterr().err) == (2, f"segpipe ingest: error: {message}\n")


def test_demo_finds_a_prefect_server_that_is_down_before_making_its_slide(
    tmp_path, capsys, monkeypatch
):
    """The slide (8192 px by default) was made first: a long wait, then "cannot reach"."""
    import types

    import segpipe.synthetic.demo

    made = []

    def make_demo_slide(out, **kwargs):
        made.append(out)
        return types.SimpleNamespace(image=out / "s.ome.tif", truth=out / "s.truth.zarr")

    monkeypatch.setattr(segpipe.synthetic.demo, "make_demo_slide", make_demo_slide)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # the discard port
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    assert "cannot reach the Prefect server at http://127.0.0.1:9/api" in capsys.readouterr().err
    assert made == []


def test_demo_out_that_is_a_file_is_refused_naming_the_option(tmp_path, capsys):
    """mkdir's "file.txt: File exists" named no option and hinted the folder was taken."""
    taken = tmp_path / "file.txt"
    taken.write_text("the user's")
    assert main(["demo", "--out", str(taken), "--size", "64"]) == 2
    assert capsys.readouterr().err.endswith(f"--out {taken}: is a file, not a folder\n")
    assert taken.read_text() == "the user's"


def test_info_on_an_image(small_slide, capsys):
    assert main(["info", str(small_slide.image), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "image"
    assert info["levels"][0] == [300, 300, 3]
    assert info["pixel_size_um"] == pytest.approx(0.5)

    assert main(["info", str(small_slide.image)]) == 0  # text for people by default
    text = capsys.readouterr().out
    assert text.startswith(f"image: {small_slide.image}")
    assert "300 x 300" in text and "0.5 µm/px" in text


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


@pytest.fixture(scope="module")
def demo_prefect_home(tmp_path_factory) -> Path:
    """One Prefect home for this module's ``segpipe demo`` processes, which run one after
    another: its database is made (migrated) by the first, in about 7 s, not by each."""
    return tmp_path_factory.mktemp("demo-prefect-home")


@pytest.mark.parametrize("flags", [[], ["-q"]])
def test_a_damaged_tiff_is_one_line_of_stderr(small_slide, tmp_path, flags):
    """tifffile logged what it could not parse ("invalid value offset") above segpipe's one
    line, even with -q; with -v it still shows."""
    cut = tmp_path / "cut.tif"
    cut.write_bytes(small_slide.image.read_bytes()[:1000])
    command = [sys.executable, "-m", "segpipe.cli", *flags, "info", str(cut)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.splitlines() == [f"segpipe info: error: {cut}: " + run.stderr.split(
        f"{cut}: ", 1)[1].strip()]  # fmt: skip
    assert "truncated" in run.stderr
    loud = [sys.executable, "-m", "segpipe.cli", "-v", "info", str(cut)]
    verbose = subprocess.run(loud, capture_output=True, text=True, timeout=300)
    assert "tifffile" in verbose.stderr and verbose.returncode == 2


def _demo_process(
    out: Path, home: Path, model: Path, *options: str, api_url: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``segpipe demo`` in a fresh process, its stdout and stderr pipes (no terminal): on
    Prefect's temporary local server (its home ``home``), or on the server at ``api_url``."""
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        # As the flow tests' harness: a loaded CI machine starts the server slowly.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    demo = [sys.executable, "-m", "segpipe.cli", "demo", "--out", str(out), "--model", str(model)]
    return subprocess.run(
        [*demo, "--workers", "1", *options],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


@pytest.mark.integration
def test_demo_runs_the_flow_and_tells_its_stages(random_checkpoint, demo_prefect_home, tmp_path):
    """The real command in a fresh process: each stage as plain lines, never Dask's progress
    bars."""
    options = ("--size", "1024", "--tile", "256")
    run = _demo_process(tmp_path, demo_prefect_home, random_checkpoint, *options)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "mean Dice (tissue, nucleus)" in run.stdout
    assert "µm²" in run.stdout
    result = next(tmp_path.glob("*.seg.zarr"))
    assert f"result: {result}" in run.stdout
    assert segpipe.open_result(result).attrs["segpipe"]["complete"] is True

    lines = run.stderr.splitlines()
    # The tasks write the first pyramid levels: the pass after them builds one more here.
    for name, unit in [("ingest", "chunks"), ("segment", "tiles"), ("pyramid", "levels?")]:
        mine = [x for x in lines if x.startswith(f"{name}: ")]
        assert re.fullmatch(rf"{name}: 0/\d+ {unit} \(0%\) \d+\.\d s", mine[0]), mine
        assert re.fullmatch(rf"{name}: (\d+)/\1 {unit} \(100%\) \d+\.\d s, done", mine[-1]), mine
    tiles = re.match(r"segment: 0/(\d+)", next(x for x in lines if x.startswith("segment")))
    assert tiles and int(tiles.group(1)) == (1024 // 256) ** 2
    order = [x.split(":")[0] for x in lines if x.split(":")[0] in ("ingest", "segment", "pyramid")]
    assert order.index("ingest") < order.index("segment") < order.index("pyramid")
    for bar in ("[#", "Completed |", "\r", "it/s]"):
        assert bar not in run.stderr, f"a progress bar ({bar!r}) in a pipe"
    assert "Beginning flow run" not in run.stderr, "Prefect's INFO lines only with -v"


@pytest.mark.integration
@pytest.mark.parametrize("verbose", [False, True], ids=["plain", "verbose"])
def test_a_user_error_inside_the_flow_has_no_traceback_unless_verbose(
    verbose, random_checkpoint, demo_prefect_home, prefect_api_url, tmp_path
):
    """The demo's result path taken by a folder that is no result: the flow's task refuses it.
    Prefect's one-line error and state lines, then the error once more as the last line, exit
    code 2; the tracebacks (Prefect's of the task and of the flow, and ours) only with -v."""
    taken = tmp_path / "synthetic-256px-seed0.seg.zarr"
    taken.mkdir()
    (taken / "notes.txt").write_text("not a segpipe result")
    verbosity = ["-v"] if verbose else []
    options = ("--size", "256", "--tile", "128", *verbosity)
    run = _demo_process(
        tmp_path, demo_prefect_home, random_checkpoint, *options, api_url=prefect_api_url
    )
    assert run.returncode == 2, run.stderr[-3000:]
    error = f"segpipe demo: error: {taken} exists and is not a segpipe result"
    assert error in run.stderr
    failed = "prefect.task_runs: Task run failed with exception: ResultMismatchError("
    assert failed in run.stderr, "Prefect's own line stays"
    assert ("Traceback" in run.stderr) is verbose, run.stderr[-3000:]
    if not verbose:
        lines = [x for x in run.stderr.splitlines() if not re.match(r"[\w ]+: \d+/\d+ ", x)]
        assert lines[-1].startswith(error)
        assert all(" ERROR prefect." in x for x in lines[:-1]), lines


@pytest.mark.integration
def test_the_flow_run_processes_of_a_plain_command_print_no_prefect_info_lines(
    prefect_api_url, tmp_path
):
    """`segpipe serve` starts each flow run as a process of its own, which logs through
    Prefect's console handler: its INFO lines ("Beginning flow run", "Finished in state")
    printed without -v. The environment a plain command leaves its children keeps them
    off the console (Prefect's server still gets them); warnings still show."""
    from segpipe.cli import _quiet_libraries

    code = textwrap.dedent(
        """
        from prefect import flow, get_run_logger

        @flow
        def one():
            get_run_logger().warning("a warning of the run")
            return 1

        print("result", one())
        """
    )
    with _quiet_libraries(verbose=False, quiet=False):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_API_URL=prefect_api_url)
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    printed = run.stdout + run.stderr
    assert "result 1" in run.stdout, printed[-3000:]
    assert "a warning of the run" in printed
    assert "Beginning flow run" not in printed and "Finished in state" not in printed, printed


@pytest.mark.integration
def test_archive_command_segments_each_image_once(
    prefect_harness, random_checkpoint, tmp_path, capsys
):
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
    capsys.readouterr()
    assert main([*args, "--json"]) == 0  # nothing new: nothing recomputed
    assert [segpipe.open_result(r).attrs["segpipe"]["finished"] for r in results] == finished
    summary = json.loads(capsys.readouterr().out)
    assert summary["segmented"] == [] and len(summary["skipped"]) == 2
    assert main(args) == 0
    assert capsys.readouterr().out == f"{summary['summary']}\n"  # text for people by default


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
    assert nucleus["area_um2"] == pytest.approx((mask == 2).sum() * 0.25)
    _, count = ndimage.label(mask == 2)
    assert report["objects"]["count"] == count
    assert len(csv.read_text().strip().splitlines()) == count + 1
    # No object in the region: the table keeps its columns (a bare newline before)
    empty = tmp_path / "none.csv"
    args = ["query", str(out), "--class", "nucleus", "--objects", "--table", str(empty)]
    assert main([*args, "--region", "0", "0", "0.5", "0.5"]) == 0
    capsys.readouterr()
    import pandas as pd

    assert list(pd.read_csv(empty).columns) == list(pd.read_csv(csv).columns)
    assert len(pd.read_csv(empty)) == 0
    # A file:// URL is the file it names: the table went to ./file:/... under the cwd.
    spaced = tmp_path / "t x.csv"
    assert main([*args[:-1], spaced.as_uri()]) == 0
    assert pd.read_csv(spaced).equals(pd.read_csv(csv)) and not Path("file:").exists()
    # Below a file: refused before the objects are labelled, naming the file in the way.
    assert main([*args[:-1], str(csv / "t.csv")]) == 2
    assert f"{csv} is a file, not a folder" in capsys.readouterr().err

    assert main(["query", str(out), "--class", "nucleus"]) == 0  # text by default
    text = capsys.readouterr().out
    assert text.startswith(f"{out} (level 0):")
    assert f"({int((mask == 2).sum())} px)" in text
    assert f"{(mask == 2).sum() * 0.25:,.1f} µm²" in text

    # --class is repeatable, as in export; the classes come back in the order asked
    assert main(["query", str(out), "--class", "nucleus", "--class", "background", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in report["classes"]] == ["nucleus", "background"]
    assert report["classes"][1]["pixels"] == int((mask == 0).sum())
    assert report["classes"][1]["area_um2"] == int((mask == 0).sum()) * 0.25
    assert report["area_units"] == "micrometer**2", "named as info --json names them"
    assert main(["query", str(out), "--class", "nucleus", "--class", "nope"]) == 2
    assert "no class 'nope'" in capsys.readouterr().err
    assert main(["query", str(out), "--class", "nucleus", "--class", "tissue", "--objects"]) == 2

    geojson = tmp_path / "nuclei.geojson"
    assert main(["export", str(out), str(geojson), "--class", "nucleus"]) == 0
    collection = json.loads(geojson.read_text())
    assert collection["type"] == "FeatureCollection"
    assert len(collection["features"]) == count

    # the old spelling still works, and says what to write instead
    old = tmp_path / "old.geojson"
    assert main(["export", str(out), "--geojson", str(old), "--class", "nucleus"]) == 0
    assert "--geojson is deprecated" in capsys.readouterr().err
    assert json.loads(old.read_text()) == collection
    assert main(["export", str(out), str(tmp_path / "x.csv")]) == 2
    assert "name it .geojson or .zarr, or pass --format" in capsys.readouterr().err


def test_train_then_evaluate(small_slide, tmp_path, capsys):
    import zarr

    from segpipe import models
    from segpipe.analysis.evaluation import Evaluation
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
        "--pixel-size",
        "0.55",
    ]
    assert main(args) == 0
    out, err = capsys.readouterr()
    net = models.load(ckpt)
    assert net.class_names == ("background", "tissue", "nucleus")
    assert models.pixel_contract_of(net).pixel_size_um == 0.55  # recorded as given
    assert (net.config.width, net.config.depth) == (4, 2)
    # It ends with the report `segpipe evaluate` prints, of the weights the file holds.
    assert out.rstrip("\n").endswith(Evaluation.from_dict(net.checkpoint_metrics).report())
    assert "train: 0/3 steps (0%)" in err and "train: 3/3 steps (100%)" in err

    out = segpipe.segment(small_slide.image, tmp_path / "r.zarr", ckpt, tile=64, scheduler="sync")
    capsys.readouterr()
    assert main(["evaluate", str(out), str(small_slide.truth), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    mask = segpipe.open_result(out)["mask"].values
    truth = zarr.open_array(small_slide.truth, mode="r")[...]
    expected = dice(confusion_matrix(mask, truth, 3))
    got = [scores["dice"][k] for k in ("background", "tissue", "nucleus")]
    np.testing.assert_allclose(got, expected, equal_nan=True)

    assert main(["evaluate", str(out), str(small_slide.truth)]) == 0  # text by default
    text = capsys.readouterr().out
    assert not text.lstrip().startswith("{")
    assert "nucleus" in text


# -- the habits of its users: --version, help, errors, loudness ----------------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"segpipe {segpipe.__version__}\n"


COMMANDS = (
    "demo",
    "ingest",
    "segment",
    "archive",
    "serve",
    "query",
    "export",
    "train",
    "evaluate",
    "info",
)


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_lists_every_command(capsys):
    text = _help([], capsys)
    assert "``" not in text, "no raw reStructuredText"
    for command in COMMANDS:
        (line,) = [x for x in text.splitlines() if x.split()[:1] == [command]]
        assert len(line.split()) > 2, f"{command} has a one-line description"
    assert "--version" in text and "--verbose" in text and "--quiet" in text


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_has_real_metavars_and_help_for_every_argument(command, capsys):
    import re

    text = _help([command], capsys)
    # A metavar made from a dest (PIXEL_SIZE_UM, LOCK_TTL_S) has an underscore.
    assert not re.findall(r"(?:--[a-z-]+|\[|^  )[ =]?[A-Z][A-Z0-9]*_[A-Z0-9_]+\b", text, re.M)
    assert "``" not in text
    lines = text.splitlines()
    for line, following in zip(lines, [*lines[1:], ""], strict=True):
        if re.match(r"  \S", line):  # an argument: its help beside it or on the next line
            assert re.search(r"\S {2,}\S", line) or following.startswith(" " * 6), line


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("segment", ["--pixel-size UM", "--tile PIXELS", "(default: 512)", "'sync'"]),
        ("ingest", ["SOURCE", "image file", "--pixel-size UM", "--chunk PIXELS", "(default: 512)"]),
        ("train", ["--resume CHECKPOINT", "(default: 500)", "--sigma PIXELS"]),
        ("archive", ["--lock-ttl SECONDS", "--min-age SECONDS", "(default: 600.0)"]),
        ("serve", ["--cron SCHEDULE", "(default: 0 2 * * *)"]),
        ("query", ["--level N", "(default: 0)", "--threshold P"]),
        ("evaluate", ["TRUTH", "--min-size PIXELS", "(default: 0.5)"]),
        ("info", ["PATH", "print JSON instead of text"]),
    ],
)
def test_command_help_shows_defaults(command, expected, capsys):
    text = " ".join(_help([command], capsys).split())
    for words in expected:
        assert words in text


@pytest.fixture
def failing_segment(monkeypatch):
    """Make the library's segment raise ``error`` (set by the test) when the CLI calls it."""
    raised: list[BaseException] = []

    def fake(*args, **kwargs):
        raise raised[0]

    monkeypatch.setattr("segpipe.execution.segment.segment", fake)
    return raised


def _user_error_cases():
    from segpipe.execution.stitching import PredictionError
    from segpipe.io.readers import ImageReadError
    from segpipe.models import CheckpointError
    from segpipe.results import IncompleteResultError, ResultMismatchError

    return [
        ImageReadError("/data/slide.svs: not a TIFF file"),
        ResultMismatchError("/data/out.zarr holds something else; pass --overwrite\nor move it"),
        IncompleteResultError("/data/out.zarr: 3/16 tiles written; re-run to finish"),
        CheckpointError("/models/m.pt: not a segpipe checkpoint"),
        PredictionError("/data/slide.svs: the model's output is NaN or infinite for the window"),
        FileNotFoundError(2, "No such file or directory", "/data/missing.tif"),
    ]


@pytest.mark.parametrize("error", _user_error_cases(), ids=lambda e: type(e).__name__)
def test_user_errors_are_one_line_and_exit_2(error, failing_segment, tmp_path, capsys):
    failing_segment.append(error)
    code = main(["segment", "in.tif", str(tmp_path / "out.zarr")])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("segpipe segment: error: /")
    assert "Traceback" not in err
    if isinstance(error, FileNotFoundError):
        assert err == "segpipe segment: error: /data/missing.tif: No such file or directory\n"
    else:
        assert err == f"segpipe segment: error: {' '.join(str(error).split())}\n"


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_adds_the_traceback(where, failing_segment, tmp_path, capsys):
    from segpipe.io.readers import ImageReadError

    failing_segment.append(ImageReadError("/data/slide.svs: not a TIFF file"))
    argv = ["segment", "in.tif", str(tmp_path / "out.zarr")]
    argv = ["--verbose", *argv] if where == "before" else [*argv, "-v"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert (
        err.strip().splitlines()[-1] == "segpipe segment: error: /data/slide.svs: not a TIFF file"
    )


@pytest.mark.parametrize(
    "bug",
    [
        ZeroDivisionError("a bug in segpipe"),
        # A call with the wrong arguments is segpipe's mistake, not the user's.
        TypeError("segment() missing 1 required positional argument: 'model'"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_bug_keeps_its_traceback(bug, failing_segment, tmp_path):
    failing_segment.append(bug)
    with pytest.raises(type(bug), match=re.escape(str(bug))):
        main(["segment", "in.tif", str(tmp_path / "out.zarr")])


def test_an_unknown_setting_reaching_the_library_is_one_line(monkeypatch, tmp_path, capsys):
    """A setting's name the library does not know (a JSON config, a Prefect parameter) is
    the user's value, not a bug."""
    from segpipe.config import SegmentConfig

    monkeypatch.setattr(
        "segpipe.execution.segment.segment",
        lambda *args, **kwargs: SegmentConfig.from_dict({"tile": 256, "tiles": 256}),
    )
    assert main(["segment", "in.tif", str(tmp_path / "out.zarr")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("segpipe segment: error: unknown segment setting(s) 'tiles'; ")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("verbose", [False, True], ids=["plain", "verbose"])
def test_prefect_logs_a_user_errors_traceback_only_with_verbose_and_a_bugs_always(
    verbose, monkeypatch, tmp_path, caplog
):
    """What a flow's failing task logs on Prefect's run loggers: a user error's traceback goes
    with -v only; a bug's stays (an archive run records a failed image and goes on, so that
    log is where it shows). The loggers are as they were once the command is done."""
    loggers = [logging.getLogger(n) for n in ("prefect.task_runs", "prefect.flow_runs")]
    before = [list(x.filters) for x in loggers]
    user_error = FileNotFoundError(2, "No such file or directory", "/data/missing.tif")

    def failing_task(*args: object, **kwargs: object) -> None:
        for logger in loggers:
            for error in (ZeroDivisionError("a bug in segpipe"), user_error):
                try:
                    raise error
                except Exception:
                    # send_to_api: no Prefect run here to send it to
                    logger.error("failed", exc_info=True, extra={"send_to_api": False})
        raise user_error

    monkeypatch.setattr("segpipe.execution.segment.segment", failing_task)
    argv = ["segment", "in.tif", str(tmp_path / "out.zarr"), *(["-v"] if verbose else [])]
    assert main(argv) == 2
    records = [r for r in caplog.records if r.name.startswith("prefect.")]
    assert [r.name for r in records] == ["prefect.task_runs"] * 2 + ["prefect.flow_runs"] * 2
    for bug, user in zip(records[::2], records[1::2], strict=True):
        assert bug.exc_info is not None and bug.exc_info[0] is ZeroDivisionError
        assert (user.exc_info is not None) is verbose
        assert user.getMessage() == "failed"
    assert [list(x.filters) for x in loggers] == before


def test_a_command_keeps_the_callers_own_settings_and_gives_its_own_back(monkeypatch):
    """main() in a notebook or a test: an environment variable the caller set wins over
    the command's (a slow machine's longer Prefect start-up), and what the command set for
    its run, variables and tifffile's logger level, is the caller's again afterwards."""
    tifffile_log = logging.getLogger("tifffile")
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    monkeypatch.delenv("DO_NOT_TRACK", raising=False)
    during = []

    def segment(*args: object, **kwargs: object) -> str:
        during.append(
            (
                os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"),
                os.environ.get("DO_NOT_TRACK"),
                tifffile_log.level,
            )
        )
        return "out.zarr"

    monkeypatch.setattr("segpipe.execution.segment.segment", segment)
    before = tifffile_log.level
    tifffile_log.setLevel(logging.INFO)  # the caller's
    try:
        assert main(["segment", "in.tif", "out.zarr", "--scheduler", "sync"]) == 0
        after = tifffile_log.level
    finally:
        tifffile_log.setLevel(before)
    assert during == [("300", "1", logging.CRITICAL)]
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "300"
    assert "DO_NOT_TRACK" not in os.environ
    assert after == logging.INFO


@pytest.mark.parametrize(
    ("device", "gpus", "missing"),
    [
        ("cuda", 0, "torch sees no CUDA GPU"),
        ("cuda:1", 0, "torch sees no CUDA GPU"),
        ("cuda:2", 2, "torch sees 2 CUDA GPU(s), cuda:0 to cuda:1"),
        ("mps", 0, "torch sees no Apple MPS device"),
    ],
)
# --scheduler sync runs in this process too: checked here as a local cluster's run is.
@pytest.mark.parametrize("scheduler", [[], ["--scheduler", "sync"]], ids=["local", "sync"])
def test_a_device_this_machine_lacks_is_a_user_error(
    device, gpus, missing, scheduler, monkeypatch, tmp_path, capsys
):
    import torch

    called = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr("segpipe.execution.segment.segment", lambda *a, **kw: called.append(a))
    code = main(["segment", "in.tif", str(tmp_path / "out.zarr"), "--device", device, *scheduler])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        f"segpipe segment: error: --device {device}: {missing} on this machine; "
        "use --device cpu or --device auto\n"
    )
    assert not called, "refused before any work"


def test_a_run_on_mps_without_it_names_the_device(tmp_path, random_checkpoint, small_slide):
    # Before, the predictor's setup passed it and torch failed moving a tensor there, with a
    # bare "PyTorch is not linked with support for mps devices".
    import torch

    if torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device")
    with pytest.raises(RuntimeError, match=r"pid \d+: device 'mps' asked for, but torch sees no"):
        segpipe.segment(
            small_slide.image, tmp_path / "r.zarr", random_checkpoint, device="mps",
            scheduler="sync", tile=64,
        )  # fmt: skip


def test_device_cuda_with_a_remote_scheduler_is_left_to_its_workers(monkeypatch, tmp_path):
    import torch

    called = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(
        "segpipe.execution.segment.segment", lambda *a, **kw: called.append(a) or "out"
    )
    argv = ["segment", "in.tif", "out.zarr", "--device", "cuda", "--scheduler", "tcp://gpu:8786"]
    assert main(argv) == 0
    assert called


def test_device_cuda_with_a_scheduler_address_from_dask_config(monkeypatch):
    import dask.config
    import torch

    called = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(
        "segpipe.execution.segment.segment", lambda *a, **kw: called.append(a) or "out"
    )
    with dask.config.set({"scheduler-address": "tcp://gpu:8786"}):
        assert main(["segment", "in.tif", "out.zarr", "--device", "cuda"]) == 0
    assert called


def test_device_foo_is_one_line(tmp_path, capsys):
    assert main(["segment", "in.tif", str(tmp_path / "out.zarr"), "--device", "foo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("segpipe segment: error: --device must be")
    assert "'foo'" in err and len(err.strip().splitlines()) == 1


def _segment_with_a_stage(*args, **kwargs):
    """Stands in for the library's segment: one stage of two tiles, then the result."""
    from segpipe.progress import stage

    with stage("segment", total=2, unit="tile") as tiles:
        tiles.advance(2)
    return "/data/out.zarr"


@pytest.mark.parametrize(
    "argv",
    [["-q", "segment"], ["segment", "--quiet"], ["--no-progress", "segment"], ["segment", "-q"]],
)
def test_quiet_prints_only_the_result_line(argv, monkeypatch, capsys):
    monkeypatch.setattr("segpipe.execution.segment.segment", _segment_with_a_stage)
    assert main([*argv, "in.tif", "out.zarr"]) == 0
    assert capsys.readouterr() == ("/data/out.zarr\n", "")


def test_progress_goes_to_stderr_as_lines_when_it_is_no_terminal(monkeypatch, capsys):
    monkeypatch.setattr("segpipe.execution.segment.segment", _segment_with_a_stage)
    assert main(["segment", "in.tif", "out.zarr"]) == 0
    out, err = capsys.readouterr()
    assert out == "/data/out.zarr\n"
    assert err.splitlines()[0] == "segment: 0/2 tiles (0%) 0.0 s"
    assert err.splitlines()[-1].startswith("segment: 2/2 tiles (100%)")
    assert err.splitlines()[-1].endswith(", done")


def test_verbose_and_quiet_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["-v", "-q", "info", "x"])
    assert exit_.value.code == 2


@pytest.mark.parametrize("how", [["-m", "segpipe.cli"], None])
def test_a_missing_image_in_a_real_process(how, random_checkpoint, tmp_path):
    """The installed command and ``python -m segpipe.cli``: exit 2, one line, no traceback."""
    command = [sys.executable, *how] if how else [str(Path(sys.executable).parent / "segpipe")]
    missing = tmp_path / "no-such-slide.tif"
    run = subprocess.run(
        [
            *command,
            "segment",
            str(missing),
            str(tmp_path / "r.zarr"),
            "--model",
            str(random_checkpoint),
            "--scheduler",
            "sync",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("segpipe segment: error:")
    assert "no-such-slide.tif" in line
    assert run.stdout == ""
    assert not (tmp_path / "r.zarr").exists()


# -- conventions, generated from the parser: the same thing has the same flag everywhere ------


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    from segpipe.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _options(command: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options a person sees: not -h, not the hidden old spellings."""
    return [
        a
        for a in command._actions
        if a.option_strings and a.help != argparse.SUPPRESS and a.dest != "help"
    ]


# Options of one name whose defaults differ on purpose.
DIFFERENT_DEFAULTS = {
    "model": "train builds an architecture (unet); the others segment with a trained model",
    "batch_size": "training patches per step, or inference tiles per forward pass",
    "level": "segment's level is a setting (none: level 0); query/export read level 0",
}


def test_the_parser_has_every_command_the_tests_know():
    assert set(_subcommands()) == set(COMMANDS)


def test_an_option_has_one_shape_in_every_command():
    seen: dict[str, tuple[str, argparse.Action]] = {}
    for name, command in _subcommands().items():
        for action in _options(command):
            if action.dest not in seen:
                seen[action.dest] = (name, action)
                continue
            first_name, first = seen[action.dest]
            where = f"{action.dest}: {first_name} vs {name}"
            assert action.option_strings == first.option_strings, where
            assert (action.type, action.metavar, action.nargs) == (
                first.type,
                first.metavar,
                first.nargs,
            ), where
            assert type(action) is type(first) and action.choices == first.choices, where
            if action.dest not in DIFFERENT_DEFAULTS:
                assert action.default == first.default, where


def test_a_flag_means_one_thing_in_every_command():
    dests: dict[str, set[str]] = {}
    for command in _subcommands().values():
        for action in command._actions:  # the hidden old spellings too
            for flag in action.option_strings:
                dests.setdefault(flag, set()).add(action.dest)
    assert {f: d for f, d in dests.items() if len(d) > 1} == {}


@pytest.mark.parametrize("name", COMMANDS)
def test_inputs_and_outputs_are_positional_and_every_argument_is_explained(name):
    command = _subcommands()[name]
    for action in command._actions:
        if action.dest == "help" or action.help == argparse.SUPPRESS:
            continue
        assert action.help, f"{name} {action.dest} has no help"
        if not action.option_strings:
            assert action.metavar and action.metavar.isupper(), f"{name} {action.dest}"
            continue
        assert not action.required, f"{name} {'/'.join(action.option_strings)}: make it positional"
        takes_value = action.nargs != 0 and not isinstance(
            action, argparse._StoreTrueAction | argparse.BooleanOptionalAction
        )
        if takes_value and action.choices is None:
            # argparse would print the dest in capitals (PIXEL_SIZE_UM): a leak
            assert action.metavar is not None, f"{name} {action.option_strings}: no metavar"
            metavars = action.metavar if isinstance(action.metavar, tuple) else (action.metavar,)
            assert all("_" not in m for m in metavars), f"{name} {action.metavar}"


def test_every_hidden_option_is_an_old_spelling_that_says_what_to_write():
    from segpipe.cli.text import DeprecatedAlias

    for name, command in _subcommands().items():
        for action in command._actions:
            if action.option_strings and action.help == argparse.SUPPRESS:
                assert isinstance(action, DeprecatedAlias), f"{name} {action.option_strings}"


def test_evaluate_tiles_as_segment_does():
    from segpipe.config import SegmentConfig

    (tile,) = [a for a in _options(_subcommands()["evaluate"]) if a.dest == "tile"]
    assert tile.default == SegmentConfig().tile == 512


def test_export_formats_are_the_ngff_versions_and_geojson():
    from segpipe.analysis.ngff import NGFF_VERSIONS
    from segpipe.cli.results import EXPORT_FORMATS

    assert set(EXPORT_FORMATS) == {"geojson", *(f"ngff-{v}" for v in NGFF_VERSIONS)}


def test_train_takes_model_and_the_old_architecture(capsys):
    from segpipe.cli import build_parser

    args = build_parser().parse_args(["train", "x.pt", "--architecture", "fcn"])
    assert args.model == "fcn"
    assert "--architecture is deprecated; use --model" in capsys.readouterr().err
    assert build_parser().parse_args(["train", "x.pt"]).model == "unet"
    assert build_parser().parse_args(["train", "x.pt", "--model", "fcn"]).model == "fcn"


@pytest.mark.integration
def test_archive_fail_on_error_exits_1_with_the_table_not_a_traceback(
    prefect_harness, random_checkpoint, tmp_path, capsys
):
    from segpipe.synthetic.demo import make_demo_slide

    archive = tmp_path / "archive"
    make_demo_slide(archive, size=128, seed=1)
    for truth in archive.glob("*.truth.zarr"):
        shutil.rmtree(truth)
    (archive / "broken.tif").write_bytes(b"II*\x00 not a tiff")
    out = tmp_path / "results"
    args = ["archive", str(archive), str(out), "--model", str(random_checkpoint)]
    args += ["--scheduler", "sync", "--tile", "64", "--fail-on-error"]
    assert main(args) == 1
    printed = capsys.readouterr().out
    assert "1 segmented" in printed and "failed: broken.tif" in printed, printed


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--lock-ttl", "0"], "--lock-ttl must be > 0 seconds, got 0.0"),
        (["--max-concurrent", "0"], "--max-concurrent must be >= 1, got 0"),
        (["--retries", "-1"], "--retries must be >= 0, got -1"),
        (["--retry-delay", "-5"], "--retry-delay must be >= 0 seconds, got -5.0"),
        (["--min-age", "-5"], "--min-age must be >= 0 seconds, got -5.0"),
    ],
)
@pytest.mark.parametrize("command", ["archive", "serve"])
def test_a_bad_run_option_is_refused_once_naming_it(
    command, option, message, tmp_path, capsys, monkeypatch
):
    """Not one failure per image, nor the flow's parameter name: one line naming the option,
    exit code 2, before Prefect or any image is touched."""
    import segpipe.flows.archive

    ran = []
    monkeypatch.setattr(segpipe.flows.archive, "process_archive", lambda *a, **k: ran.append(a))
    monkeypatch.setattr(segpipe.flows.archive, "serve_archive", lambda *a, **k: ran.append(a))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never reached
    code = main([command, str(tmp_path), str(tmp_path / "out"), *option])
    assert (code, capsys.readouterr().err) == (2, f"segpipe {command}: error: {message}\n")
    assert ran == []


@pytest.mark.parametrize("command", ["archive", "serve"])
def test_archive_and_serve_hand_every_run_option_to_the_flow(
    command, tmp_path, monkeypatch, answering_prefect_url
):
    """Each option a person gives reaches process_archive (or its schedule), none replaced
    by the flow's default (a --min-age dropped segments files still being written)."""
    import segpipe.flows.archive

    calls = []

    def process_archive(source, output_root, model, **parameters):
        calls.append((source, output_root, model, parameters))
        return {"summary": "nothing to do", "failed": {}, "held": {}}

    monkeypatch.setattr(segpipe.flows.archive, "process_archive", process_archive)
    monkeypatch.setattr(segpipe.flows.archive, "serve_archive", process_archive)
    monkeypatch.setenv("PREFECT_API_URL", answering_prefect_url)  # checked, never used
    options = ["--pattern", "*.svs", "--min-age", "120", "--max-concurrent", "3"]
    options += ["--concurrency-limit", "gpu", "--retries", "1", "--retry-delay", "5"]
    options += ["--lock-ttl", "60", "--fail-on-error"]
    assert main([command, str(tmp_path), str(tmp_path / "out"), *options]) == 0
    ((source, output_root, model, parameters),) = calls
    assert (source, output_root, model) == (str(tmp_path), str(tmp_path / "out"), "tissue-unet")
    expected = {
        "pattern": "*.svs", "min_age_s": 120.0, "max_concurrent": 3,
        "concurrency_limit": "gpu", "retries": 1, "retry_delay_s": 5.0, "lock_ttl_s": 60.0,
        "fail_on_error": True,
    }  # fmt: skip
    assert {k: parameters.get(k) for k in expected} == expected


def test_serve_takes_the_prefect_server_from_the_profile_not_only_the_environment(
    tmp_path, capsys, monkeypatch, answering_prefect_url
):
    """`prefect config set PREFECT_API_URL=...` or `prefect cloud login` put the URL in the
    profile, not the environment: serve uses it; with none anywhere it says what to do."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import segpipe.flows.archive

    served = []
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(segpipe.flows.archive, "serve_archive", lambda *a, **k: served.append(a))
    argv = ["serve", str(tmp_path), str(tmp_path / "out")]
    with temporary_settings({PREFECT_API_URL: answering_prefect_url}):  # as a profile sets it
        assert main(argv) == 0
    assert served == [(str(tmp_path), str(tmp_path / "out"), "tissue-unet")]
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(argv) == 2
    assert "a schedule needs a Prefect server" in capsys.readouterr().err
    assert len(served) == 1


@pytest.mark.parametrize("command", ["archive", "serve"])
@pytest.mark.parametrize("where", ["environment", "profile"])
def test_a_prefect_server_that_does_not_answer_is_one_line_and_exit_2(
    command, where, tmp_path, capsys, monkeypatch
):
    """Prefect's first call to it failed in a hundred lines of traceback, exit code 1 (which
    says "done, with failed images")."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import segpipe.flows.archive

    ran = []
    monkeypatch.setattr(segpipe.flows.archive, "process_archive", lambda *a, **k: ran.append(a))
    monkeypatch.setattr(segpipe.flows.archive, "serve_archive", lambda *a, **k: ran.append(a))
    down = "http://127.0.0.1:9/api"  # the discard port: nothing listens
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings({PREFECT_API_URL: down} if where == "profile" else {}):
        if where == "environment":
            monkeypatch.setenv("PREFECT_API_URL", down)
        code = main([command, str(tmp_path), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and ran == []
    assert err.startswith(f"segpipe {command}: error: cannot reach the Prefect server at {down}")
    assert len(err.splitlines()) == 1, err


def test_query_refuses_a_table_without_objects(tmp_path, capsys):
    """The table is the objects' (--objects): without it nothing would be written, silently."""
    code = main(["query", str(tmp_path / "r.zarr"), "--class", "nucleus", "--table", "t.csv"])
    assert code == 2
    assert "--table t.csv writes the object table of --objects; add it" in capsys.readouterr().err


def test_info_on_a_result_at_a_url(small_slide, random_checkpoint, tmp_path, capsys):
    import fsspec

    local = segpipe.segment(
        small_slide.image, tmp_path / "r.seg.zarr", random_checkpoint, tile=64, scheduler="sync"
    )
    fs = fsspec.filesystem("memory")
    fs.put(str(local), "/info-test/r.seg.zarr", recursive=True)
    try:
        assert main(["info", "memory://info-test/r.seg.zarr", "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["summary"]["shape"] == [300, 300]
        assert main(["info", "memory://info-test/r.seg.zarr"]) == 0
        assert "INCOMPLETE" not in capsys.readouterr().out
    finally:
        fs.rm("/info-test", recursive=True)


def test_info_on_a_result_this_release_cannot_read_says_why(
    small_slide, random_checkpoint, tmp_path, capsys
):
    """A result whose metadata cannot be parsed is refused naming it and the field, not
    described as an image (which failed with an unrelated message about dimension names)."""
    import zarr

    out = segpipe.segment(
        small_slide.image, tmp_path / "r.zarr", random_checkpoint, tile=64, scheduler="sync"
    )
    group = zarr.open_group(out, mode="r+")
    group.attrs["segpipe"] = group.attrs["segpipe"] | {"state": "bogus"}
    assert main(["info", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "bogus" in err, err


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_info_on_an_interrupted_result_exits_1(as_json, tmp_path, capsys):
    """2 of 35 tiles written: exit code 1 (done, with failures), so a script that checks
    results by the exit code finds it, in JSON as in text."""
    from segpipe.config import SegmentConfig
    from segpipe.results import ResultMeta, mark_tiles_done, prepare_result

    path = tmp_path / "r.seg.zarr"
    meta = ResultMeta(
        source="s.tif", shape=(40, 56), pixel_size_um=0.5, class_names=("bg", "fg"),
        model_name="m", model_sha256="0" * 64, halo=0,
        config=SegmentConfig(tile=8, mode="exact", level=0, task_tiles=1),
    )  # fmt: skip
    prepare_result(path, meta)  # 5 x 7 tiles of 8 px
    mark_tiles_done(path, {(0, 0): np.zeros(2, np.int64), (2, 3): np.zeros(2, np.int64)})
    assert main(["info", str(path), *(["--json"] if as_json else [])]) == 1
    out = capsys.readouterr().out
    if as_json:
        info = json.loads(out)
        assert (info["complete"], info["tiles_done"], info["tiles_total"]) == (False, 2, 35)
    else:
        assert out.startswith(f"{path}: INCOMPLETE segpipe result, 2/35 tiles written")


def _small_result(tmp_path, **kw):
    from test_query import make_result

    labels = np.zeros((40, 56), np.uint8)
    labels[10:20, 30:40] = 2
    labels[25:35, 5:45] = 1
    path, _ = make_result(tmp_path / "r.seg.zarr", labels, tile=8, task_tiles=1, **kw)
    return path, labels


def test_export_to_ngff_refuses_the_geojson_options(tmp_path, capsys):
    """An NGFF copy is of the whole result: an option of the polygons there would be ignored."""
    path, _ = _small_result(tmp_path)
    out = tmp_path / "copy.zarr"
    for option in (
        ["--class", "nucleus"],
        ["--region", "0", "0", "5", "5"],
        ["--level", "1"],
        ["--coords", "micron"],
        ["--threshold", "0.9"],
        ["--connectivity", "2"],
        ["--min-area", "10"],
        ["--object-type", "annotation"],
    ):
        assert main(["export", str(path), str(out), *option]) == 2, option
        err = capsys.readouterr().err
        assert f"{option[0]} applies to GeoJSON export only" in err, err
        assert len(err.splitlines()) == 1 and not out.exists()
    # Their defaults, spelled out, ask for nothing the copy ignores.
    assert main(["export", str(path), str(out), "--level", "0", "--coords", "pixel"]) == 0


def test_evaluate_refuses_options_it_would_ignore(tmp_path, capsys):
    from PIL import Image

    path, labels = _small_result(tmp_path)
    truth, image = tmp_path / "truth.png", tmp_path / "image.png"
    Image.fromarray(labels).save(truth)
    Image.fromarray(np.zeros((40, 56, 3), np.uint8)).save(image)
    cases = {
        "--object-class needs --instances": (["--object-class", "nucleus"], "(--instances) too"),
        "an IoU above 1": (["--iou-threshold", "7"], "--iou-threshold) must be in (0, 1]"),
        "a negative size": (["--min-size", "-4"], "--min-size) must be 0 or more"),
        "--image with a result": (["--image", str(image)], "already segmented"),
        "--tile with a result": (["--tile", "64"], "--tile is for a model PREDICTION"),
    }
    for why, (option, message) in cases.items():
        assert main(["evaluate", str(path), str(truth), *option]) == 2, why
        assert message in capsys.readouterr().err, why
    typo = tmp_path / "typo.seg.zarr"
    assert main(["evaluate", str(typo), str(truth)]) == 2
    assert f"no such result or checkpoint: {typo}" in capsys.readouterr().err
    assert main(["evaluate", str(path), str(truth), "--json"]) == 0


def test_query_reports_a_class_given_twice_once(tmp_path, capsys):
    path, labels = _small_result(tmp_path)
    argv = ["query", str(path), "--class", "nucleus", "--class", "nucleus", "--json"]
    assert main(argv) == 0
    (nucleus,) = json.loads(capsys.readouterr().out)["classes"]
    assert nucleus["pixels"] == int((labels == 2).sum())
    assert main([*argv[:-1], "--objects", "--json"]) == 0  # still the one class it needs


def test_areas_in_units_segpipe_does_not_know_are_not_rounded_to_zero(tmp_path, capsys):
    """A geographic CRS's pixels are 1e-8 degrees², which one decimal printed as 0.0."""
    path, _ = _small_result(
        tmp_path,
        pixel_size_um=None,
        crs="EPSG:4326",
        transform=(0.0001, 0.0, 10.0, 0.0, -0.0001, 50.0),
    )
    assert main(["query", str(path), "--class", "nucleus"]) == 0
    out = capsys.readouterr().out
    assert "1e-06 deg²" in out and " 0.0 " not in out, out  # was "1e-06 unknown**2"
    assert segpipe.open_result(path)["x"].attrs["units"] == "degree"
    import zarr

    # Made before: its coordinates stored "unknown", which query's areas kept beside deg².
    for dim in ("x", "y"):
        zarr.open_array(path / "0" / dim, mode="r+").attrs["units"] = "unknown"
    assert segpipe.open_result(path)["y"].attrs["units"] == "degree"
    assert segpipe.query.class_areas(path)["area"].attrs["units"] == "degree**2"


@pytest.mark.parametrize(
    ("unit", "units", "shown"),
    [
        ("metre", "metre", "400.0 m²"),
        ("Meter", "metre", "400.0 m²"),  # an ESRI spelling: the unit is its length in metres
        ("unknown", "unknown", "400.0 CRS units²"),
        # segpipe's own word for no georeference: taken, it dropped the CRS's placement
        ("pixel", "unknown", "400.0 CRS units²"),
    ],
)
def test_info_gives_a_local_crs_areas_in_its_unit(tmp_path, capsys, unit, units, shown):
    """rasterio calls a local CRS's unit "unknown" even where its WKT names metres: `info`
    said "400.0 unknown**2" of a site plan in metres, and the archive report "CRS units"."""
    crs = f'LOCAL_CS["plan",LOCAL_DATUM["d",0],UNIT["{unit}",1],AXIS["x",EAST],AXIS["y",NORTH]]'
    path, labels = _small_result(
        tmp_path, pixel_size_um=None, crs=crs, transform=(2.0, 0.0, 0.0, 0.0, -2.0, 80.0)
    )
    assert int((labels == 2).sum()) == 100  # 100 px of 2 x 2 units
    assert main(["info", str(path)]) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if "nucleus" in s)
    assert shown in line, line
    assert segpipe.open_result(path)["x"].attrs["units"] == units
    assert float(segpipe.open_result(path)["y"][0]) == 79.0  # the CRS's, pixel centres


@pytest.mark.parametrize(
    ("epsg", "shown", "key"),
    [(2263, "400.0 US survey ft²", "area_ftUS2"), (2868, "400.0 ft²", "area_ft2")],
)
def test_a_crs_in_feet_gives_areas_in_square_feet_under_one_json_key(
    tmp_path, capsys, epsg, shown, key
):
    """A State Plane CRS in US survey feet: `info` printed "400 US survey foot**2" and
    `query --json` keyed it "area_US survey foot2", a key with spaces in it."""
    path, labels = _small_result(
        tmp_path,
        pixel_size_um=None,
        crs=f"EPSG:{epsg}",
        transform=(2.0, 0.0, 1000.0, 0.0, -2.0, 80000.0),
    )
    assert int((labels == 2).sum()) == 100  # 100 px of 2 x 2 feet
    assert main(["info", str(path)]) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if "nucleus" in s)
    assert shown in line, line
    assert main(["query", str(path), "--class", "nucleus", "--json"]) == 0
    (nucleus,) = json.loads(capsys.readouterr().out)["classes"]
    assert nucleus[key] == 400.0


def test_query_at_a_coarser_level_without_a_pixel_size_says_its_area_is_of_level_0(
    tmp_path, capsys
):
    """The area of a result without microns is in pixels of level 0 at any level: both it
    and the level's pixel count were "px" (3,552 px beside 888 px at level 1)."""
    from test_query import make_result

    labels = np.zeros((32, 48), np.uint8)
    labels[8:24, 8:40] = 2
    path, _ = make_result(tmp_path / "r.zarr", labels, pixel_size_um=None)
    assert main(["query", str(path), "--class", "nucleus", "--level", "1"]) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if "nucleus" in s)
    assert "512 level-0 px²  (128 px)" in line  # 16 x 32 px at level 0, 8 x 16 at level 1
    assert main(["query", str(path), "--class", "nucleus", "--level", "1", "--json"]) == 0
    (nucleus,) = json.loads(capsys.readouterr().out)["classes"]
    assert (nucleus["area_px"], nucleus["pixels"]) == (512, 128)


def test_train_depth_is_the_down_sampling_steps_of_fcn_updown(tmp_path, capsys):
    """fcn-updown calls them levels: --depth, whose help says "down-sampling steps", was
    refused with a list of its settings."""
    from segpipe import models

    ckpt = tmp_path / "updown.pt"
    tiny = ["--steps", "1", "--slide-size", "64", "--num-slides", "1", "--val-size", "64"]
    tiny += ["--batch-size", "1", "--patch", "16", "--width", "4"]
    assert main(["train", str(ckpt), "--model", "fcn-updown", "--depth", "2", *tiny]) == 0
    capsys.readouterr()
    assert models.load(ckpt).config.levels == 2


def test_train_of_a_network_too_large_is_one_line(tmp_path, capsys):
    """--depth 12 ended in a torch allocator traceback (exit 1) or the OOM killer (137)."""
    code = main(["train", str(tmp_path / "m.pt"), "--depth", "12", "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "parameters" in err and "give a smaller width or depth" in err
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.skipif(
    Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1"
    if Path("/proc/sys/vm/overcommit_memory").exists()
    else True,
    reason="the kernel must refuse a 3 TB allocation outright (it does unless it overcommits)",
)
def test_train_with_a_patch_too_large_for_memory_is_one_line(tmp_path, capsys):
    """--patch 1000000 ended in numpy's traceback naming only an array shape."""
    tiny = ["--steps", "1", "--slide-size", "64", "--num-slides", "1", "--val-size", "64"]
    tiny += ["--batch-size", "2", "--patch", "1000000", "--width", "4", "--depth", "1"]
    code = main(["train", str(tmp_path / "m.pt"), *tiny, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "batch of 2 (--batch-size) patches of 1000000 px (--patch" in err
    assert "does not fit in memory" in err and "lower --patch or --batch-size" in err
    assert not (tmp_path / "m.pt").exists()


def test_a_full_disk_names_the_result_being_written(small_slide, tmp_path, capsys, monkeypatch):
    """A failed write() names no file: "error: [Errno 28] No space left on device", while the
    output, the image and Prefect's home may each lie on another disk."""
    import errno

    from segpipe.results import store

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store, "write_together", full)
    out = tmp_path / "r.zarr"
    code = main(["segment", str(small_slide.image), str(out), "--scheduler", "sync"])
    err = capsys.readouterr().err
    assert code != 0
    assert f"error: {out}: No space left on device" in err
    assert not is_complete(out)


@pytest.mark.parametrize("command", ["archive", "serve"])
@pytest.mark.parametrize("source", ["missing", "a-file"])
def test_an_archive_source_that_is_no_folder_is_one_line_before_prefect_starts(
    command, source, tmp_path, capsys
):
    """archive printed Prefect's three ERROR lines first and called a file "no such folder";
    serve registered its schedule and waited, to fail at its first run."""
    (tmp_path / "a-file").write_text("a slide, not a folder")
    code = main([command, str(tmp_path / source), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    what = "no such folder" if source == "missing" else "is a file, not a folder"
    assert err.strip() == f"segpipe {command}: error: archive {tmp_path / source}: {what}"
    assert not (tmp_path / "out").exists()
    # an output root that is a file: refused as early (it reached Prefect, failed in the flow)
    (tmp_path / "slides").mkdir()
    assert main([command, str(tmp_path / "slides"), str(tmp_path / "a-file")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"segpipe {command}: error: output root {tmp_path / 'a-file'}: is a file, not a folder"
    )


def test_ctrl_c_while_the_libraries_import_says_interrupted(monkeypatch, capsys):
    """Ctrl-C in a command's first seconds (torch importing) printed Python's traceback."""
    import segpipe.cli as cli

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_freeze_imports", interrupted)
    monkeypatch.setattr(cli.gc, "get_freeze_count", lambda: 0)  # so that it freezes
    assert cli._run(["segment", "in.tif", "out.zarr"], own_process=True) == 130
    assert capsys.readouterr().err == "segpipe segment: interrupted\n"
    with pytest.raises(KeyboardInterrupt):  # main() in a notebook: the caller's to handle
        cli._run(["segment", "in.tif", "out.zarr"], own_process=False)


def test_an_object_store_without_credentials_is_a_user_error_naming_the_url(monkeypatch, capsys):
    """botocore's NoCredentialsError is no OSError: it ended in an 80-line traceback, exit 1,
    naming no URL."""
    s3fs = pytest.importorskip("s3fs")
    for name in [k for k in os.environ if k.startswith("AWS")]:
        monkeypatch.delenv(name)
    for name, value in {
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",  # nothing listens: nothing leaves the machine
    }.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()  # another test's, holding its credentials
    assert main(["--no-progress", "info", "s3://some-bucket/slide.ome.zarr"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "segpipe info: error: s3://some-bucket/slide.ome.zarr: NoCredentialsError: "
        "Unable to locate credentials"
    )


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
        (["--sigma", "-1", "--loss-weights", "unet"], "--sigma finite and > 0, got 10.0, -1.0"),
        (["--elastic-std", "1000"], "--elastic-std must be in [0, --patch], --jitter in [0, 1)"),
        (["--pixel-size", "0"], "--pixel-size must be > 0, got 0.0"),
    ],
)
def test_train_names_the_option_it_refuses(tmp_path, capsys, options, says):
    """The shell's user typed --sigma; the message named TrainConfig.sigma_px."""
    code = main(["train", str(tmp_path / "m.pt"), *options, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and says in err and "TrainConfig." not in err, err
    assert not (tmp_path / "m.pt").exists()


def test_train_resume_from_a_missing_checkpoint_says_it_is_missing(tmp_path, capsys):
    """--resume nope.pt said its optimiser state nope.state.pt was missing."""
    nope = tmp_path / "nope.pt"
    code = main(["train", str(tmp_path / "m.pt"), "--resume", str(nope), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot resume from {nope}: no such file" in err, err
    assert "state" not in err
