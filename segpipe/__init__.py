"""segpipe: segment gigapixel images with U-Net/FCN models on Dask, stored as Zarr.

>>> import segpipe
>>> path = segpipe.segment("slide.svs", "slide.seg.zarr", "tissue-unet")   # doctest: +SKIP
>>> ds = segpipe.open_result(path)                                        # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "ingest", "open_image", "open_result", "segment"]

if TYPE_CHECKING:
    from segpipe.api import segment
    from segpipe.ingest import ingest
    from segpipe.readers import open_image
    from segpipe.results import open_result

# Loaded on first use: `import segpipe` must not pay for torch when a user only opens results.
_LAZY = {
    "segment": "segpipe.api",
    "open_result": "segpipe.results",
    "ingest": "segpipe.ingest",
    "open_image": "segpipe.readers",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'segpipe' has no attribute {name!r}")
