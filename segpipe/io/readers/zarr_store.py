"""The Zarr store an image is read through: one that refuses an empty object.

Zarr reads an empty shard file (an interrupted copy's, a disk's damage) as a shard of no
chunks, so its pixels read as the array's fill value, silently: a slide's tissue as zeros. No
Zarr writer leaves an object of zero bytes (an empty chunk or shard is not written at all), so
one is damage, named here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import LocalStore, StorePath, WrapperStore

__all__ = ["EmptyObjectError", "checked_store"]


class EmptyObjectError(ValueError):
    """An object of a Zarr store holds zero bytes."""


class _RefusingEmpty(WrapperStore[Store]):
    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        value = await self._store.get(key, prototype, byte_range)
        if value is not None and len(value) == 0:
            raise EmptyObjectError(
                f"{key}: an empty file (0 bytes) where Zarr data should be; the store is "
                "damaged (copy it again)"
            )
        return value

    async def get_partial_values(self, prototype: BufferPrototype, key_ranges: Any) -> Any:
        key_ranges = list(key_ranges)
        values = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), value in zip(key_ranges, values, strict=True):
            if value is not None and len(value) == 0:
                raise EmptyObjectError(f"{key}: an empty file (0 bytes) where Zarr data should be")
        return values


def checked_store(where: str | os.PathLike[str] | StorePath) -> StorePath:
    """``where`` (a local folder, or a :class:`~segpipe.io.files.URLPath`) to open with
    ``zarr.open`` read-only, through a store whose reads raise :class:`EmptyObjectError`
    (naming the object's key) for an object of zero bytes."""
    if isinstance(where, StorePath):
        return StorePath(_RefusingEmpty(where.store), where.path)
    return StorePath(_RefusingEmpty(LocalStore(Path(where), read_only=True)))
