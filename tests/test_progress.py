"""Stages announced by library code, and the listeners that show them: plain lines, terminal
bars, Prefect progress artifacts. Listeners are fed made-up events; the library's stages are
checked against counts computed here from the shapes."""

import io
import logging
import math
import re

import pytest

import segpipe
from segpipe import progress
from segpipe.progress import Event, PlainLines, TerminalBars, describe, reporting, stage


def _event(kind, done, total=40, *, stage_id=1, elapsed=4.0, ok=True, name="segment"):
    return Event(kind, name, done, total, "tile", elapsed, ok=ok, stage_id=stage_id)


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize(
    ("event", "line"),
    [
        (_event("start", 0, elapsed=0.0), "segment: 0/40 tiles (0%) 0.0 s"),
        (_event("advance", 10), "segment: 10/40 tiles (25%) 4.0 s, about 12.0 s left"),
        (_event("end", 40), "segment: 40/40 tiles (100%) 4.0 s, done"),
        (_event("end", 12, ok=False), "segment: 12/40 tiles (30%) 4.0 s, stopped"),
        (_event("advance", 1, total=1), "segment: 1/1 tile (100%) 4.0 s"),
        (_event("advance", 3, total=None), "segment: 3 tiles 4.0 s"),
        (_event("end", 0, total=0), "segment: 0/0 tiles (100%) 4.0 s, done"),
    ],
)
def test_describe(event, line):
    assert describe(event) == line


def test_plain_lines_at_start_end_and_at_most_every_few_seconds():
    out, clock = io.StringIO(), _Clock()
    lines = PlainLines(out, every_s=5.0, clock=clock)
    lines(_event("start", 0))
    for done, now in [(1, 1.0), (2, 4.9), (3, 5.0), (4, 6.0), (5, 10.5)]:
        clock.now = now
        lines(_event("advance", done))
    clock.now = 10.6
    lines(_event("end", 40))
    printed = [re.match(r"segment: (\d+)/40", x).group(1) for x in out.getvalue().splitlines()]
    assert printed == ["0", "3", "5", "40"]


def test_plain_lines_keep_concurrent_stages_apart():
    out, clock = io.StringIO(), _Clock()
    lines = PlainLines(out, every_s=5.0, clock=clock)
    lines(_event("start", 0, stage_id=1))
    clock.now = 4.0
    lines(_event("start", 0, stage_id=2))
    clock.now = 6.0
    lines(_event("advance", 7, stage_id=1))  # 6 s after its own line
    lines(_event("advance", 8, stage_id=2))  # 2 s after its own line: not yet
    assert [x.split(" ")[1] for x in out.getvalue().splitlines()] == ["0/40", "0/40", "7/40"]


def test_terminal_bars_one_per_stage():
    out = io.StringIO()
    bars = TerminalBars(out)
    bars(_event("start", 0, stage_id=1))
    bars(Event("start", "pyramid", 0, 3, "level", 0.0, stage_id=2))
    bars(_event("advance", 40, stage_id=1))
    bars(_event("end", 40, stage_id=1))
    bars(Event("end", "pyramid", 1, 3, "level", 0.5, ok=False, stage_id=2))
    text = out.getvalue()
    assert "segment: 100%" in text and "40/40" in text
    assert "pyramid:" in text and "1/3" in text and "stopped" in text
    assert not bars._bars, "every bar closed"
    bars(_event("advance", 3, stage_id=9))  # a stage started before the listener: ignored


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_console_is_bars_on_a_terminal_and_lines_elsewhere():
    assert isinstance(progress.console(_Stream(True)), TerminalBars)
    assert isinstance(progress.console(_Stream(False)), PlainLines)
    assert isinstance(progress.console(object()), PlainLines)  # no isatty at all


def test_a_stage_left_by_an_error_ends_not_ok():
    events = []

    def fail_after_one_tile():
        with stage("segment", 4, "tile") as s:
            s.advance()
            raise KeyError("boom")

    with reporting(events.append), pytest.raises(KeyError):
        fail_after_one_tile()
    assert [(e.kind, e.done, e.ok) for e in events] == [
        ("start", 0, True),
        ("advance", 1, True),
        ("end", 1, False),
    ]


def test_stages_without_a_listener_cost_nothing_visible(capsys):
    with stage("segment", 2, "tile") as s:
        s.advance(2)
    assert s.done == 2
    assert capsys.readouterr() == ("", "")


def test_also_reporting_keeps_the_installed_listener():
    outer, inner = [], []
    with reporting(outer.append), progress.also_reporting(inner.append), stage("x", 1) as s:
        s.advance()
    assert [e.kind for e in outer] == [e.kind for e in inner] == ["start", "advance", "end"]
    with progress.also_reporting(inner.append), stage("y", 1):  # nothing installed before
        pass
    assert [e.stage for e in inner][-2:] == ["y", "y"]


def test_showing_installs_a_console_only_when_asked_and_none_is_there():
    out, mine = _Stream(False), []
    with progress.showing(True, out), stage("ingest", 1, "chunk") as s:
        s.advance()
    assert out.getvalue().splitlines()[-1].startswith("ingest: 1/1 chunk (100%)")
    with reporting(mine.append), progress.showing(True, out), stage("segment", 1):
        pass
    assert [e.stage for e in mine] == ["segment", "segment"], "the installed one keeps them"
    with progress.showing(False, out), stage("pyramid", 1):
        pass
    assert "pyramid" not in out.getvalue()


def test_stage_ids_tell_concurrent_stages_apart():
    events = []
    with reporting(events.append), stage("segment", 1) as a, stage("segment", 1) as b:
        a.advance()
        b.advance()
    assert len({e.stage_id for e in events}) == 2


# -- stages of the library ------------------------------------------------------------------


def test_ingest_counts_every_chunk_of_every_level_and_prints_no_dask_bar(small_slide, capfd):
    from segpipe.geometry.pixels import pyramid_shapes

    events = []
    with reporting(events.append):
        segpipe.ingest(small_slide.image, small_slide.image.parent / "i.zarr", chunk=64)
    shapes = pyramid_shapes((300, 300), 256)  # ingest's default min_level_size
    chunks = sum(math.ceil(y / 64) * math.ceil(x / 64) for y, x in shapes)
    assert {e.stage for e in events} == {"ingest"}
    assert (events[0].kind, events[0].total, events[0].unit) == ("start", chunks, "chunk")
    assert (events[-1].kind, events[-1].done, events[-1].ok) == ("end", chunks, True)
    dones = [e.done for e in events]
    assert dones == sorted(dones)

    segpipe.ingest(small_slide.image, small_slide.image.parent / "j.zarr", progress=True)
    err = capfd.readouterr().err
    assert "ingest: 0/" in err and ", done" in err
    assert "[#" not in err and "Completed" not in err, "no Dask progress bar"


def test_segment_announces_its_tiles_and_keeps_on_progress(
    small_slide, random_checkpoint, tmp_path
):
    events, calls = [], []
    with reporting(events.append):
        segpipe.segment(
            small_slide.image,
            tmp_path / "r.zarr",
            random_checkpoint,
            tile=64,
            task_tiles=2,
            min_level_size=32,  # levels 300, 150 (written by the tasks), 75 and 37 px
            scheduler="sync",
            on_progress=lambda done, total: calls.append((done, total)),
        )
    from segpipe.analysis.summary import summarise

    # The tiles computed: the grid's ceil(300 / 64)^2 = 25, less any a tissue mask skipped.
    tiles = summarise(tmp_path / "r.zarr").as_dict()["tiles_computed"]
    assert 0 < tiles <= math.ceil(300 / 64) ** 2
    seg = [e for e in events if e.stage == "segment"]
    assert (seg[0].kind, seg[0].total, seg[0].unit) == ("start", tiles, "tile")
    assert (seg[-1].kind, seg[-1].done) == ("end", tiles)
    assert calls == [(e.done, tiles) for e in seg if e.kind == "advance"]
    assert calls[-1] == (tiles, tiles)
    pyramid = [e for e in events if e.stage == "pyramid"]
    assert (pyramid[0].kind, pyramid[0].total, pyramid[-1].done) == ("start", 2, 2)

    events.clear()
    with reporting(events.append):  # complete: nothing to compute, no segment stage
        segpipe.segment(
            small_slide.image, tmp_path / "r.zarr", random_checkpoint, tile=64, task_tiles=2,
            min_level_size=32, scheduler="sync",
        )  # fmt: skip
    assert "segment" not in {e.stage for e in events}


# -- Prefect progress artifacts --------------------------------------------------------------


class _Log:
    def __init__(self):
        self.lines = []

    def info(self, fmt, *args):
        self.lines.append(fmt % args)


@pytest.fixture
def fake_artifacts(monkeypatch):
    import uuid

    import prefect.artifacts

    calls = []

    def create(progress, key=None, description=None):
        calls.append(("create", progress, key, description))
        return uuid.UUID(int=len(calls))

    def update(artifact_id, progress, description=None):
        calls.append(("update", progress, artifact_id, description))

    monkeypatch.setattr(prefect.artifacts, "create_progress_artifact", create)
    monkeypatch.setattr(prefect.artifacts, "update_progress_artifact", update)
    return calls


def test_progress_artifacts_follow_a_stage(fake_artifacts):
    from segpipe.flows.progress import ProgressArtifacts, artifact_key

    log = _Log()
    listener = ProgressArtifacts("/data/out.zarr", every_percent=10.0, logger=log)
    listener(_event("start", 0, total=200))
    for done in range(1, 201):
        listener(_event("advance", done, total=200))
    listener(_event("end", 200, total=200))

    create, *updates = fake_artifacts
    assert create[:3] == ("create", 0.0, artifact_key("segment", "/data/out.zarr"))
    assert "/data/out.zarr" in create[3]
    percents = [u[1] for u in updates]
    assert percents == [10.0 * k for k in range(1, 11)] + [100.0]  # every tenth, and the end
    assert {u[2] for u in updates} == {create_id(1)}
    assert updates[-1][3].startswith("segment: 200/200 tiles (100%)")
    assert [x.split(" ")[1] for x in log.lines] == [f"{20 * k}/200" for k in range(11)] + [
        "200/200"
    ]


def create_id(n):
    import uuid

    return uuid.UUID(int=n)


def test_progress_artifacts_never_fail_the_work(monkeypatch, caplog):
    import prefect.artifacts

    from segpipe.flows.progress import ProgressArtifacts

    def broken(*args, **kwargs):
        raise ConnectionError("server went away")

    monkeypatch.setattr(prefect.artifacts, "create_progress_artifact", broken)
    # Its own level: a CLI test before, in this process, may have left the root's at ERROR.
    caplog.set_level(logging.WARNING, logger="segpipe")
    monkeypatch.setattr(logging.getLogger("segpipe"), "propagate", True)
    listener = ProgressArtifacts("out", logger=_Log())
    listener(_event("start", 0))
    listener(_event("advance", 20))
    listener(_event("end", 40))
    assert "server went away" in caplog.text
    assert caplog.text.count("no more Prefect progress artifacts") == 1


def test_progress_artifacts_never_pass_100_percent(fake_artifacts):
    """A stage that counts more units than it announced (a tile counted twice on a retry)
    still shows 100%, not 120%."""
    from segpipe.flows.progress import ProgressArtifacts

    listener = ProgressArtifacts("out", logger=_Log())
    for event in (_event("start", 0, total=10), _event("advance", 12, total=10)):
        listener(event)
    listener(_event("end", 12, total=10))
    shown = [c[:2] for c in fake_artifacts]
    assert shown == [("create", 0.0), ("update", 100.0), ("update", 100.0)]


@pytest.mark.parametrize("failing", ["create", "update"])
def test_a_failing_artifact_api_is_tried_once_and_warned_about_once(
    failing, fake_artifacts, monkeypatch, caplog
):
    """After a failed call (a server that went away) no stage calls the API again: not
    each new stage's create, nor each advance's update, each waiting on a dead server."""
    import prefect.artifacts

    from segpipe.flows.progress import ProgressArtifacts

    tried = []

    def broken(*args, **kwargs):
        tried.append(args)
        raise ConnectionError("server went away")

    monkeypatch.setattr(prefect.artifacts, f"{failing}_progress_artifact", broken)
    caplog.set_level(logging.WARNING, logger="segpipe")
    monkeypatch.setattr(logging.getLogger("segpipe"), "propagate", True)
    listener = ProgressArtifacts("out", logger=_Log())
    for stage_id in (1, 2, 3):
        listener(_event("start", 0, stage_id=stage_id))
        for done in (10, 20, 30, 40):
            listener(_event("advance", done, stage_id=stage_id))
        listener(_event("end", 40, stage_id=stage_id))
    assert len(tried) == 1
    assert caplog.text.count("no more Prefect progress artifacts") == 1


@pytest.mark.integration
def test_segment_slide_leaves_progress_artifacts(
    prefect_harness, small_slide, random_checkpoint, tmp_path
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from segpipe.config import SegmentConfig
    from segpipe.flows.progress import artifact_key
    from segpipe.flows.segment_slide import default_image_store, segment_slide

    out = str(tmp_path / "s.seg.zarr")
    segment_slide(
        str(small_slide.image),
        out,
        str(random_checkpoint),
        SegmentConfig(tile=64, scheduler="sync"),
    )
    # This 300 px result has one level: its pyramid stage has nothing to count, no artifact.
    keys = [artifact_key("segment", out), artifact_key("ingest", str(default_image_store(out)))]
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys))
        )
    assert sorted(a.key for a in found) == sorted(keys)
    assert all(a.type == "progress" and float(a.data) == 100.0 for a in found)


def test_progress_artifacts_can_keep_to_some_stages(fake_artifacts):
    from segpipe.flows.progress import ProgressArtifacts

    listener = ProgressArtifacts("root", logger=_Log(), stages=("archive",))
    listener(_event("start", 0, name="segment"))
    listener(_event("start", 0, name="archive"))
    assert [c[0] for c in fake_artifacts] == ["create"]


@pytest.mark.integration
def test_an_archive_run_counts_its_images_in_a_progress_artifact(
    prefect_harness, random_checkpoint, tmp_path
):
    import shutil

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from segpipe.config import SegmentConfig
    from segpipe.flows.archive import process_archive
    from segpipe.flows.progress import artifact_key
    from segpipe.synthetic.demo import make_demo_slide

    source = tmp_path / "archive"
    for seed in (1, 2):
        make_demo_slide(source, size=128, seed=seed)
    for truth in source.glob("*.truth.zarr"):
        shutil.rmtree(truth)
    out = tmp_path / "out"
    events = []
    with reporting(events.append):
        process_archive(
            str(source), str(out), str(random_checkpoint), SegmentConfig(tile=64, scheduler="sync")
        )
    run = [(e.kind, e.done, e.total) for e in events if e.stage == "archive"]
    assert run == [("start", 0, 2), ("advance", 1, 2), ("advance", 2, 2), ("end", 2, 2)]
    assert sum(e.kind == "start" and e.stage == "segment" for e in events) == 2

    key = artifact_key("archive", "progress", str(out.absolute()))
    with get_client(sync_client=True) as client:
        (found,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    assert found.type == "progress" and float(found.data) == 100.0


@pytest.mark.parametrize("kind", ["report", "archive", "segment"])
def test_an_artifact_key_keeps_its_kind_and_tells_images_apart_however_long_their_paths(kind):
    """The Artifacts page is searched by the key's start (``report-``); a long output root or
    image key must not push it out, and keys stay within Prefect's rules."""
    from segpipe.flows.progress import artifact_key

    root = "/mnt/lab-shared/pathology/segpipe-results/" + "deep/" * 20
    keys = [artifact_key(kind, root, f"2024/scanner-2/day-14/slide-{i:05d}.svs") for i in (1, 2)]
    for key in keys:
        assert key.startswith(f"{kind}-") and len(key) <= 71, key
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", key), key
        assert "slide-0000" in key  # the end of the image key, the part that differs
    assert keys[0] != keys[1]
    assert artifact_key(kind, root, "a.svs") == artifact_key(kind, root, "a.svs")
