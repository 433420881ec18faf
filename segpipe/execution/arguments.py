"""The types :func:`segpipe.segment` takes, checked before any work: a wrong one otherwise
fails deep in the run with a raw error (a dict config: ``'dict' object has no attribute
'replace'``; an array source: ``no attribute 'path'``)."""

from __future__ import annotations

import os
from typing import Any

import torch

from segpipe.config import SegmentConfig
from segpipe.io.files import URLPath
from segpipe.io.readers import Reader

__all__ = ["check_arguments"]


def check_arguments(source: Any, output: Any, model: Any, config: Any) -> None:
    """TypeError naming the argument and the type it got."""
    paths = (str, os.PathLike, URLPath)
    if not isinstance(source, paths) and not isinstance(source, Reader):
        hint = (
            " (wrap an array in segpipe.io.readers.ArrayReader)" if hasattr(source, "shape") else ""
        )
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
