"""Creating and deleting a result at an fsspec URL (``s3://...``), where nothing renames.

A store is a segpipe result when its root ``zarr.json`` carries the ``segpipe`` attribute
(:func:`segpipe.results.schema.is_result`), and an object store shows every object whole or not
at all (one PUT). So the order of the writes does what a rename does on a local disk:

- creating: the skeleton is made in memory, every object but the root
  ``zarr.json`` is uploaded, the root ``zarr.json`` last;
- deleting: the root ``zarr.json`` goes first (the prefix stops being a result), then the rest.

A marker object beside the result, ``.<name>.creating`` (listing the keys the creation
writes) or ``.<name>.deleting``, is written before either starts and removed after it. A
creation that fails removes what it wrote; what a run killed halfway leaves is known by its
marker and removed by a later run (:func:`remove_leftovers`). Objects at the prefix that no
marker lists and no result's root holds are someone's data, which segpipe never deletes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

from segpipe.faults import fault_point
from segpipe.io.files import URLPath, remove_literal
from segpipe.results.layout import layout_documents
from segpipe.results.schema import ResultMeta, ResultMismatchError

__all__ = ["create", "delete", "remove_leftovers"]

_ROOT = "zarr.json"


def _marker(url: URLPath, kind: str) -> URLPath:
    return url.with_name(f".{url.name}.{kind}")


def create(url: URLPath, meta: ResultMeta) -> None:
    """Create the empty result of ``meta`` at ``url``, its root ``zarr.json`` written last."""
    objects = layout_documents(meta)
    marker = _marker(url, "creating")
    # Listed before any is written: a kill's leftovers are these, nothing else at the prefix.
    try:
        marker.write_text(json.dumps(sorted(objects)))
    except FileNotFoundError as exc:  # no such bucket: named as the result, not its marker
        raise FileNotFoundError(exc.errno, exc.strerror or str(exc), str(url)) from exc
    root_json = objects.pop(_ROOT)
    fs, root = url.filesystem()
    root = root.rstrip("/")
    try:
        fs.pipe({f"{root}/{key}": data for key, data in objects.items()})
        fault_point("result.skeleton")
        fs.pipe_file(f"{root}/{_ROOT}", root_json)
    except BaseException:
        _remove_creation(url, [_ROOT, *objects])
        raise
    marker.unlink(missing_ok=True)


def delete(url: URLPath) -> None:
    """Delete the result at ``url``: its root ``zarr.json`` first, then every other object."""
    marker = _marker(url, "deleting")
    marker.write_bytes(b"")
    _remove_all(url)
    marker.unlink(missing_ok=True)


def remove_leftovers(url: URLPath, *, older_than_s: float) -> None:
    """Remove what a killed run left at ``url``: a half-deleted or a half-created result.

    A half-created one lies at ``url`` itself: once its marker is older than ``older_than_s``
    the objects the marker lists are removed (anything written at the prefix since is kept);
    a younger one may be a run creating the result right now, and is refused. An earlier
    release's marker lists nothing: once old, everything at the prefix is removed, as that
    release did.
    """
    if _marker(url, "deleting").exists():
        delete(url)
    creating = _marker(url, "creating")
    try:
        age = time.time() - creating.modified()
        # A marker of a release before the list is empty (None: what was at the prefix).
        keys = json.loads(creating.read_bytes() or b"null")
    except FileNotFoundError:
        return
    if url.joinpath(_ROOT).exists():  # only the marker's removal was lost
        creating.unlink(missing_ok=True)
        return
    if age <= older_than_s:
        raise ResultMismatchError(
            f"{url} is being created by another run, or was left half-created by a run "
            f"killed {age:.0f} s ago (marker {creating}); if no run is creating it, run "
            f"again in {older_than_s - age:.0f} s, when its objects are removed"
        )
    if keys is None:  # that release's rule, once old: the prefix was its creation's alone
        _remove_all(url)
        creating.unlink(missing_ok=True)
        return
    _remove_creation(url, keys)


def _remove_creation(url: URLPath, keys: Iterable[str]) -> None:
    """Remove the objects of ``keys`` (below ``url``) a creation wrote, and nothing else
    there, then its marker."""
    fs, root = url.filesystem()
    root = root.rstrip("/")
    there = set(fs.find(root))  # one listing, not a request for each key the marker lists
    remove_literal(fs, [path for path in (f"{root}/{key}" for key in keys) if path in there])
    _marker(url, "creating").unlink(missing_ok=True)


def _remove_all(url: URLPath) -> None:
    fs, root = url.filesystem()
    url.joinpath(_ROOT).unlink(missing_ok=True)
    remove_literal(fs, root.rstrip("/"), recursive=True)
