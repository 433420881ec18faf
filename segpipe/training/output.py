"""Where a trained model goes: its output checked before training, placed after it.

:func:`check_output` refuses, before hours of training, an output that cannot take the model;
:func:`place_file` puts the finished file there without replacing, unless told to, a file
that appeared in the meantime (another run's model, a user's file).
"""

from __future__ import annotations

import os
from pathlib import Path

from segpipe.atomic import check_overwrite, check_writable
from segpipe.io.files import location
from segpipe.io.places import check_replaceable

__all__ = ["check_output", "place_file"]


def check_output(output: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """The local checkpoint file ``output`` names, checked before anything is trained for it.

    Raises ValueError for a URL (checkpoints are local files) or an existing folder or other
    non-file, FileExistsError for an existing file unless ``overwrite``, and OSError naming
    it when no file can be made in its nearest existing folder
    (:func:`~segpipe.training.save_trained` makes the missing ones).
    """
    check_overwrite(overwrite)
    path = location(output)
    if not isinstance(path, Path):
        raise ValueError(f"{output}: checkpoints are local files; write one here, then copy it")
    if path.is_dir() or (path.exists() and not path.is_file()):
        raise ValueError(f"{path} exists and is not a file: name a checkpoint file to write")
    # A link to nothing is a name taken too: the model would be refused it after training.
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise FileExistsError(
            f"{path} exists: replace it with overwrite=True (segpipe train --overwrite), or "
            "name another file"
        )
    if path.is_file():  # a torch checkpoint is a zip; an image given by mistake is not
        check_replaceable(path, "checkpoint", b"PK\x03\x04")
    check_writable(path)
    return path


def place_file(written: Path, path: Path, *, overwrite: bool) -> None:
    """Put the whole file ``written`` at ``path`` (a file of its folder). Without
    ``overwrite`` a file already at ``path`` is never replaced, even one made an instant
    before: FileExistsError, ``written`` kept beside it under a name of its own."""
    check_overwrite(overwrite)
    if overwrite:
        try:
            os.replace(written, path)
        except OSError as err:  # a folder there, a read-only file system
            raise OSError(err.errno, f"{path} cannot be written: {err.strerror}") from err
        return
    try:
        # A hard link is made only where no file is: no moment between a check and a rename
        # in which another process's file could be replaced.
        os.link(written, path)
        return
    except FileExistsError:
        pass
    except OSError:  # no hard links here (some network and FUSE file systems)
        if not path.exists() and not path.is_symlink():
            os.replace(written, path)
            return
    # Hours of training are not thrown away for a name: the file is kept under one of this
    # process's own (a file of that name can only be an earlier refusal's of this process).
    # Cut to NAME_MAX (255 bytes) with its tag: "could not be kept" deleted the model.
    tag = f".unsaved-{os.getpid()}{path.suffix}"
    stem = os.fsencode(path.stem)[: 255 - len(os.fsencode(tag))].decode("utf-8", "ignore")
    kept = path.with_name(stem + tag)
    try:
        os.replace(written, kept)
    except OSError:  # a name too long, a folder there
        kept_at = "the trained model could not be kept"
    else:
        kept_at = f"the trained model is at {kept}"
    raise FileExistsError(
        f"{path} exists and was left as it is: {kept_at}; replace it with overwrite=True "
        "(segpipe train --overwrite), or name another file"
    )
