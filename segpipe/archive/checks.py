"""Run-wide checks of an archive run: what every image would fail on with the same reason,
refused once, before any image is read or recorded."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from typing import Any

from segpipe.config import SegmentConfig
from segpipe.execution.foreground import FOREGROUND_MODES
from segpipe.io.files import location
from segpipe.io.maskfiles import mask_file_sha256

__all__ = ["check_output_root", "check_run_inputs"]


def check_output_root(
    output_root: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> None:
    """Refuse an output root that cannot be written: creates it, then writes and removes a
    hidden probe file."""
    root = location(output_root, storage_options)
    probe = root.joinpath(f".segpipe-probe-{uuid.uuid4().hex}")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OSError(
            f"output_root {root} cannot be written ({exc.strerror or exc}); give a folder "
            "this run may write to"
        ) from exc


def check_run_inputs(
    output_root: str | os.PathLike[str],
    config: SegmentConfig | None,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """A foreground mask file of ``config`` that cannot be read (each image hashes it: a
    missing one failed every image of every run, unrecorded), then :func:`check_output_root`
    (last: it makes the root)."""
    foreground = (config or SegmentConfig()).foreground
    if foreground not in FOREGROUND_MODES:
        try:
            mask_file_sha256(foreground)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"foreground mask {foreground} cannot be read ({exc.strerror or exc}): give a "
                f"mask image or GeoJSON file, or one of {', '.join(FOREGROUND_MODES)}",
            ) from exc
    check_output_root(output_root, storage_options)
