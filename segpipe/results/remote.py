"""Creating and deleting a result at an fsspec URL (``s3://...``), where nothing renames.

A store is a segpipe result when its root ``zarr.json`` carries the ``segpipe`` attribute
(:func:`segpipe.results.schema.is_result`), and an object store shows every object whole or not
at all (one PUT). So the order of the writes does what a rename does on a local disk:

- creating: the skeleton is made in memory, every object but the root
  ``zarr.json`` is uploaded, the root ``zarr.json`` last;
- deleting: the root ``zarr.json`` goes first (the prefix stops being a result), then the rest.

A marker object beside the result, ``.<name>.creating`` or ``.<name>.deleting``, is written
before either starts and removed after it. The objects a run killed halfway leaves are known by
it and removed by the next run (:func:`remove_leftovers`); objects at the prefix without a
marker and without a result's root are someone's data, which segpipe never deletes.
"""

from __future__ import annotations

from segpipe.faults import fault_point
from segpipe.io.files import URLPath
from segpipe.results.layout import layout_documents
from segpipe.results.schema import ResultMeta

__all__ = ["create", "delete", "remove_leftovers"]

_ROOT = "zarr.json"


def _marker(url: URLPath, kind: str) -> URLPath:
    return url.with_name(f".{url.name}.{kind}")


def create(url: URLPath, meta: ResultMeta) -> None:
    """Create the empty result of ``meta`` at ``url``, its root ``zarr.json`` written last."""
    marker = _marker(url, "creating")
    marker.write_bytes(b"")
    objects = layout_documents(meta)
    root_json = objects.pop(_ROOT)
    fs, root = url.filesystem()
    root = root.rstrip("/")
    fs.pipe({f"{root}/{key}": data for key, data in objects.items()})
    fault_point("result.skeleton")
    fs.pipe_file(f"{root}/{_ROOT}", root_json)
    marker.unlink(missing_ok=True)


def delete(url: URLPath) -> None:
    """Delete the result at ``url``: its root ``zarr.json`` first, then every other object."""
    marker = _marker(url, "deleting")
    marker.write_bytes(b"")
    _remove_all(url)
    marker.unlink(missing_ok=True)


def remove_leftovers(url: URLPath) -> None:
    """Remove what a killed run left at ``url``: a half-deleted or a half-created result.

    Unlike a local skeleton, which is built beside its path, a half-created result lies at
    ``url`` itself and would block every later run, so it is removed whatever its age. A run
    creating the same result right now writes the same skeleton again (runs of one image are
    kept apart by the archive's claims).
    """
    if _marker(url, "deleting").exists():
        delete(url)
    creating = _marker(url, "creating")
    if not creating.exists():
        return
    if not url.joinpath(_ROOT).exists():
        _remove_all(url)
    # else the root was written and only the marker's removal was lost
    creating.unlink(missing_ok=True)


def _remove_all(url: URLPath) -> None:
    fs, root = url.filesystem()
    root = root.rstrip("/")
    url.joinpath(_ROOT).unlink(missing_ok=True)
    if fs.exists(root):
        fs.rm(root, recursive=True)
