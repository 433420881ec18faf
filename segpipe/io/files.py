"""Small file rules every writer shares: atomic JSON records and their UTC timestamps."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["utc_now", "write_json_atomic"]


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (``"2026-11-29T17:20:00+00:00"``)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def write_json_atomic(path: str | os.PathLike[str], data: Mapping[str, Any]) -> Path:
    """Write ``data`` as JSON so that readers see the old file or the new one, never half.

    The text goes to a temporary file in the same directory, then replaces ``path`` in one
    rename (atomic on POSIX file systems); a failure leaves no temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path
