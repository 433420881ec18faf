"""Writing a result: create or resume the store, write whole shards, finish (the driver's
record of the tiles written: :mod:`segpipe.results.tiles`).

Arrays are chunked like the output tiles and sharded by one task's block of tiles
(``task_tiles * tile`` pixels): every task writes whole shards, which is what makes concurrent
writers safe in Zarr v3. The driver alone writes the ``_segpipe`` bookkeeping arrays.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from segpipe.atomic import check_writable
from segpipe.faults import fault_point
from segpipe.geometry.tiling import Box
from segpipe.io.files import URLPath, location, utc_now
from segpipe.io.siblings import sibling_name, siblings
from segpipe.results import remote
from segpipe.results.encoding import class_map, encode_probabilities
from segpipe.results.inputs import check_holds_no_input, check_not_source, inputs_of
from segpipe.results.layout import block_level_arrays, create_layout
from segpipe.results.lock import is_debris, result_lock
from segpipe.results.pyramid import block_levels, box_levels, build_pyramid
from segpipe.results.schema import (
    LATER_IDENTITY_KEYS,
    IncompleteResultError,
    ResultMeta,
    ResultMismatchError,
    is_result,
    open_root,
    read_attrs,
    store_of,
)
from segpipe.results.shards import write_together
from segpipe.results.summary import RunSummary
from segpipe.results.tiles import ResultReplacedError, check_not_replaced, tiles_done

__all__ = [
    "delete_result",
    "finalize_result",
    "prepare_result",
    "quiet_consolidated",
    "write_block",
    "write_tiles",
]

log = logging.getLogger("segpipe")


def prepare_result(
    path: str | os.PathLike, meta: ResultMeta, *, overwrite: bool = False
) -> np.ndarray:
    """Create the result store, or reopen a compatible unfinished one.

    Returns the (tile_y, tile_x) bool map of tiles already written: all False for a new store,
    what an interrupted run finished for a resumed one, all True for a complete one.

    Raises ``ResultMismatchError`` when ``path`` holds anything else: a result of other inputs
    or parameters (unless ``overwrite``), or something that is not a segpipe result at all
    (an image, user data: never deleted, whatever ``overwrite`` says).

    A result appears at ``path`` whole or not at all: its skeleton is built beside it and
    renamed into place, and a replaced result is renamed aside before it is deleted, so a run
    killed at any instant leaves either nothing, the old result, or the new skeleton. At an
    fsspec URL (a :class:`~segpipe.io.files.URLPath`: object stores cannot rename) the order
    of the writes does it instead, the root ``zarr.json`` that makes a result written last
    and deleted first (:mod:`segpipe.results.remote`). A local folder at ``path`` of chunks
    alone (late writes of a run replaced there: :func:`~segpipe.results.lock.is_debris`) is
    removed first. :func:`segpipe.segment` holds the result's run lock around all this.
    """
    path = location(path)  # a URL string its URLPath (the environment's options), not ./s3:/
    check_not_source(path, *inputs_of(meta.identity()))
    _check_sizes(meta)
    _remove_leftovers(path)
    if path.exists():
        if not is_result(path):
            raise ResultMismatchError(
                f"{path} exists and is not a segpipe result; refusing to write into it. "
                "Choose another output path."
            )
        stored, current = read_attrs(path).get("identity", {}), meta.identity()
        changed = _identity_differences(stored, current)
        if not changed:
            return tiles_done(path)
        if not overwrite:
            values = (_WHY.get(k, _stored_and_now(k, stored, current)) for k in changed)
            raise ResultMismatchError(
                f"{path} holds a segpipe result made with other inputs or parameters "
                f"(differs in: {'; '.join(values)}); pass "
                "overwrite=True (--overwrite) to replace it, or choose another output path."
            )
        check_holds_no_input(path)
        _delete(path)
    _create(path, meta)
    fault_point("result.created")
    return tiles_done(path)


_MAX_CHUNK_BYTES = 2**30  # a chunk is encoded, and read, whole
_MAX_TASK_TILES = 2048  # a shard's index: 16 bytes a chunk, task_tiles² chunks


def _check_sizes(meta: ResultMeta) -> None:
    """Refuse, before any work, a tile or task_tiles no store can hold: a chunk is padded to
    its full size, so --tile 1000000 on a 300 px image failed after the model ran, allocating
    5.5 TiB (a MemoryError traceback)."""
    c = meta.config
    chunk = len(meta.class_names) * c.tile**2 * np.dtype(c.probability_dtype).itemsize
    if chunk > _MAX_CHUNK_BYTES:
        raise ValueError(
            f"tile {c.tile} px (--tile) makes result chunks of {chunk / 2**30:,.1f} GiB "
            f"({len(meta.class_names)} classes x {c.tile}² px {c.probability_dtype}), each "
            "written and read whole; give a smaller tile (the default is 512)"
        )
    if c.task_tiles > _MAX_TASK_TILES:
        raise ValueError(
            f"task_tiles {c.task_tiles} (--task-tiles) is more than {_MAX_TASK_TILES}: a shard's "
            f"index alone would take {16 * c.task_tiles**2 / 2**30:,.1f} GiB; give fewer "
            "(the default is 2)"
        )


# A differing identity key as the mismatch error names it, where its name alone says little.
_WHY = {
    "source_sha256": "source_sha256 (the source's pixels differ from those the result was made "
    "from: another image saved at the same path?)",
    "foreground_sha256": "foreground_sha256 (the mask file's contents differ from those the "
    "result was made with)",
}


def _stored_and_now(key: str, stored: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """``key`` with the stored result's value and this run's, as the mismatch error names
    them (a value too long to read is cut: a source's path, a model's)."""

    def shown(identity: Mapping[str, Any]) -> str:
        text = repr(identity[key]) if key in identity else "not recorded"
        return text if len(text) <= 80 else text[:77] + "..."

    return f"{key}: {shown(stored)} stored, {shown(current)} in this run"


def _identity_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The keys, sorted, in which a stored result's identity and a run's differ (none: the
    run makes that result). A key of :data:`~segpipe.results.schema.LATER_IDENTITY_KEYS`
    the stored identity lacks is left out: a release before the key wrote it, and it resumes.

    >>> _identity_differences({"tile": 256}, {"tile": 256, "source_sha256": "ab12"})
    []
    >>> _identity_differences({"tile": 256, "source_sha256": "ab12"}, {"tile": 512})
    ['source_sha256', 'tile']
    >>> here, there = {"model_name": "m.pt", "model_sha256": "0f"}, {"model_name": "../m.pt"}
    >>> _identity_differences(here, {**there, "model_sha256": "0f"})
    []
    """
    keys = set(stored) | (set(current) - {k for k in LATER_IDENTITY_KEYS if k not in stored})
    # A name whose contents both hash beside it (a checkpoint's path, a mask file's) decides
    # nothing: the same file spelt from another folder, or copied, makes the same numbers.
    keys -= {k for k, sha in _NAMED_BY.items() if sha in stored and sha in current}
    return sorted(k for k in keys if k not in stored or k not in current or stored[k] != current[k])


_NAMED_BY = {"model_name": "model_sha256", "foreground": "foreground_sha256"}


def delete_result(path: str | os.PathLike | URLPath) -> None:
    """Delete the segpipe result at ``path`` as a replaced one is: what a deletion killed
    part-way left removed first, then renamed aside and deleted (at a URL, its root
    ``zarr.json`` first), so a kill at any instant never leaves a half-deleted store there.
    Nothing at ``path``: nothing to do; anything but a segpipe result (or the chunks late
    writes left, :func:`~segpipe.results.lock.is_debris`): refused. A local result is deleted
    under its run lock (:class:`~segpipe.results.lock.ResultBusyError` while a run writes
    it); one at a URL takes none."""
    path = location(path)  # a URL string its URLPath (the environment's options), not ./s3:/
    if isinstance(path, Path) and not path.parent.is_dir():
        return  # nothing there, and no folder to make for a lock
    with result_lock(path):
        _remove_leftovers(path)
        if not path.exists():
            return
        if not is_result(path):
            raise ResultMismatchError(
                f"{path} exists and is not a segpipe result; move it away, segpipe will not "
                "delete it"
            )
        check_holds_no_input(path)
        _delete(path)


def _delete(path: Path | URLPath) -> None:
    if isinstance(path, URLPath):
        remote.delete(path)
        return
    _check_not_link(path)
    trash = sibling_name(path, "deleting")
    os.rename(path, trash)
    fault_point("result.deleting")
    shutil.rmtree(trash)


def _create(path: Path | URLPath, meta: ResultMeta) -> None:
    if isinstance(path, URLPath):
        remote.create(path, meta)
        return
    _check_not_link(path)
    check_writable(path)  # its error names the result, not the hidden copy built beside it
    building = sibling_name(path, "creating")
    try:
        create_layout(building, meta)
        fault_point("result.skeleton")
        try:
            os.rename(building, path)
        except OSError as e:
            # A late write of a run replaced here (its tasks write by path) made the folder
            # anew since prepare_result looked: once removed, the rename is tried again.
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not _remove_debris(path):
                raise
            os.rename(building, path)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise


def _check_not_link(path: Path) -> None:
    # A result is renamed into place and aside: through a link, the link would be moved and
    # the result kept (rmtree refuses links). Following the link would replace or delete
    # whatever it points to, on whichever disk, which other links may share: refused.
    if path.is_symlink():
        raise ResultMismatchError(
            f"{path} is a symbolic link to {os.readlink(path)}; segpipe creates, replaces and "
            "deletes a result by renaming it, which would move the link, not the result: "
            "give the link's target as the output path, or remove the link"
        )


# Leftovers of a killed run beside a result: a half-built skeleton or a half-deleted result.
_LEFTOVER_KINDS = ("creating", "deleting")
# A skeleton younger than this may belong to a run creating it right now.
_LEFTOVER_AGE_S = 600.0


def _remove_leftovers(path: Path | URLPath) -> None:
    if isinstance(path, URLPath):
        remote.remove_leftovers(path, older_than_s=_LEFTOVER_AGE_S)
        return
    if not path.parent.is_dir():
        return
    now = time.time()
    for kind in _LEFTOVER_KINDS:
        for old in siblings(path, kind):
            with contextlib.suppress(OSError):
                if kind == "deleting" or now - old.stat().st_mtime > _LEFTOVER_AGE_S:
                    shutil.rmtree(old)
    _remove_debris(path)


def _remove_debris(path: Path) -> bool:
    """Remove ``path`` where late writes left chunks alone (:func:`is_debris`); whether it did."""
    if not is_debris(path):
        return False
    log.warning("%s held only chunks a replaced run wrote there late: removed", path)
    _delete(path)
    return True


def write_block(
    path: str | os.PathLike,
    box: Box,
    probabilities: np.ndarray,
    *,
    step: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    arrays: Sequence[tuple[zarr.Array, zarr.Array, zarr.Array]] | None = None,
    labels: Sequence[tuple[Sequence[zarr.Array], np.ndarray]] = (),
    started: str | None = None,
) -> np.ndarray:
    """Write (C, y, x) float probabilities over ``box`` and their argmax mask, at level 0 and
    at the pyramid levels the result's tasks write (``layout.levels_in_blocks``): there, the
    mask halved by 2x2 mode and the probabilities by 2x2 mean before they are encoded.

    ``box`` must lie in one task's block of tiles and start on a tile, so concurrent tasks
    never share a shard at any level. Each of two steps (computing every level's values, then
    writing them all at once) runs inside ``step()``: the caller's way to let other work in
    between (:meth:`segpipe.execution.pipeline.ModelStage.io_section`). ``arrays``: what
    :func:`~segpipe.results.layout.block_level_arrays` gives for ``path``, opened once by a
    caller that writes many blocks of one run (default: opened here). ``labels``: other label
    images' (y, x) uint8 values over ``box``, each with its arrays at those levels
    (:func:`segpipe.results.labels.label_block_arrays`), halved by mode and written in the
    same trip. ``started``: the ``started`` stamp of the result the caller's run prepared;
    just before the shards are written the result's own is read (one read of its root
    ``zarr.json``) and, where another run has replaced the result since, nothing is written
    and :class:`~segpipe.results.tiles.ResultReplacedError` is raised. None: not checked.
    Returns the (y, x) uint8 mask written at level 0.
    """
    with step():
        if arrays is None:
            arrays = block_level_arrays(store_of(path))
        mask = class_map(probabilities)
        levels = box_levels(box, len(arrays) - 1)
        arrays = arrays[: levels + 1]
        writes: list[tuple[zarr.Array, tuple[slice, ...], np.ndarray]] = []
        for (mask_arr, prob_arr, label_arr), (at, p), (_, m) in zip(
            arrays,
            block_levels(box, probabilities, "mean", levels),
            block_levels(box, mask, "mode", levels),
            strict=True,
        ):
            probs = encode_probabilities(p, prob_arr.dtype.name)
            writes += [(prob_arr, (slice(None), *at.slices), probs)]
            writes += [(a, at.slices, m) for a in (mask_arr, label_arr)]
        for label_arrays, values in labels:
            if values.shape != box.shape:
                raise ValueError(f"label values {values.shape} do not cover the block {box}")
            halved = block_levels(box, np.asarray(values, dtype=np.uint8), "mode", levels)
            pairs = zip(label_arrays[: levels + 1], halved, strict=True)
            writes += [(a, at.slices, v) for a, (at, v) in pairs]
    with step():
        # Checked once the shards are encoded, right before they are stored: a task still
        # running when another run replaced the result writes by path, so its shards would
        # land in the new result, which may hold that block already.
        fence = None if started is None else (lambda: check_not_replaced(path, started))
        write_together(writes, before_storing=fence)
    fault_point("block.written")
    return mask


def write_tiles(path: str | os.PathLike, box: Box, probabilities: np.ndarray) -> np.ndarray:
    """:func:`write_block`, returning the per-class pixel counts of the mask, (C,) int64."""
    mask = write_block(path, box, probabilities)
    return np.bincount(mask.ravel(), minlength=probabilities.shape[0]).astype(np.int64)


def finalize_result(
    path: str | os.PathLike, summary: RunSummary, *, started: str | None = None
) -> ResultMeta:
    """Build the pyramid, consolidate the metadata, then mark the result complete.

    ``complete`` is the last thing written, in one atomic write of the root ``zarr.json``
    (which keeps the consolidated metadata), after everything reading needs. Finalising again
    after an interruption redoes the same steps with the same outcome. Returns the result's
    metadata as now stored. A result with tiles not written is refused
    (:class:`~segpipe.results.schema.IncompleteResultError`): a run whose result another
    run replaced (see :class:`~segpipe.results.tiles.TileRecord`) must not mark it complete.
    ``started``: the stamp of the result the caller's run prepared, checked before each root
    write (``finalising``, the consolidated metadata, ``complete``): where another run has
    replaced the result since, :class:`~segpipe.results.tiles.ResultReplacedError` is raised
    and the other run's result is not marked. None: not checked.
    """

    def fence() -> None:
        if started is not None:
            check_not_replaced(path, started)

    fence()  # first: a result replaced since has tiles not written, but is not this run's
    missing = ~tiles_done(path)
    if missing.any():  # e.g. a run that another replaced: it must not mark that one complete
        raise IncompleteResultError(
            f"{path}: {int(missing.sum())} of {missing.size} tiles are not written, so it is "
            "not finalised (was it replaced by another run while this one wrote it?)"
        )
    group, meta = open_root(path, "r+")
    group.attrs["segpipe"] = replace(meta, state="finalising").to_attrs()
    build_pyramid(path, fence=fence)
    fault_point("result.pyramid")
    fence()
    with quiet_consolidated():
        zarr.consolidate_metadata(path)
        group = zarr.open_group(path, mode="r+")
    fault_point("result.consolidated")
    meta = replace(meta, state="complete", finished=utc_now(), summary=summary)
    fence()
    # Deleted meanwhile (an overwrite at a URL, which takes no lock), its root written back by
    # the consolidation with this run's stamp: the fence passes, the tiles' record is gone.
    try:
        gone = started is not None and not tiles_done(path).all()
    except (FileNotFoundError, KeyError, zarr.errors.ArrayNotFoundError):
        gone = True
    if gone:
        raise ResultReplacedError(
            f"{path} was deleted by another run while this run finalised it: this run stops "
            "and marks nothing complete there"
        )
    group.attrs["segpipe"] = meta.to_attrs()
    return meta


@contextlib.contextmanager
def quiet_consolidated() -> Iterator[None]:
    # Consolidated metadata is a zarr-python extension to v3 that we use on purpose (one read
    # instead of one per array on object stores); its warning says nothing actionable.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        yield
