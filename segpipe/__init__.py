"""segpipe: segment gigapixel images with U-Net/FCN models on Dask, stored as Zarr.

>>> import segpipe
>>> path = segpipe.segment("slide.svs", "slide.seg.zarr", "tissue-unet")   # doctest: +SKIP
>>> ds = segpipe.open_result(path)                                        # doctest: +SKIP

The subpackages, lowest layer first (each imports only from those before it; ARCHITECTURE.md
draws the data flow): ``geometry``, ``models``, ``io``, ``synthetic``, ``results``,
``execution``, ``analysis``, ``training``, ``archive``, ``flows``, ``cli``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from segpipe.version import __version__

__all__ = [
    "SegmentConfig",
    "__version__",
    "ingest",
    "keep_freed_memory",
    "open_image",
    "open_result",
    "segment",
]

if TYPE_CHECKING:
    from segpipe.config import SegmentConfig
    from segpipe.execution.allocator import keep_freed_memory
    from segpipe.execution.segment import segment
    from segpipe.io.ingest import ingest
    from segpipe.io.readers import open_image
    from segpipe.results import open_result

# Loaded on first use: `import segpipe` must not pay for torch when a user only opens results.
_LAZY = {
    "SegmentConfig": "segpipe.config",
    "segment": "segpipe.execution.segment",
    "open_result": "segpipe.results",
    "ingest": "segpipe.io.ingest",
    "keep_freed_memory": "segpipe.execution.allocator",
    "open_image": "segpipe.io.readers",
}
# `import segpipe; segpipe.models.build(...)` works without importing the submodule first.
_SUBPACKAGES = frozenset(
    {
        "analysis",
        "archive",
        "config",
        "execution",
        "flows",
        "geometry",
        "io",
        "models",
        "palette",
        "progress",
        "query",
        "results",
        "synthetic",
        "training",
        "vectors",
    }
)


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"segpipe.{name}")
    raise AttributeError(f"module 'segpipe' has no attribute {name!r}")
