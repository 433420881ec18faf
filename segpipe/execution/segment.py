"""``segpipe.segment``: the one entry point the CLI, the flows and notebooks share."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import torch

from segpipe import models
from segpipe.atomic import check_overwrite, write_errors_named
from segpipe.config import SegmentConfig
from segpipe.execution.arguments import check_arguments, check_reader_settings
from segpipe.execution.cluster import (
    choose_scheduler,
    connect,
    in_process_is_cheaper,
    plan_for_device,
    run_blocks,
)
from segpipe.execution.foreground import (
    FOREGROUND_MODES,
    foreground_of,
    mask_file_sha256,
    resolve_foreground,
    select_tiles,
)
from segpipe.execution.predictor import InferenceConfig
from segpipe.execution.tasks import BlockResult, Job, blend_task_side, group_blocks
from segpipe.execution.workers import resolve_amp, run_key
from segpipe.geometry.blending import blend_lattice, blend_window_side
from segpipe.geometry.pixels import level_downsample
from segpipe.geometry.tiling import tile_grid
from segpipe.io.files import URLPath, is_url, location
from segpipe.io.identity import pixel_sample_sha256
from segpipe.io.imagestore import is_segpipe_image
from segpipe.io.locks import store_lock
from segpipe.io.places import public_url
from segpipe.io.readers import Reader, open_image
from segpipe.progress import Stage, progress_option, stage
from segpipe.results import (
    ResultMeta,
    RunSummary,
    TileRecord,
    class_pixels,
    finalize_result,
    is_complete,
    prepare_result,
)
from segpipe.results.inputs import check_not_source, checkpoint_files
from segpipe.results.lock import result_lock
from segpipe.results.tiles import result_started

__all__ = ["segment"]

log = logging.getLogger("segpipe")


def _model_label(model: str | os.PathLike | torch.nn.Module, net: torch.nn.Module) -> str:
    # A module carries only its architecture's name ("unet"), not the trained model's
    # ("tissue-unet"): callers that load once and pass the module give the name as model_name.
    if isinstance(model, torch.nn.Module):
        return str(getattr(net, "name", type(net).__name__))
    return models.label_of(model)


@progress_option
def segment(
    source: str | os.PathLike | Reader,
    output: str | os.PathLike,
    model: str | os.PathLike | torch.nn.Module = "tissue-unet",
    config: SegmentConfig | None = None,
    *,
    model_name: str | None = None,
    scheduler: Any = None,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    **settings: Any,
) -> Path | URLPath:
    """Segment an image into a result store and return its path.

    Parameters
    ----------
    source
        An image path (TIFF/SVS/OME-TIFF, Zarr/OME-Zarr, PNG/JPEG) or an open ``Reader``.
    output
        The result's Zarr directory. An unfinished result of the same inputs is resumed
        (only missing tiles are computed); a complete one is returned as it is. Its summary
        (``read_meta(path).summary``) counts the result's tiles whichever runs computed
        them; ``windows``, ``seconds`` and ``megapixels_per_second`` are the last run's, and
        ``tiles_skipped`` the computed tiles it found done by an earlier one. A relative
        ``source`` or ``output`` is made absolute here, as Dask workers must open it.
    model
        A shipped model's name (``segpipe.models.shipped()``), a checkpoint path, or a
        ``torch.nn.Module`` with a ``geometry`` attribute.
    config
        The run's :class:`~segpipe.config.SegmentConfig` (default: all defaults): ``tile``,
        ``mode`` (``"exact"`` overlap-tile or ``"blend"``), ``window``/``overlap``/
        ``sigma_scale`` (blend), ``level``, ``pixel_size_um``, ``probability_dtype``,
        ``task_tiles``, ``min_level_size``, ``amp``, ``foreground``, ``batch_size``, ``device``,
        ``n_workers``, ``scheduler``, ``threads``. Each field's doc is in ``SegmentConfig``.
    model_name
        The model's name as the result records it (part of its identity). Default: ``model``
        when a name or path, the module's ``name`` (its architecture) when a module; give it
        when passing a module loaded once from a name (``models.load("tissue-unet")``), so
        the result is the same as one made from the name.
    scheduler
        Overrides ``config.scheduler``: ``"sync"`` runs in this process; an address
        (``"tcp://host:8786"``) or a ``distributed.Client`` uses a running cluster. A string
        is a setting like the others (it lands in the config); a ``Client``, which a config
        cannot hold, is used as it is. When neither gives one, the first of these is used:
        the ``distributed`` client active in this process (``distributed.get_client()``),
        Dask's ``scheduler-address`` config (env ``DASK_SCHEDULER_ADDRESS``), else a local
        cluster started for the run (threads of this process on the CPU, so a plain script
        needs no ``if __name__ == "__main__":`` guard; one process per GPU).
        ``device="auto"`` is resolved on each worker: its GPU when it has one, else its CPU.
    overwrite
        Replace an existing result of other inputs or parameters at ``output``.
    storage_options
        fsspec options (endpoint, credentials) for a ``source`` or ``output`` that is a URL
        (``s3://bucket/slide.svs``, ``s3://bucket/slide.seg.zarr``); the image is read by
        byte ranges, the result written through Zarr's store, and the returned
        :class:`~segpipe.io.files.URLPath` carries them to Dask workers. Unset: fsspec's own
        (environment variables, ``~/.aws``).
    progress
        Show the run's stages (segment, pyramid) on stderr, unless a listener is installed
        already (:func:`segpipe.progress.reporting`: the CLI's, a flow's), which shows them.
    on_progress
        Called in this process as ``on_progress(tiles_done, tiles_to_do)`` after each task
        (flows log and report through it).
    **settings
        Any ``SegmentConfig`` field, overriding ``config`` (``segment(src, out, tile=256)``).
    """
    started = time.perf_counter()
    check_overwrite(overwrite)  # before any work: prepare_result checks it only at the end
    check_arguments(source, output, model, config)
    config = (config or SegmentConfig()).replace(**settings)
    check_reader_settings(source, config)
    if ignored := config.ignored_settings():
        raise ValueError(
            f"{', '.join(ignored)} set, but mode={config.mode!r} does not use them (blend mode "
            "does): leave them unset, or segment with mode='blend'"
        )
    if isinstance(scheduler, str):
        config, scheduler = config.replace(scheduler=scheduler), None
    if scheduler is None:
        scheduler = config.scheduler
    # Dask workers open the source and the result by these paths, in their own working folders.
    source = _absolute(source) if isinstance(source, str | os.PathLike) else source
    output = _absolute(output)
    with write_errors_named(output), contextlib.ExitStack() as locked:  # run lock till final
        with contextlib.ExitStack() as run:
            # Not a URL's: object storage has no locks (and its zarr.json needs its options).
            local = source if isinstance(source, str | os.PathLike) else None
            if local is not None and not is_url(local) and is_segpipe_image(local):
                # Read by this run's tasks until it ends: no ingest replaces it meanwhile (other
                # runs may read it too), and none in progress is read (segpipe.io.locks).
                locked.enter_context(store_lock(location(local), shared=True))
            if isinstance(source, str | os.PathLike | URLPath):
                reader = open_image(
                    source, pixel_size_um=config.pixel_size_um, storage_options=storage_options
                )
                run.callback(cast(Any, reader).close)  # opened here: closed here (BaseReader's)
            else:
                reader = source
            # Before any work (a tissue mask of a whole slide): no result, and no lock file,
            # is written where the source image is, or inside it.
            output = location(output, storage_options)
            check_not_source(output, str(reader.path), *checkpoint_files(model))
            net = model if isinstance(model, torch.nn.Module) else models.load(model)
            label = model_name or _model_label(model, net)
            # What the model was trained on; with no level given, segment the level closest to its
            # training pixel size (level 0 when either pixel size is unknown).
            contract = models.pixel_contract_of(net)
            level_fixed = config.level is not None
            level = (
                config.level if config.level is not None else models.choose_level(contract, reader)
            )
            tile = config.tile
            if not 0 <= level < len(reader.level_shapes):
                raise ValueError(
                    f"{reader.path}: level {level} does not exist "
                    f"(levels 0..{len(reader.level_shapes) - 1})"
                )
            config = config.replace(level=level)
            geometry = models.geometry_of(net)
            if config.mode == "exact" and (offenders := models.uses_tile_statistics(net)):
                raise ValueError(
                    f"model {label!r} normalises with per-tile statistics "
                    f"({', '.join(offenders)}), so tiles disagree whatever the halo and 'exact' "
                    "mode cannot be exact; use mode='blend' (a BatchNorm or an InstanceNorm "
                    "that tracks running statistics: put it in eval mode)"
                )
            if tile % geometry.multiple:
                raise ValueError(
                    f"tile {tile} px is not a multiple of the model's size multiple "
                    f"{geometry.multiple}; try {tile + (-tile) % geometry.multiple}"
                )
            ny, nx, _ = reader.level_shapes[level]
            # Before any work: channels, dtype and pixel size the model takes (PixelContractError).
            models.check_source(contract, reader, level, model=label, level_fixed=level_fixed)
            # Resolved before the identity is taken ("auto" must not make two results look alike),
            # and refused before a cluster starts or the result is made.
            config = config.replace(foreground=resolve_foreground(config.foreground, reader))
            foreground = foreground_of(reader, level, config.foreground)  # before the result
            class_names = models.class_names_of(net)
            lattice = None
            if config.mode == "blend":
                m = geometry.multiple
                w = blend_window_side(geometry, config.window or max(m, (tile // 2) // m * m))
                if (gib := len(class_names) * w**2 * 4 / 2**30) > 1:  # as a result chunk's cap
                    raise ValueError(  # not numpy's MemoryError, in a task, naming no setting
                        f"window {w} px (--window) makes each window's probabilities {gib:,.1f} "
                        f"GiB (float32), its forward pass's activations many times that; give "
                        f"a smaller window (the default is tile // 2: {tile // 2} px)"
                    )
                lattice = blend_lattice((ny, nx), geometry, window=w, overlap=config.overlap)
                config = config.replace(window=w)

            plan = plan_for_device(config.device, config.n_workers)
            scheduler = choose_scheduler(scheduler)
            # A running cluster is asked now for the amp its workers will apply; for a local
            # cluster (this machine) or "sync" (this process) this process answers, and a local
            # cluster starts only when there is work.
            client = (
                run.enter_context(connect(scheduler, plan))
                if scheduler is not None and scheduler != "sync"
                else None
            )
            # Resolved before the identity is taken: "auto" must not make two results look alike.
            config = config.replace(amp=resolve_amp(config.amp, config.device, client))
            # A whole factor where one fits: a level of a pyramid whose sides were odd is not
            # exactly half as tall (517 rows, 258), and its pixels are 2x level 0's.
            level0 = reader.level_shapes[0][0]
            level_px = (
                reader.pixel_size_um * level_downsample(level0, ny)
                if reader.pixel_size_um
                else None
            )
            origin = getattr(reader, "origin_um", None)  # not in the Reader protocol
            meta = ResultMeta(
                source=public_url(str(reader.path)),  # no password of a URL's
                shape=(ny, nx),
                pixel_size_um=level_px,
                class_names=class_names,
                model_name=label,
                model_sha256=models.fingerprint(net),
                halo=geometry.halo,
                config=config,
                foreground_sha256=(
                    None
                    if config.foreground in FOREGROUND_MODES
                    else mask_file_sha256(config.foreground)
                ),
                **_georeference_at(reader, level),
                source_shape=(int(reader.level_shapes[0][0]), int(reader.level_shapes[0][1])),
                source_sha256=pixel_sample_sha256(reader),  # a sample of its pixels
                # where its first pixel lies (an OME-Zarr's translation), in microns
                origin_um=origin if origin and any(origin) else None,
            )
            # One run at a time writes a local result, from before it is prepared until it is
            # finalised: no other run replaces it under this one (segpipe.results.lock).
            locked.enter_context(result_lock(output))
            done = prepare_result(output, meta, overwrite=overwrite)
            # The result this run made or resumes: its tasks write, and its driver records, only
            # while the one at the path is still this one (another run may replace it).
            stamp = result_started(output)
            if is_complete(output):
                log.info("%s is already complete; nothing to compute", output)
                return output

            grid = tile_grid((ny, nx), tile)
            # Tiles without foreground (glass, nodata) are recorded done as class 0, not computed.
            selection = select_tiles(
                grid, output, foreground,
                task_tiles=config.task_tiles, num_classes=len(class_names),
                geometry=geometry if config.mode == "exact" else None, done=done, started=stamp,
            )  # fmt: skip
            # A block is one shard, the unit of writing: a partly done block is redone whole.
            blocks = selection.blocks(grid, config.task_tiles)
            if config.mode == "blend":  # fewer windows computed twice, at tasks' edges
                block_side = tile * config.task_tiles
                side = blend_task_side(block_side, len(class_names))
                # Grouped as in a fresh run, and a group partly recorded (its record spans
                # two progress chunks) redone whole: a window's bits depend on its batch.
                blocks = group_blocks(blocks, block_side, side)
            blocks = [b for b in blocks if not all(done[t.index] for t in b.tiles)]
            n_todo = sum(len(b.tiles) for b in blocks)
            log.info(
                "segmenting %s (%d x %d px) into %s: %d tiles, %d to compute, mode %s",
                public_url(str(reader.path)), ny, nx, output, len(grid), n_todo, config.mode,
            )  # fmt: skip
            job = Job(
                reader=reader,
                level=level,
                output=output if isinstance(output, URLPath) else str(output),
                predictor_key=run_key(meta.model_sha256),
                # A fresh result: the tiles a block leaves out were never written (background of
                # this run, the fill value); a resumed one may hold an earlier run's tiles there.
                whole_shards=not done.any(),
                mode=config.mode,
                tile=tile,
                geometry=geometry,
                num_classes=len(class_names),
                lattice=lattice,
                sigma_scale=config.sigma_scale,
                channels=models.channels_taken(contract, reader, level),
                started=stamp,
            )
            # A running cluster's workers keep their own thread settings unless the config
            # names a count: this machine's cores say nothing of theirs.
            threads, io_threads = config.threads, None
            if client is None:
                # Sync and the threaded local cluster run in this process, and torch's thread count
                # is process-wide: give the caller's back when the run ends.
                run.callback(torch.set_num_threads, torch.get_num_threads())
                if scheduler != "sync" and not in_process_is_cheaper(plan, n_todo * tile * tile):
                    client = run.enter_context(connect(scheduler, plan))
                # The local cluster's workers take the plan's; this process, when it runs the
                # blocks itself, all of its cores (not one shared GPU worker's part of them).
                here = plan_for_device(config.device, processes=False) if client is None else plan
                threads = threads or here.torch_threads
                io_threads = here.threads_per_worker if client is None else None
            inference = InferenceConfig(
                device=config.device, batch_size=config.batch_size, amp=config.amp, threads=threads
            )
            with stage("segment", total=n_todo, unit="tile") as tiles:
                recorder = _TileRecorder(output, stamp, tiles, on_progress)
                run_blocks(
                    blocks,
                    job,
                    client=client,
                    model=net,
                    config=inference,
                    on_result=recorder,
                    io_threads=io_threads,
                )

        seconds = time.perf_counter() - started
        # The result's tiles, whichever attempts computed them (every tile is done now: computed
        # or recorded as background), so a resumed result reads as one never interrupted; the
        # figures of this attempt alone are the windows, seconds and megapixels per second, and
        # the tiles it found done (``tiles_skipped``: this attempt computed the difference).
        computed = len(grid) - selection.background
        summary = RunSummary(
            tiles_total=len(grid),
            tiles_computed=computed,
            tiles_skipped=computed - n_todo,
            windows=recorder.windows,
            seconds=round(seconds, 3),
            megapixels_per_second=round(ny * nx * n_todo / len(grid) / 1e6 / seconds, 4),
            class_pixels=tuple(int(n) for n in class_pixels(output)),
            tiles_background=selection.background,
            foreground_pixels=selection.foreground_pixels,
        )
        finalize_result(output, summary, started=stamp)
    log.info("%s complete: %d tiles computed in %.1f s this run", output, n_todo, seconds)
    return output


def _absolute(path: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """A relative local path made absolute (against this process's working folder); an
    absolute one, a URL (``"s3://..."``, ``"file://..."``) or a :class:`URLPath` as it is,
    so a result made with an absolute path keeps its identity.

    >>> _absolute("/data/a.svs"), _absolute("s3://bucket/a.svs")
    ('/data/a.svs', 's3://bucket/a.svs')
    """
    if isinstance(path, URLPath) or "://" in os.fspath(path) or os.path.isabs(path):
        return path
    absolute = os.path.abspath(path)
    return absolute if isinstance(path, str) else Path(absolute)


def _georeference_at(reader: Reader, level: int) -> dict[str, Any]:
    """``crs`` and the pixel-corner ``transform`` of ``level`` for a georeferenced reader."""
    geo = getattr(reader, "georeference", None)
    if geo is None:
        return {}
    (y0, x0, _), (y, x, _) = reader.level_shapes[0], reader.level_shapes[level]
    a, b, c, d, e, f = geo.transform
    sy, sx = (level_downsample(n0, n, overview_ratio=True) for n0, n in ((y0, y), (x0, x)))
    return {"crs": geo.crs, "transform": (a * sx, b, c, d, e * sy, f)}


class _TileRecorder:
    """Driver-side bookkeeping of finished blocks: the segment stage, callback, and the result's
    tiles-done map, recorded as each block arrives, so a re-run recomputes only blocks that
    were not finished (one small write per block, a few ms beside its forward passes)."""

    def __init__(
        self,
        output: Path | URLPath,
        started: str | None,
        tiles: Stage,
        on_progress: Callable[[int, int], None] | None,
    ) -> None:
        self.record = TileRecord(output, started=started)
        self.tiles = tiles
        self.on_progress = on_progress
        self.windows = 0

    def __call__(self, res: BlockResult) -> None:
        self.record.mark(dict(zip(res.tiles, res.class_pixels, strict=True)))
        self.windows += res.windows
        self.tiles.advance(len(res.tiles))
        if self.on_progress is not None:
            self.on_progress(self.tiles.done, self.tiles.total or 0)
