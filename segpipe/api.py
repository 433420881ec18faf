"""``segpipe.segment``: the one entry point the CLI, the flows and notebooks share."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch

from segpipe import models
from segpipe.execution import (
    BlockResult,
    Job,
    connect,
    load_model,
    plan_local_cluster,
    run_blocks,
)
from segpipe.inference import InferenceConfig, resolve_device
from segpipe.readers import Reader, open_image
from segpipe.results import (
    ResultMeta,
    class_pixels,
    finalize_result,
    is_complete,
    mark_tiles_done,
    prepare_result,
)
from segpipe.tiling import blend_lattice, tile_grid

__all__ = ["segment"]

log = logging.getLogger("segpipe")

_FLUSH_SECONDS = 2.0


def _model_label(model: str | os.PathLike | torch.nn.Module, net: torch.nn.Module) -> str:
    if isinstance(model, torch.nn.Module):
        return str(getattr(net, "name", type(net).__name__))
    return str(model)


def segment(
    source: str | os.PathLike | Reader,
    output: str | os.PathLike,
    model: str | os.PathLike | torch.nn.Module = "tissue-unet",
    *,
    tile: int = 512,
    mode: Literal["exact", "blend"] = "exact",
    window: int | None = None,
    overlap: float = 0.25,
    sigma_scale: float = 0.125,
    level: int = 0,
    batch_size: int = 4,
    task_tiles: int = 2,
    device: str = "auto",
    amp: bool | None = None,
    scheduler: Any = None,
    n_workers: int | None = None,
    pixel_size_um: float | None = None,
    probability_dtype: str = "float16",
    min_level_size: int = 256,
    overwrite: bool = False,
    progress: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Segment an image into a result store and return its path.

    Parameters
    ----------
    source
        An image path (TIFF/SVS/OME-TIFF, Zarr/OME-Zarr, PNG/JPEG) or an open ``Reader``.
    output
        The result's Zarr directory. An unfinished result of the same inputs is resumed
        (only missing tiles are computed); a complete one is returned as it is.
    model
        A shipped model's name (``segpipe.models.shipped()``), a checkpoint path, or a
        ``torch.nn.Module`` with a ``geometry`` attribute.
    tile
        Output tile side in pixels; also the result's chunk side. A multiple of the model's
        ``geometry.multiple``.
    mode
        ``"exact"``: overlap-tile, halo = the model's receptive-field margin, result equal to a
        whole-image pass for valid-padding models. ``"blend"``: overlapping windows averaged
        with a Gaussian weight, for models whose receptive field is too large for a halo.
    window, overlap, sigma_scale
        Blend mode: window output side (pixels; default ``tile // 2`` snapped to the model),
        fraction shared by neighbours, Gaussian sigma as a fraction of the window.
    level
        Pyramid level to segment (0 = full resolution).
    batch_size
        Windows per forward pass.
    task_tiles
        Tiles per task along each side. A task writes ``task_tiles**2`` whole chunks, which
        make one Zarr shard (``task_tiles * tile`` pixels): larger blocks, fewer files.
    device, amp
        ``"auto"`` picks CUDA when present. ``amp`` autocasts to bfloat16 (default on CUDA).
    scheduler
        None starts a local Dask cluster; ``"sync"`` runs in this process; an address
        (``"tcp://host:8786"``) or a ``distributed.Client`` uses a running cluster.
    n_workers
        Workers of the local cluster (default: from the cores or GPUs).
    pixel_size_um
        Microns per pixel at level 0, overriding what the file says.
    probability_dtype
        ``"float16"`` (half the storage, ~5e-4 rounding), ``"float32"``, or ``"uint8"``
        (a quarter, steps of 1/255, decoded by xarray from CF ``scale_factor``).
    min_level_size
        The result's pyramid gets 2x smaller levels while their smaller side stays
        ``>= min_level_size`` pixels.
    overwrite
        Replace an existing result of other inputs or parameters at ``output``.
    progress
        Show a progress bar over tiles.
    on_progress
        Called in this process as ``on_progress(tiles_done, tiles_to_do)`` after each task
        (flows log and report through it).
    """
    started = time.perf_counter()
    reader = (
        source
        if not isinstance(source, str | os.PathLike)
        else open_image(source, pixel_size_um=pixel_size_um)
    )
    if not 0 <= level < len(reader.level_shapes):
        raise ValueError(
            f"{reader.path}: level {level} does not exist "
            f"(levels 0..{len(reader.level_shapes) - 1})"
        )
    if mode not in ("exact", "blend"):
        raise ValueError(f"mode must be 'exact' or 'blend', got {mode!r}")
    net = load_model(model)
    geometry = models.geometry_of(net)
    if mode == "exact" and (offenders := models.uses_tile_statistics(net)):
        raise ValueError(
            f"model {_model_label(model, net)!r} normalises with per-tile statistics "
            f"({', '.join(offenders)}), so tiles disagree whatever the halo and 'exact' mode "
            "cannot be exact; use mode='blend', or put BatchNorm layers in eval mode"
        )
    if tile % geometry.multiple:
        raise ValueError(
            f"tile {tile} px is not a multiple of the model's size multiple {geometry.multiple}"
            f"; try {tile + (-tile) % geometry.multiple}"
        )
    ny, nx, channels = reader.level_shapes[level]
    in_channels = getattr(net, "in_channels", channels)
    if channels != in_channels:
        raise ValueError(f"{reader.path} has {channels} channels but the model takes {in_channels}")
    class_names = tuple(
        getattr(net, "class_names", None)
        or (f"class_{i}" for i in range(cast(int, net.num_classes)))
    )
    lattice = None
    params: dict[str, Any] = {}
    if mode == "blend":
        pad = geometry.halo if geometry.shrinks else 0
        w = window or max(geometry.multiple, (tile // 2) // geometry.multiple * geometry.multiple)
        w = geometry.input_size(w) - 2 * pad if not geometry.accepts(w + 2 * pad) else w
        lattice = blend_lattice((ny, nx), geometry, window=w, overlap=overlap)
        params = {"window": w, "overlap": overlap, "sigma_scale": sigma_scale}

    dev = resolve_device(device)
    params["amp"] = bool(amp if amp is not None else dev.type == "cuda")
    level_px = (
        reader.pixel_size_um * reader.level_shapes[0][0] / ny if reader.pixel_size_um else None
    )
    meta = ResultMeta(
        source=str(reader.path),
        shape=(ny, nx),
        level=level,
        pixel_size_um=level_px,
        class_names=class_names,
        model_name=_model_label(model, net),
        model_sha256=models.fingerprint(net),
        tile=tile,
        halo=geometry.halo,
        mode=mode,
        probability_dtype=probability_dtype,
        params=params,
        task_tiles=task_tiles,
        min_level_size=min_level_size,
        **_georeference_at(reader, level),
    )
    output = Path(output)
    done = prepare_result(output, meta, overwrite=overwrite)
    if is_complete(output):
        log.info("%s is already complete; nothing to compute", output)
        return output

    grid = tile_grid((ny, nx), tile)
    # A block is one shard, the unit of writing: a partly done block is redone whole.
    blocks = [block for block in grid.blocks(task_tiles) if not all(done[t.index] for t in block)]
    n_todo = sum(len(b) for b in blocks)
    log.info(
        "segmenting %s (%d x %d px) into %s: %d tiles, %d to compute, mode %s",
        reader.path,
        ny,
        nx,
        output,
        len(grid),
        n_todo,
        mode,
    )
    job = Job(
        reader=reader,
        level=level,
        output=str(output),
        model_key=meta.model_sha256,
        mode=mode,
        tile=tile,
        geometry=geometry,
        num_classes=len(class_names),
        lattice=lattice,
        sigma_scale=sigma_scale,
    )
    plan = plan_local_cluster(dev, n_workers=n_workers)
    config = InferenceConfig(
        device=str(dev), batch_size=batch_size, amp=amp, threads=plan.torch_threads
    )
    recorder = _TileRecorder(output, n_todo, progress, on_progress)
    # A module travels to the workers as it is; a name or path is loaded there.
    worker_model = model if isinstance(model, torch.nn.Module) else str(model)
    try:
        with connect(scheduler, plan) as client:
            run_blocks(
                blocks,
                job,
                client=client,
                model=worker_model if client else net,
                config=config,
                on_result=recorder,
            )
    finally:
        # Whatever happened, record what was written so a re-run skips it.
        recorder.close()

    seconds = time.perf_counter() - started
    counts = class_pixels(output)
    summary: dict[str, Any] = {
        "tiles_total": len(grid),
        "tiles_computed": n_todo,
        "tiles_skipped": len(grid) - n_todo,
        "windows": recorder.windows,
        "seconds": round(seconds, 3),
        "megapixels_per_second": round(ny * nx * n_todo / len(grid) / 1e6 / seconds, 4),
        "class_pixels": counts.tolist(),
        "class_fraction": (counts / max(1, counts.sum())).round(6).tolist(),
    }
    if level_px:
        summary["class_area_um2"] = (counts * level_px**2).tolist()
    finalize_result(output, summary)
    log.info("%s complete: %d tiles in %.1f s", output, n_todo, seconds)
    return output


def _georeference_at(reader: Reader, level: int) -> dict[str, Any]:
    """``crs`` and the pixel-corner ``transform`` of ``level`` for a georeferenced reader."""
    geo = getattr(reader, "georeference", None)
    if geo is None:
        return {}
    (y0, x0, _), (y, x, _) = reader.level_shapes[0], reader.level_shapes[level]
    a, b, c, d, e, f = geo.transform
    return {"crs": geo.crs, "transform": (a * x0 / x, b, c, d, e * y0 / y, f)}


class _TileRecorder:
    """Driver-side bookkeeping of finished blocks: progress bar, callback, and the result's
    tiles-done map, flushed every few seconds rather than per block (one small write)."""

    def __init__(
        self,
        output: Path,
        total: int,
        progress: bool,
        on_progress: Callable[[int, int], None] | None,
    ) -> None:
        from tqdm.auto import tqdm

        self.output = output
        self.total = total
        self.on_progress = on_progress
        self.windows = 0
        self._pending: dict[tuple[int, int], np.ndarray] = {}
        self._last_flush = time.monotonic()
        self._bar = tqdm(total=total, unit="tile", desc="segment", disable=not progress)

    def __call__(self, res: BlockResult) -> None:
        self._pending.update(zip(res.tiles, res.class_pixels, strict=True))
        self.windows += res.windows
        self._bar.update(len(res.tiles))
        if self.on_progress is not None:
            self.on_progress(self._bar.n, self.total)
        if time.monotonic() - self._last_flush > _FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        mark_tiles_done(self.output, self._pending)
        self._pending.clear()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        self._bar.close()
