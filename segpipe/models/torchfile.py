"""A torch file's bytes, read whole and checked before torch reads them.

``torch.save`` writes a zip archive whose entries carry CRC-32 checksums that ``torch.load``
and ``torch.jit.load`` never check: a flipped bit loads another model without a word. The
readers here check every entry first, and that the archive is the file's (torch takes the end
record's offsets from the file's start, zipfile wherever the archive starts).
"""

from __future__ import annotations

import io
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "bytes_before", "read_payload"]


class CheckpointError(ValueError):
    """A file that is not a usable segpipe checkpoint, or cannot be written; names the file."""


# What zipfile and torch.load raise on bytes that are not what they expect: a flipped byte in
# a zip header reaches zipfile's name decoding (UnicodeDecodeError, a ValueError), a size
# (OverflowError, a negative seek) or torch's record parsing (ValueError, IndexError).
_UNREADABLE = (OSError, EOFError, RuntimeError, ValueError, LookupError, OverflowError,
               zlib.error, zipfile.BadZipFile)  # fmt: skip


def read_payload(path: Path) -> Any:
    """What ``torch.load(..., weights_only=True)`` gives for segpipe's torch file at ``path``
    (a checkpoint, a training state), read from bytes checked whole and undamaged
    (:func:`_read_archive`), so what loads is what was verified; :class:`CheckpointError`
    naming the file when it cannot be read."""
    data = _read_archive(path)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refuses anything but tensors and plain containers; a file that has
        # them is either not ours or was written with arbitrary objects inside.
        raise CheckpointError(
            f"{path} is not a segpipe checkpoint, or holds Python objects that weights-only "
            f"loading refuses to unpickle (segpipe never runs code from a checkpoint): {err}"
        ) from err
    except _UNREADABLE as err:
        raise CheckpointError(
            f"{path} is not a segpipe checkpoint (torch.load cannot read it: {err})"
        ) from err


def bytes_before(archive: zipfile.ZipFile) -> int:
    """How far into its file ``archive`` starts (0 as torch writes one). zipfile reads the
    archive the last end record names wherever it starts; torch's reader takes the record's
    offsets from the file's start: with bytes before it (two files joined), torch reads other
    entries than the ones zipfile checked."""
    return min((i.header_offset for i in archive.infolist()), default=0)


def _read_archive(path: Path) -> bytes:
    """The bytes of ``path``, a whole zip archive whose every entry passes its CRC-32 check."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read: {err}") from err
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            # Under 1 ms per MB (0.5 ms for tissue-unet): the bytes are in memory already.
            damaged = archive.testzip()
            # torch's reader (miniz) takes an entry with the MS-DOS folder bit for a folder and
            # reads nothing into its tensor: one flipped bit, and other weights load.
            folders = [i.filename for i in archive.infolist() if i.external_attr & 0x10]
            names = archive.namelist()
            prepended = bytes_before(archive)
    except _UNREADABLE as err:
        raise CheckpointError(
            f"{path} is not a segpipe checkpoint, or is cut short (a half-written file from an "
            f"interrupted save looks like this): it is not a whole zip archive as torch.save "
            f"writes ({err}). Save the model again or copy the file again from its source."
        ) from err
    if prepended:
        raise CheckpointError(
            f"{path} is not a segpipe checkpoint as torch.save writes one: its zip archive "
            f"starts {prepended:,} bytes into the file (two files joined?), and torch would "
            "read other bytes than the ones checked. Copy the file again from its source."
        )
    if any("/code/" in n or n.endswith("archive_format") for n in names):
        # torch.load would hand a TorchScript archive to torch.jit.load, even weights-only.
        raise CheckpointError(
            f"{path} is a TorchScript or torch.export file, not a checkpoint: describe "
            f"it in a sidecar {path.name}.json (segpipe.models.write_sidecar: "
            "class_names, geometry, pixel contract) to load it as a model"
        )
    if damaged is not None or folders:
        raise CheckpointError(
            f"{path} is damaged: its entry {damaged or folders[0]!r} fails its CRC check or is "
            "marked a folder, so its bytes changed after torch.save wrote them. Copy the file "
            "again from its source or save it again."
        )
    return data
