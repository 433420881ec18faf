"""Faults caused on purpose: a run killed with SIGKILL at every named transition of a result's
life and at random instants, then run again, finishes complete and bit-identical to a run that
was never interrupted, recomputing only the blocks that were not recorded as done."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import zarr

import segpipe
from segpipe.execution.cluster import plan_for_device
from segpipe.faults import FAULT_POINTS, InjectedFault, fault_point
from segpipe.results import RunSummary, is_complete, read_meta, tiles_done

pytestmark = [pytest.mark.slow]

# 300 x 300 px in 32 px tiles, one tile per task: 100 blocks, each a shard of its own.
SETTINGS = {"tile": 32, "task_tiles": 1, "probability_dtype": "float32", "min_level_size": 64}
SETTINGS["foreground"] = "none"  # every tile a block of its own (masks: test_foreground.py)
RANDOM_KILLS = 3


def _run(
    source: Path,
    output: Path,
    model: Path,
    fault: str | None = None,
    skip: int = 0,
    settings: dict | None = None,
):
    """``segpipe.segment`` in a fresh process (optionally with a fault armed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGPIPE_FAULT")}
    if fault:
        env |= {"SEGPIPE_FAULT": fault, "SEGPIPE_FAULT_SKIP": str(skip)}
    code = (
        "import segpipe, sys; "
        f"segpipe.segment({str(source)!r}, {str(output)!r}, {str(model)!r}, "
        f"scheduler='sync', **{settings or SETTINGS!r})"
    )
    return subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)


def _arrays(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every array of the store, walked, as dtype, shape and raw bytes (bit-identity, not
    closeness): each level's mask and probabilities, coordinates and class names, the label
    image, and the per-tile class counts the summary is summed from. Not ``tiles_done``, the
    runs' bookkeeping (a complete result reads as all done whatever its flags)."""
    out = {}
    for name, node in zarr.open_group(path, mode="r").members(max_depth=None):
        if isinstance(node, zarr.Array) and name != "_segpipe/tiles_done":
            a = np.asarray(node[...])
            raw = repr(a.tolist()).encode() if a.dtype.kind in "OTU" else a.tobytes()
            out[name] = (str(a.dtype), a.shape, raw)
    return out


# The summary's figures that depend on the result alone, not on the runs that made it.
_RESULT_FIGURES = (
    "tiles_total",
    "tiles_computed",
    "tiles_background",
    "foreground_pixels",
    "class_pixels",
)


def _figures(summary: RunSummary) -> dict:
    return {k: getattr(summary, k) for k in _RESULT_FIGURES}


def _recorded(path: Path) -> int | None:
    """How many tiles a running run has recorded: 0 before its store exists, None while the
    record is being rewritten (read again)."""
    try:
        record = zarr.open_array(path / "_segpipe" / "tiles_done", mode="r")
        return int(np.asarray(record[...]).sum())
    except FileNotFoundError:
        return 0
    except Exception:  # a chunk caught mid-write
        return None


class Reference(NamedTuple):
    arrays: dict[str, tuple[str, tuple[int, ...], bytes]]
    summary: RunSummary
    tiles_seconds: float  # from the first tile recorded to the last, as seen from outside


@pytest.fixture(scope="module")
def reference(small_slide, random_checkpoint, tmp_path_factory) -> Reference:
    """An uninterrupted run: its arrays, its summary, and how long its tiles took (watched
    from here, as the random kills time themselves)."""
    out = tmp_path_factory.mktemp("ref") / "ref.seg.zarr"
    proc = _run(small_slide.image, out, random_checkpoint)
    first = last = None
    while proc.poll() is None:
        done, now = _recorded(out), time.perf_counter()
        if done and first is None:
            first = now
        if done == 100 and last is None:
            last = now
        time.sleep(0.01)
    assert proc.wait() == 0, proc.stderr.read().decode() if proc.stderr else ""
    assert is_complete(out)
    assert first is not None and last is not None, "the tiles were never seen being recorded"
    return Reference(_arrays(out), read_meta(out).summary, last - first)


def _finish_and_compare(out: Path, source: Path, model: Path, reference: Reference) -> None:
    """Run again to the end: only what was not recorded is computed, and every array and the
    summary's figures of the result equal an uninterrupted run's."""
    done_before = int(tiles_done(out).sum()) if out.exists() else 0
    complete_before = is_complete(out)
    summary_before = read_meta(out).summary if complete_before else None
    segpipe.segment(source, out, model, scheduler="sync", **SETTINGS)
    meta = read_meta(out)
    assert meta.complete and meta.summary is not None
    if complete_before:  # the kill came after the end: nothing to redo, nothing redone
        assert meta.summary == summary_before
    else:  # only what was not recorded as done is computed again; the summary counts all
        assert meta.summary.tiles_computed == meta.summary.tiles_total
        assert meta.summary.tiles_skipped == done_before
    assert _figures(meta.summary) == _figures(reference.summary)
    got = _arrays(out)
    assert got.keys() == reference.arrays.keys()
    differing = [k for k in reference.arrays if got[k] != reference.arrays[k]]
    assert not differing, f"not bit-identical to an uninterrupted run: {differing}"
    segpipe.open_result(out)  # opens as a complete result (consolidated metadata present)


# A block point is passed once per block: kill after a few blocks, not at the first.
_SKIPS = {"block.written": 7, "block.recording": 7, "block.recorded": 7}


# Passed only when a result is replaced: its own test below.
_RUN_POINTS = [p for p in FAULT_POINTS if p != "result.deleting"]


@pytest.mark.parametrize("point", _RUN_POINTS)
def test_kill_at_each_transition_then_rerun_is_bit_identical(
    point, small_slide, random_checkpoint, reference, tmp_path
):
    out = tmp_path / "r.seg.zarr"
    proc = _run(small_slide.image, out, random_checkpoint, point, _SKIPS.get(point, 0))
    assert proc.wait() == -signal.SIGKILL, "the armed fault point was never reached"
    assert not is_complete(out)
    if point == "result.skeleton":
        assert not out.exists(), "a half-built store must never sit at the output path"
    else:  # the state the kill left, as a reader sees it
        finalising = point in ("result.pyramid", "result.consolidated")
        assert read_meta(out).state == ("finalising" if finalising else "computing")
    if point in ("block.recording", "block.recorded"):
        # The driver records blocks one at a time (one tile per block here): a kill right
        # after the 8th record loses nothing.
        assert int(tiles_done(out).sum()) == _SKIPS[point] + 1
    elif point == "block.written":
        # A kill right after the 8th block's write loses that block and any other of the
        # blocks in flight (at most the run's I/O threads) written but not yet recorded.
        in_flight = plan_for_device("cpu").threads_per_worker
        assert _SKIPS[point] + 1 - in_flight <= int(tiles_done(out).sum()) <= _SKIPS[point]
    _finish_and_compare(out, small_slide.image, random_checkpoint, reference)


@pytest.mark.parametrize(("action", "signum"), [("term", signal.SIGTERM), ("int", signal.SIGINT)])
def test_sigterm_ends_the_segpipe_command_cleanly_and_the_rerun_is_bit_identical(
    small_slide, random_checkpoint, reference, tmp_path, action, signum
):
    """A service manager's stop (SIGTERM) ends the ``segpipe`` executable as Ctrl-C would:
    exit code 143 with no traceback, the blocks in flight written and recorded (the run's
    end waits for them: every block written is one the re-run need not compute; a process
    that died at once would leave one written and not recorded), the result resumable to
    the same bits. Ctrl-C (SIGINT) the same, with 130 (it printed Python's traceback)."""
    out = tmp_path / "r.seg.zarr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGPIPE_FAULT")}
    env |= {"SEGPIPE_FAULT": f"block.recorded:{action}", "SEGPIPE_FAULT_SKIP": "7"}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    command = [sys.executable, "-m", "segpipe.cli", "-q", "segment", str(small_slide.image)]
    command += [str(out), f"--model={random_checkpoint}", "--scheduler=sync", *flags]
    # A shell running us in the background (CI's) leaves SIGINT ignored, and Python then
    # installs no Ctrl-C handler: given back as a terminal's foreground job has it.
    run = subprocess.run(
        command,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert run.returncode == 128 + signum, run.stderr[-2000:]
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    assert action == "term" or run.stderr.strip().endswith("segpipe segment: interrupted")
    assert not is_complete(out) and read_meta(out).state == "computing"
    assert 8 <= int(tiles_done(out).sum()) < 100
    written = [f for f in (out / "0" / "probabilities" / "c").rglob("*") if f.is_file()]
    assert int(tiles_done(out).sum()) == len(written), "a block written, not recorded"
    _finish_and_compare(out, small_slide.image, random_checkpoint, reference)


def test_a_blend_task_killed_after_some_of_its_shards_is_redone_whole(
    small_slide, random_checkpoint, tmp_path
):
    """A blend task writes each shard block as soon as it is stitched (here one task joins
    all 100 of them): killed after its 4th write, it has recorded nothing, and the re-run
    computes every tile again and ends bit-identical to a run never interrupted."""
    blend = {**SETTINGS, "mode": "blend", "window": 32}
    ref = tmp_path / "ref.seg.zarr"
    assert _run(small_slide.image, ref, random_checkpoint, settings=blend).wait() == 0
    out = tmp_path / "r.seg.zarr"
    proc = _run(small_slide.image, out, random_checkpoint, "block.written", 3, settings=blend)
    assert proc.wait() == -signal.SIGKILL, "the armed fault point was never reached"
    assert int(tiles_done(out).sum()) == 0
    shards = [f for f in (out / "0" / "probabilities" / "c").rglob("*") if f.is_file()]
    assert 4 <= len(shards) < 100, "the task's first shard blocks were written, not the rest"
    segpipe.segment(small_slide.image, out, random_checkpoint, scheduler="sync", **blend)
    assert read_meta(out).summary.tiles_computed == read_meta(out).summary.tiles_total
    assert _figures(read_meta(out).summary) == _figures(read_meta(ref).summary)
    assert _arrays(out) == _arrays(ref)


def test_a_blend_group_recorded_in_part_is_redone_whole(random_checkpoint, tmp_path):
    """A blend task's record is written one progress chunk (64 x 64 tiles) at a time: killed
    between two, its group was partly done, and the re-run grouped the rest anew; its windows
    rode other batches than an uninterrupted run's (a window's bits depend on its batch on
    this CPU), so the result was not bit-identical. The group is redone whole."""
    import tifffile

    from segpipe.results.layout import PROGRESS_CHUNKS

    source = tmp_path / "wide.tif"
    rng = np.random.default_rng(0)
    tifffile.imwrite(source, rng.integers(0, 256, (64, 67 * 32, 3), dtype=np.uint8))
    blend = {**SETTINGS, "mode": "blend", "threads": 1, "batch_size": 4}
    ref = tmp_path / "ref.seg.zarr"
    assert _run(source, ref, random_checkpoint, settings=blend).wait() == 0
    out = tmp_path / "r.seg.zarr"
    proc = _run(source, out, random_checkpoint, "block.recording", settings=blend)
    assert proc.wait() == -signal.SIGKILL, "the armed fault point was never reached"
    # One task of 2 x 67 tiles; its first progress chunk recorded, not its second.
    done = tiles_done(out)
    assert done[:, : PROGRESS_CHUNKS[1]].all() and not done[:, PROGRESS_CHUNKS[1] :].any()
    segpipe.segment(source, out, random_checkpoint, scheduler="sync", **blend)
    assert _figures(read_meta(out).summary) == _figures(read_meta(ref).summary)
    assert _arrays(out) == _arrays(ref)


def _overwrite(out: Path, source: Path, model: Path, fault: str) -> None:
    """A result of other settings (64 px tiles) at ``out``, then an overwrite in a fresh
    process killed at ``fault``."""
    segpipe.segment(source, out, model, scheduler="sync", **{**SETTINGS, "tile": 64})
    code = (
        "import segpipe; "
        f"segpipe.segment({str(source)!r}, {str(out)!r}, "
        f"{str(model)!r}, scheduler='sync', overwrite=True, **{SETTINGS!r})"
    )
    env = os.environ | {"SEGPIPE_FAULT": fault}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == -signal.SIGKILL


def test_overwrite_killed_mid_delete_leaves_the_old_result_aside_and_recovers(
    small_slide, random_checkpoint, reference, tmp_path
):
    """Killed after the replaced result is renamed aside, before it is deleted: nothing sits
    at the path, the old result whole beside it; the next run removes that leftover and ends
    bit-identical to an uninterrupted run."""
    out = tmp_path / "r.seg.zarr"
    _overwrite(out, small_slide.image, random_checkpoint, "result.deleting")
    assert not out.exists()
    (aside,) = tmp_path.glob(".r.seg.zarr.deleting-*")
    assert read_meta(aside).tile == 64 and is_complete(aside)
    _finish_and_compare(out, small_slide.image, random_checkpoint, reference)
    # beside it, the run lock it was written under (never deleted: segpipe.results.lock)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".r.seg.zarr.lock", "r.seg.zarr"]


def test_overwrite_killed_before_its_skeleton_is_in_place_starts_clean(
    small_slide, random_checkpoint, reference, tmp_path
):
    """Killed right after the new skeleton is built: the old result is already gone, the new
    one not in place; the next run starts clean."""
    out = tmp_path / "r.seg.zarr"
    _overwrite(out, small_slide.image, random_checkpoint, "result.skeleton")
    assert not out.exists()
    assert not list(tmp_path.glob(".r.seg.zarr.deleting-*"))
    _finish_and_compare(out, small_slide.image, random_checkpoint, reference)


def test_kill_at_random_instants_then_rerun_is_bit_identical(
    small_slide, random_checkpoint, reference, tmp_path
):
    """Killed at random instants while its tiles are computed, and each re-run ends
    bit-identical. A kill waits for a random count of recorded tiles, then a random fraction
    of two tiles' time (the reference's pace), so it lands amid any step of a block whatever
    the machine's load: timed from the reference's whole span, a run faster than the
    reference (a quieter machine) ended before its kill. A run that still ends first is drawn
    again, at most twice."""
    rng = random.Random(11)
    per_tile = reference.tiles_seconds / 99  # the span runs from the first tile to the last
    kills, late, amid_tiles = 0, 0, []
    while kills < RANDOM_KILLS:
        out = tmp_path / f"r{kills}-{late}.seg.zarr"
        target = rng.randint(1, 90)
        proc = _run(small_slide.image, out, random_checkpoint)
        deadline = time.monotonic() + 300
        while (_recorded(out) or 0) < target and proc.poll() is None:
            assert time.monotonic() < deadline, f"{target} tiles not recorded in 300 s"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 2.0) * per_tile)
        proc.send_signal(signal.SIGKILL)
        if proc.wait() != -signal.SIGKILL:
            late += 1
            assert late <= 2, "runs ended before their kills: the kills test nothing"
            continue
        kills += 1
        assert not is_complete(out)
        done = int(tiles_done(out).sum())
        assert done > 0
        amid_tiles.append(done < 100)
        _finish_and_compare(out, small_slide.image, random_checkpoint, reference)
    assert sum(amid_tiles) > RANDOM_KILLS // 2, f"kills amid the tiles: {amid_tiles}"


@pytest.mark.parametrize("point", ["result.pyramid", "result.consolidated"])
def test_a_result_finished_by_a_rerun_has_a_clean_runs_summary(
    point, small_slide, random_checkpoint, tmp_path, monkeypatch
):
    """A run that fails after every tile is done (the result left ``finalising``) is finished
    by the next, which computes nothing: its summary still counts the result's tiles as a
    run never interrupted does; the windows are the last run's (none)."""
    settings = {**SETTINGS, "foreground": "tissue"}  # some tiles background, not computed

    def run(out):
        segpipe.segment(small_slide.image, out, random_checkpoint, scheduler="sync", **settings)
        return read_meta(out).summary

    clean = run(tmp_path / "clean.seg.zarr")
    assert clean.tiles_background > 0 and clean.tiles_skipped == 0
    out = tmp_path / "r.seg.zarr"
    monkeypatch.setenv("SEGPIPE_FAULT", f"{point}:raise")
    with pytest.raises(InjectedFault):
        run(out)
    monkeypatch.delenv("SEGPIPE_FAULT")
    assert read_meta(out).state == "finalising"
    s = run(out)
    counts = ("tiles_total", "tiles_computed", "tiles_background", "class_pixels")
    assert [getattr(s, k) for k in counts] == [getattr(clean, k) for k in counts]
    assert (s.tiles_skipped, s.windows) == (s.tiles_computed, 0)


def test_fault_points_raise_when_asked_and_refuse_unknown_names(monkeypatch):
    monkeypatch.setenv("SEGPIPE_FAULT", "result.created:raise")
    fault_point("block.written")  # another point: nothing happens
    with pytest.raises(InjectedFault, match=r"result\.created"):
        fault_point("result.created")
    for wrong in ("no.such.point", "result.created:explode"):
        monkeypatch.setenv("SEGPIPE_FAULT", wrong)
        with pytest.raises(ValueError, match="names no fault point"):
            fault_point("result.created")


# --- the numbered cases that need no kill ---------------------------------------------


def test_overwrite_with_other_settings_in_one_process_writes_the_new_layout(
    small_slide, random_checkpoint, tmp_path
):
    # Case 3: the same process (a notebook, a worker of a shared cluster) writes a result,
    # then overwrites it with another tile size; no handle of the old store may survive.
    out = tmp_path / "r.seg.zarr"
    for tile in (64, 32, 64):
        settings = {**SETTINGS, "tile": tile}
        segpipe.segment(
            small_slide.image, out, random_checkpoint, scheduler="sync", overwrite=True, **settings
        )
        fresh = tmp_path / f"fresh-{tile}.seg.zarr"
        segpipe.segment(small_slide.image, fresh, random_checkpoint, scheduler="sync", **settings)
        assert read_meta(out).tile == tile
        assert _arrays(out) == _arrays(fresh)


def test_overwrite_never_deletes_an_image_or_the_source(small_slide, random_checkpoint, tmp_path):
    # Case 4: an ingested OME-Zarr image at the output path is not a result; nor is the source.
    from segpipe.io.ingest import ingest
    from segpipe.results import ResultMismatchError

    image = ingest(small_slide.image, tmp_path / "slide.ome.zarr", chunk=64)
    before = sorted(p.relative_to(image) for p in image.rglob("*"))
    with pytest.raises(ResultMismatchError, match="not a segpipe result"):
        segpipe.segment(small_slide.image, image, random_checkpoint, overwrite=True, **SETTINGS)
    with pytest.raises(ResultMismatchError, match="source"):
        segpipe.segment(image, image, random_checkpoint, overwrite=True, **SETTINGS)
    with pytest.raises(ResultMismatchError, match="source"):
        segpipe.segment(image, image / "inside.seg.zarr", random_checkpoint, **SETTINGS)
    assert sorted(p.relative_to(image) for p in image.rglob("*")) == before
    segpipe.open_image(image).read(0, 10, 0, 10)  # still readable


def test_progress_callback_counts_real_tiles_without_a_progress_bar(
    small_slide, random_checkpoint, tmp_path
):
    # Case 7: the flows pass progress=False and report through on_progress.
    seen: list[tuple[int, int]] = []
    segpipe.segment(
        small_slide.image,
        tmp_path / "r.seg.zarr",
        random_checkpoint,
        scheduler="sync",
        progress=False,
        on_progress=lambda done, total: seen.append((done, total)),
        **SETTINGS,
    )
    assert [done for done, _ in seen] == list(range(1, 101))
    assert {total for _, total in seen} == {100}


@pytest.mark.integration
def test_a_block_whose_workers_all_died_names_the_result_and_the_rerun_resumes(
    small_slide, random_checkpoint, tmp_path
):
    """Dask's KilledWorker came out as it is: a traceback (a bug's, in the CLI) naming a task
    key, neither the result nor that a re-run resumes."""
    import dask
    import distributed

    from segpipe.cli import user_errors
    from segpipe.execution.schedulers import WorkersDiedError

    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),  # the first death
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        reference = tmp_path / "ref.seg.zarr"
        segpipe.segment(
            small_slide.image, reference, random_checkpoint, scheduler=client, **SETTINGS
        )
        killed: list[int] = []

        def kill_the_worker(done: int, total: int) -> None:
            if done >= 20 and not killed:
                (pid,) = client.run(os.getpid).values()
                os.kill(pid, signal.SIGKILL)  # the nanny starts another
                killed.append(pid)

        out = tmp_path / "r.seg.zarr"
        with pytest.raises(WorkersDiedError) as caught:
            segpipe.segment(
                small_slide.image,
                out,
                random_checkpoint,
                scheduler=client,
                on_progress=kill_the_worker,
                **SETTINGS,
            )
        assert isinstance(caught.value.__cause__, distributed.KilledWorker)
        assert isinstance(caught.value, user_errors())  # one line in the CLI, exit 2
        message = str(caught.value)
        assert message.startswith(f"{out}: every Dask worker that ran one of its blocks died")
        assert "run again to resume" in message and "--batch-size" in message
        assert not read_meta(out).complete
        client.wait_for_workers(1, timeout=60)
        segpipe.segment(small_slide.image, out, random_checkpoint, scheduler=client, **SETTINGS)
    assert read_meta(out).complete
    assert 0 < read_meta(out).summary.tiles_skipped < 100  # resumed, not redone
    assert _arrays(out) == _arrays(reference)


@pytest.mark.integration
def test_killed_dask_worker_is_replaced_and_the_result_is_bit_identical(
    small_slide, random_checkpoint, tmp_path
):
    import distributed

    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        reference = tmp_path / "ref.seg.zarr"
        segpipe.segment(
            small_slide.image, reference, random_checkpoint, scheduler=client, **SETTINGS
        )
        victims = list(client.run(os.getpid).values())
        killed: list[int] = []
        forgotten: list[int] = []

        def blocks_held(dask_scheduler) -> int:
            return sum(str(key).startswith("segpipe-block-") for key in dask_scheduler.tasks)

        def kill_one_worker(done: int, total: int) -> None:
            if done >= 20 and not killed:
                # The blocks recorded are let go: the scheduler kept each result (to compute
                # again if its worker died) while the run held all its futures to the end.
                deadline = time.monotonic() + 10
                while (held := client.run_on_scheduler(blocks_held)) > total - (done - 2):
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.02)
                forgotten.append(total - held)
                os.kill(victims[0], signal.SIGKILL)  # the nanny starts a new worker
                killed.append(victims[0])

        out = tmp_path / "r.seg.zarr"
        segpipe.segment(
            small_slide.image,
            out,
            random_checkpoint,
            scheduler=client,
            on_progress=kill_one_worker,
            **SETTINGS,
        )
        assert killed
        assert forgotten[0] >= 18, f"{forgotten[0]} of the 20 blocks recorded were let go"
        assert victims[0] not in client.run(os.getpid).values()
    assert read_meta(out).complete
    assert _arrays(out) == _arrays(reference)
