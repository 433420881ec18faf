"""One run at a time per local result (an exclusive :func:`segpipe.io.locks.store_lock`), and
what a write that got past it leaves at the result's path (:func:`is_debris`).

The ``started`` stamp (:func:`~segpipe.results.tiles.check_not_replaced`) lets a run notice,
before each write, that another has replaced its result; between that check and the write
the other run can still replace it, and the write then lands in (or recreates) the new one.
Two runs on one machine or one shared file system never get there: :func:`segpipe.segment`
holds :func:`result_lock` from before it prepares its result until after it finalises it, and
:func:`~segpipe.results.store.delete_result` while it deletes, so a second run stops at once
with :class:`ResultBusyError`, before it writes anything.

The kernel releases a ``flock`` when its holder's last descriptor closes, so a run killed
(SIGKILL, the OOM killer) frees its result at once and the next run resumes it. What the lock
does not cover: a result at a URL (object storage has no locks; the stamp alone guards it),
and the tasks of a run whose driver died while its cluster's workers go on: the lock went with
the driver and those tasks are stopped only by the stamp. Such a late write by path, into a
result a new run has renamed away, makes the folders of its chunk anew: a folder of chunks
with no ``zarr.json``, which the next run recognises (:func:`is_debris`) and removes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from segpipe.io.files import URLPath
from segpipe.io.locks import StoreBusyError, store_lock
from segpipe.results.tiles import check_not_replaced, result_started

__all__ = ["ResultBusyError", "is_debris", "result_lock", "result_read"]


class ResultBusyError(StoreBusyError):
    """Another run holds the lock of the result asked for: it is writing or deleting that
    result now (:func:`result_lock`)."""


def result_lock(path: str | os.PathLike[str] | URLPath) -> contextlib.AbstractContextManager[None]:
    """Hold the run lock of the result at ``path`` while the body runs: exclusively, as
    :func:`segpipe.io.locks.store_lock` holds one (its file ``.<name>.lock`` beside the
    result), raising :class:`ResultBusyError` at once where another run holds it.

    A result at a URL (:class:`~segpipe.io.files.URLPath`, object storage) takes no lock:
    the body runs unguarded by one, and the ``started`` stamp is its only protection.
    """
    return store_lock(path, busy=ResultBusyError, after_kill=", and its result resumes")


@contextlib.contextmanager
def result_read(path: str | os.PathLike[str] | URLPath) -> Iterator[Callable[[], None]]:
    """Hold the result at ``path`` shared while the body reads it (an export): a run that
    would replace or delete it stops with :class:`ResultBusyError`. Yields a check, raising
    :class:`~segpipe.results.ResultReplacedError`, that it is still the result the body began
    with: all a result at a URL, which takes no lock, has before its reader publishes."""
    started = result_started(path)
    with store_lock(path, shared=True, busy=ResultBusyError):
        yield functools.partial(check_not_replaced, path, started)


# The arrays whose chunks a run writes after its skeleton, in any layout (schema.level_path,
# label_path; layout.PROGRESS, COUNTS), as patterns of their keys' parts. Never a zarr.json:
# only a skeleton writes those, and it is renamed into place whole.
_WRITTEN_ARRAYS = (
    ("[0-9]+", "mask|probabilities"),  # layouts 2-3: level k's
    ("mask|probabilities",),  # layout 1: level 0's, at the root
    ("levels", "[0-9]+", "mask|probabilities"),  # layout 1: level k's
    ("labels", "[^/]+", "[0-9]+", "[^/]+"),  # a label image's level k, layouts 2-3
    ("labels", "[^/]+", "[0-9]+"),  # layout 1
    ("_segpipe", "tiles_done|class_pixels"),
)
# A chunk's last key part, or the file of its write cut short (zarr's LocalStore writes
# ``<part>.<uuid hex>.partial`` and renames it).
_LAST_INDEX = re.compile(r"[0-9]+(\.[0-9a-f]+\.partial)?")


def is_debris(path: Path) -> bool:
    """Whether the folder at ``path`` holds nothing but what late writes by path leave there
    once the result has been renamed away: chunks of a result's arrays (``0/mask/c/1/2``,
    ``_segpipe/tiles_done/c/0/0``), a chunk write cut short, and the folders on their way;
    no ``zarr.json`` (a root's or a user's group's) and no link anywhere, and a chunk or an
    array's chunk folder (``0/mask/c``: a write killed between its mkdir and its chunk) at
    least. Folders named like levels alone (``1/``, ``2/mask``: a user's), a link, or anything
    else are not: never deleted as debris."""
    if path.is_symlink() or not path.is_dir():
        return False
    written = False
    for folder, folders, files in os.walk(path):
        for name in folders + files:
            entry = Path(folder, name)
            key = entry.relative_to(path).as_posix()
            if entry.is_symlink() or not _is_written_key(key, folder=name in folders):
                return False
            written = written or name not in folders or _reaches_chunks(key)
    return written


def _reaches_chunks(key: str) -> bool:
    """Whether folder ``key`` is an array's chunk folder (``<array>/c``) or one inside it."""
    parts = key.split("/")
    return any(
        len(parts) > len(array)
        and all(re.fullmatch(p, s) for p, s in zip(array, parts, strict=False))
        and parts[len(array)] == "c"
        for array in _WRITTEN_ARRAYS
    )


def _is_written_key(key: str, *, folder: bool) -> bool:
    """Whether ``key`` is a chunk of :data:`_WRITTEN_ARRAYS` (``<array>/c/<i>/<j>...``), or
    with ``folder`` a folder on the way to one."""
    parts = key.split("/")
    for array in _WRITTEN_ARRAYS:
        pattern = (*array, "c")
        head, index = parts[: len(pattern)], parts[len(pattern) :]
        if not all(re.fullmatch(p, s) for p, s in zip(pattern, head, strict=False)):
            continue
        if folder and all(s.isdigit() and s.isascii() for s in index):
            return True
        if not folder and len(head) == len(pattern) and index:
            *inner, last = index
            if all(s.isdigit() and s.isascii() for s in inner) and _LAST_INDEX.fullmatch(last):
                return True
    return False
