"""An image already in memory behind the :class:`~segpipe.io.readers.Reader` protocol.

Training images, validation images and test fixtures are numpy arrays; wrapping one in an
:class:`ArrayReader` lets the code that reads files (mirrored windows, the overlap-tile
stitcher) read it too, so in-memory prediction and the Dask pipeline share one path.

>>> reader = ArrayReader(np.arange(12, dtype=np.uint8).reshape(3, 4))
>>> reader.shape, reader.dtype
((3, 4, 1), dtype('uint8'))
>>> reader.read(1, 3, 0, 2)[..., 0].tolist()
[[4, 5], [8, 9]]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from dask.base import tokenize

from segpipe.io.readers.base import BaseReader, ImageReadError

__all__ = ["ArrayReader"]


class ArrayReader(BaseReader):
    """A ``(Y, X)`` or ``(Y, X, C)`` numpy array as a one-level reader (no copy).

    Parameters
    ----------
    array
        The pixels, in any dtype :func:`segpipe.geometry.pixels.unit_scale` knows; a 2-D array
        reads as one channel.
    pixel_size_um
        Microns per pixel, if known.
    name
        What ``path`` (and error messages) call the array.
    """

    def __init__(
        self,
        array: np.ndarray,
        *,
        pixel_size_um: float | None = None,
        name: str = "<in-memory array>",
    ) -> None:
        super().__init__(Path(name), pixel_size_um)
        if array.ndim not in (2, 3):
            raise ImageReadError(
                f"{name}: an in-memory image must be (Y, X) or (Y, X, C), got shape {array.shape}"
            )
        self._array = array
        self._set_layout(
            ["YX" if array.ndim == 2 else "YXC"], [array.shape], [array.shape], array.dtype
        )

    def _open_level(self, level: int) -> np.ndarray:
        return self._array

    def _token(self) -> tuple[Any, ...]:
        # No file to stat: the pixels themselves name the array (dask keys must differ
        # between two arrays of the same name).
        return (type(self).__name__, self.path, tokenize(self._array))
