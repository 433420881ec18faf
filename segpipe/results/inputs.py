"""The files a result is made of, which writing, replacing or deleting it never destroys: its
source image, its model's checkpoint and its foreground mask file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from segpipe.io.files import URLPath
from segpipe.io.places import overlap
from segpipe.results.schema import ResultMismatchError, read_attrs

__all__ = ["check_holds_no_input", "check_not_source", "checkpoint_files", "inputs_of"]


def check_not_source(path: Path | URLPath, source: str, *inputs: str) -> None:
    """Raise ``ResultMismatchError`` where ``path`` is the image ``source`` (or another input
    file, e.g. a foreground mask), lies inside it or holds it: refused before anything is
    written there, a run's lock file too (a replaced result is deleted with all it holds)."""
    for what, given in [("source image", source), *(("input", i) for i in inputs)]:
        if relation := overlap(path, given):
            raise ResultMismatchError(
                f"{path} {relation} the {what} {given}: no result is written, replaced or "
                "deleted there (that could destroy it); choose another output path"
            )


def check_holds_no_input(path: Path | URLPath) -> None:
    """Refuse to delete the result at ``path`` where it holds an input it was made of (a scan
    filed in it, its model's checkpoint), as its stored identity names them: read as stored,
    not parsed, so metadata this version cannot parse (a newer release's layout, a damaged
    setting) still names them."""
    if inputs := inputs_of(read_attrs(path).get("identity", {})):
        check_not_source(path, *inputs)


def inputs_of(identity: Mapping[str, Any]) -> list[str]:
    """The files a result of ``identity`` (``ResultMeta.identity()``, or as stored) is made
    of: its source image, its model's checkpoint where the model was one (its absolute path:
    not a shipped model's name, nor a module's class), and its mask file where it has one."""
    source, model, mask = (identity.get(k) for k in ("source", "model_name", "foreground"))
    files = [source, *_checkpoint(model), *([mask] if identity.get("foreground_sha256") else [])]
    return [f for f in files if isinstance(f, str)]


def checkpoint_files(model: object) -> list[str]:
    """The checkpoint file ``model`` names, absolute, as a run records it; none for a shipped
    model's name or a module."""
    if isinstance(model, str | os.PathLike) and os.path.isfile(model):
        return [os.path.abspath(model)]
    return []


def _checkpoint(model_name: object) -> list[str]:
    # A shipped model's name or a module's class, relative, names no file the run used.
    if isinstance(model_name, str) and ("://" in model_name or os.path.isabs(model_name)):
        return [model_name]
    return []
