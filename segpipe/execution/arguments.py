"""The types :func:`segpipe.segment` takes, checked before any work: a wrong one otherwise
fails deep in the run with a raw error (a dict config: ``'dict' object has no attribute
'replace'``; an array source: ``no attribute 'path'``)."""

from __future__ import annotations

import os
from typing import Any

import dask.array as da
import numpy as np
import torch

from segpipe.config import SegmentConfig
from segpipe.io.files import URLPath

__all__ = ["check_arguments", "check_reader_settings"]

# What every run reads of a source given as a reader. Not the whole ``Reader`` protocol:
# duck-typed readers without ``shape`` or ``level`` segment (``level`` is read only for a
# foreground mask computed from the pixels, "tissue" or "nodata").
_READER_MEMBERS = ("path", "pixel_size_um", "level_shapes", "dtype", "read")


def check_arguments(source: Any, output: Any, model: Any, config: Any) -> None:
    """TypeError naming the argument and the type it got (and a reader's missing members)."""
    paths = (str, os.PathLike, URLPath)
    missing = [m for m in _READER_MEMBERS if not hasattr(source, m)]
    if not isinstance(source, paths) and missing:
        hint = ""
        if isinstance(source, np.ndarray | da.Array):
            hint = " (wrap an array in segpipe.io.readers.ArrayReader)"
        elif len(missing) < len(_READER_MEMBERS):  # meant as a reader: say what it lacks
            hint = f" (a Reader needs {', '.join(missing)})"
        raise TypeError(
            f"source must be an image path or a Reader, got {type(source).__name__}{hint}"
        )
    if not isinstance(output, paths):
        raise TypeError(f"output must be a path, got {type(output).__name__}")
    if not isinstance(model, paths) and not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"model must be a shipped model's name, a checkpoint path or a torch.nn.Module, "
            f"got {type(model).__name__}"
        )
    if config is not None and not isinstance(config, SegmentConfig):
        raise TypeError(
            f"config must be a SegmentConfig, got {type(config).__name__} (settings from a "
            "mapping: segment(source, output, **settings) or SegmentConfig(**settings))"
        )


def check_reader_settings(source: Any, config: SegmentConfig) -> None:
    """ValueError where ``config`` sets what a ``source`` given as a reader says itself: its
    pixel size. Only a path is opened with ``pixel_size_um``; a reader's own size went on
    choosing the level, the foreground and the result's areas, while the result recorded
    the setting as applied."""
    paths = (str, os.PathLike, URLPath)
    if isinstance(source, paths) or config.pixel_size_um is None:
        return
    own = getattr(source, "pixel_size_um", None)
    if own is None or abs(own - config.pixel_size_um) > 1e-9 * own:
        raise ValueError(
            f"pixel_size_um={config.pixel_size_um} set, but the source is a reader, whose "
            f"pixel size ({own} um/px) is its own: open it with the size "
            "(segpipe.open_image(path, pixel_size_um=...), ArrayReader(array, "
            "pixel_size_um=...)), or pass the image's path"
        )
