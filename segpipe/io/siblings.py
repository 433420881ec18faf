"""The hidden files a run keeps beside a local store or file it makes: ``.<name>.<kind>-*``
(a copy being built, one being deleted, scratch space), and room for them in a name."""

from __future__ import annotations

import glob
import os
import uuid
from pathlib import Path

__all__ = ["check_name_room", "sibling_name", "siblings"]


def sibling_name(path: Path, kind: str) -> Path:
    """The hidden ``.<name>.<kind>-<12 hex digits>`` beside local ``path`` (a copy being built,
    one being deleted); ValueError naming ``path`` where its name leaves no room for it."""
    sibling = f".{path.name}.{kind}-{uuid.uuid4().hex[:12]}"
    check_name_room(path, sibling)
    return path.with_name(sibling)


def check_name_room(path: Path, sibling: str) -> None:
    """Refuse ``path`` whose name is too long for the name ``sibling`` (made of it) of a file
    beside it: a name holds at most 255 bytes (NAME_MAX), and the error named a hidden file
    the user never typed."""
    if len(os.fsencode(sibling)) > 255:
        size = len(os.fsencode(path.name))
        raise ValueError(
            f"{path}: its name is {size} bytes, too long for segpipe's hidden file beside it "
            f"({sibling[:24]}...; a name holds at most 255): give a name of at most "
            f"{255 - len(os.fsencode(sibling)) + size} bytes"
        )


def siblings(path: Path, kind: str) -> list[Path]:
    """The hidden ``.<name>.<kind>-*`` entries a run makes beside local ``path`` (a copy being
    built, one being deleted, scratch space): what a killed run leaves there."""
    return list(path.parent.glob(glob.escape(f".{path.name}.{kind}-") + "*"))
