"""Labelled images from folders, and labels with gaps between touching objects.

A :class:`~segpipe.analysis.evaluation.LabelledImage` is an image with its class labels and,
optionally, object instances. :class:`segpipe.synthetic.SyntheticSlide` is one;
:func:`read_folder` makes them (:class:`FolderImage`) from files::

    folder/
      images/     a.png  b.tif  ...      RGB, grey or multiband; uint8, uint16 or float
      labels/     a.png  b.tif  ...      one channel, class id per pixel, same stem and shape
      instances/  a.png  b.tif  ...      optional: object id per pixel, 0 outside objects
      classes.txt                        optional: one class name per line, in id order

Files are read with :func:`segpipe.open_image`, so PNG, TIFF (also OME-TIFF) and Zarr work.
Images are read whole into memory: this is for training-sized images, not slides. They keep
their dtype and channels (a grey image stays one channel, a 16-bit one 16-bit): how pixels
become model input is the model's pixel contract (:mod:`segpipe.models.contract`), measured on
the training images (:func:`segpipe.training.config.pixel_contract_for`). All images of a
folder must share one dtype and one channel count.

Training draws (input window, label crop) pairs from such images
(:mod:`segpipe.training.sampling`) and augments them (:mod:`segpipe.training.augmentation`);
its validation images must be held out (:func:`check_held_out`).
:func:`separate_touching` gives the labels the U-Net paper's gaps between touching objects.
"""

from __future__ import annotations

import hashlib
import os
import reprlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
from scipy import ndimage

from segpipe.analysis.evaluation import LabelledImage
from segpipe.io.labelfiles import label_plane
from segpipe.io.readers import open_image
from segpipe.results.schema import MAX_CLASSES

__all__ = [
    "FolderImage",
    "check_held_out",
    "class_names_of",
    "common_pixel_size",
    "pixel_kind",
    "read_folder",
    "separate_touching",
    "touching_borders",
    "warn_mixed_pixel_sizes",
]

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".ome.tif", ".ome.tiff", ".jpg", ".jpeg", ".zarr")


T = TypeVar("T", bound=LabelledImage)


@dataclass(frozen=True)
class FolderImage:
    """One (image, labels[, instances]) triple read from a folder; a :class:`LabelledImage`."""

    image: np.ndarray
    labels: np.ndarray
    instances: np.ndarray | None
    class_names: tuple[str, ...]
    name: str
    pixel_size_um: float | None = None
    path: Path | None = None  # the image file, named in messages

    def __post_init__(self) -> None:
        shape = self.labels.shape
        if self.image.shape[:2] != shape or (
            self.instances is not None and self.instances.shape != shape
        ):
            instances = None if self.instances is None else self.instances.shape
            raise ValueError(
                f"{self.path or self.name}: image {self.image.shape[:2]}, labels {shape} and "
                f"instances {instances} differ in shape"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.labels.shape[0]), int(self.labels.shape[1]))


def touching_borders(instances: np.ndarray) -> np.ndarray:
    """``(Y, X)`` bool: object pixels 4-adjacent to a pixel of **another** object.

    >>> touching_borders(np.array([[1, 1, 2, 2, 0, 3]])).astype(int).tolist()
    [[0, 1, 1, 0, 0, 0]]
    """
    out = np.zeros(instances.shape, dtype=bool)
    for axis in (0, 1):
        a = np.moveaxis(instances, axis, 0)
        o = np.moveaxis(out, axis, 0)
        differ = (a[1:] != a[:-1]) & (a[1:] != 0) & (a[:-1] != 0)
        o[1:] |= differ
        o[:-1] |= differ
    return out


def separate_touching(item: T) -> T:
    """``item`` with a gap drawn between touching objects, as the U-Net paper's annotations have.

    Object pixels that touch another object (:func:`touching_borders`) get the class that
    surrounds objects (the commonest class of the non-object pixels next to them) and instance
    id 0. A semantic model can only keep touching objects apart if its labels do: on labels
    where they share an edge, even a perfect prediction is one connected blob per cluster.
    The U-Net border weights then weigh exactly these gap pixels.
    """
    if item.instances is None:
        name = getattr(item, "path", None) or getattr(item, "name", None) or "the image"
        raise ValueError(
            f"separate_touching needs instance labels, and {name} has none (add its "
            "instances/ file, or train without separate_touching)"
        )
    border = touching_borders(item.instances)
    grown = ndimage.binary_dilation(item.instances > 0) & (item.instances == 0)
    around = item.labels[grown]
    fill = int(np.bincount(around.astype(np.int64)).argmax()) if around.size else 0
    labels = item.labels.copy()
    labels[border] = fill
    instances = item.instances.copy()
    instances[border] = 0
    return replace(item, labels=labels, instances=instances)  # type: ignore[type-var]


def _stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _by_stem(directory: Path) -> dict[str, Path]:
    """The images of ``directory`` by name stem; two of one stem (a.png and a.tif, B.PNG and
    B.png) refused: one was dropped, or paired with the other's labels, without a word."""
    found: dict[str, Path] = {}
    for p in sorted(directory.iterdir()):
        if not p.name.lower().endswith(IMAGE_SUFFIXES) or p.name.startswith("."):
            continue
        if (other := found.setdefault(_stem(p), p)) != p:
            raise ValueError(
                f"{other} and {p.name} share the name {_stem(p)!r}: which one is meant "
                "cannot be told; keep one of them"
            )
    return found


def _read_plane(path: Path, what: str) -> np.ndarray:
    # As evaluate reads truth: ids as stored (a palette's indices, a bool TIFF as written).
    plane = np.asarray(label_plane(path, what))
    # A signed mask's -1 ("ignore" in some tools) would wrap to id 255 in the uint8 labels.
    if plane.size and np.issubdtype(plane.dtype, np.signedinteger) and plane.min() < 0:
        raise ValueError(
            f"{path}: {what} must be ids >= 0, found {int(plane.min())}; give every pixel a "
            "class (0 for background)"
        )
    return plane


def _read_image(path: Path) -> tuple[np.ndarray, float | None]:
    """``(Y, X, C)`` pixels in the file's dtype, without a channel the reader names
    ``"alpha"`` (a 4-band TIFF whose fourth sample is not alpha is four bands, e.g. RGB +
    near infrared), and the pixel size (µm) the file gives. Its file closed after: a folder
    of thousands kept one open each until garbage collection."""
    reader = open_image(path)
    try:
        image = reader.read(0, reader.shape[0], 0, reader.shape[1])
        channels, pixel_size_um = getattr(reader, "channel_names", None), reader.pixel_size_um
    finally:
        getattr(reader, "close", lambda: None)()  # not in the Reader protocol
    if image.dtype.kind not in "uif":
        raise ValueError(
            f"{path}: images must hold integer or float pixels (uint8, uint16, float32...), "
            f"got {image.dtype}"
        )
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise ValueError(f"{path}: NaN or infinite pixels; fill them before training")
    if (channels or ())[-1:] == ("alpha",):
        image = image[..., :-1]  # RGBA, LA: alpha marks pixels, it is no image content
    return np.ascontiguousarray(image), pixel_size_um


def pixel_kind(image: np.ndarray) -> str:
    """``"uint16, 3 channel(s)"`` for a ``(Y, X, C)`` image: what a folder's images share."""
    return f"{image.dtype}, {image.shape[2]} channel(s)"


def common_pixel_size(images: Sequence[LabelledImage]) -> float | None:
    """The pixel size (µm) all ``images`` share, else None."""
    sizes = {getattr(i, "pixel_size_um", None) for i in images}
    return sizes.pop() if len(sizes) == 1 else None


def warn_mixed_pixel_sizes(images: Sequence[LabelledImage], where: str) -> None:
    """A warning naming ``where`` when ``images``' pixel sizes differ: a model recording
    none is run on level 0 of any image."""
    sizes = {getattr(i, "pixel_size_um", None) for i in images}
    if len(sizes) > 1:
        known = ", ".join(sorted(f"{p:g} µm" if p else "unknown" for p in sizes))
        warnings.warn(
            f"{where}: the training images' pixel sizes differ ({known}), so the model records "
            "none; give the one to record (TrainConfig.pixel_size_um, train --pixel-size)",
            stacklevel=3,
        )


def _check_alike(items: Sequence[FolderImage], root: Path) -> None:
    seen = {pixel_kind(i.image): i.name for i in items}
    if len(seen) > 1:
        raise ValueError(
            f"{root}: images must share one dtype and channel count, found "
            f"{'; '.join(f'{k} (e.g. {v})' for k, v in sorted(seen.items()))}; convert them "
            "to one kind"
        )


def _pixel_digest(image: np.ndarray) -> str:
    """SHA-256 of decoded pixels with their dtype and shape: the same image in any file format."""
    digest = hashlib.sha256(f"{image.dtype.str} {image.shape}".encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


def check_held_out(train: Sequence[FolderImage], val: Sequence[FolderImage]) -> None:
    """Raise ValueError when a validation image has the pixels of a training one, whatever
    its name (validation on training images reports what the model memorised, not how it
    does on new images). Names are not compared: folders numbered alike (``001.png`` in
    both) hold different images."""
    by_pixels = {_pixel_digest(t.image): t for t in train}
    for v in val:
        twin = by_pixels.get(_pixel_digest(v.image))
        if twin is not None:
            raise ValueError(
                f"validation image {v.path or v.name} has the same pixels as training image "
                f"{twin.path or twin.name}: validation images must be held out; remove it from "
                "one folder"
            )


def class_names_of(folder: str | os.PathLike[str]) -> tuple[str, ...] | None:
    """The names in ``folder/classes.txt`` (one per line, blank lines skipped), or None."""
    path = Path(folder) / "classes.txt"
    if not path.is_file():
        return None
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"{path}: class names must be distinct and at least one, got {names}")
    return names


def _names_differ(
    root: Path,
    own: tuple[str, ...],
    given: tuple[str, ...],
    names_from: str | os.PathLike[str],
) -> str:
    """The refusal of a folder whose classes.txt numbers its classes otherwise than
    ``names_from``'s."""
    other = Path(names_from) / "classes.txt"
    source = str(other) if other.is_file() else f"{names_from} (no classes.txt: numbered ids)"
    return (
        f"{root / 'classes.txt'} names the class ids {list(own)}, but {source} names them "
        f"{list(given)}: the same id must mean the same class in both; make the two lists "
        "alike (same names, same order)"
    )


def read_folder(
    folder: str | os.PathLike[str],
    *,
    class_names: Sequence[str] | None = None,
    names_from: str | os.PathLike[str] | None = None,
) -> list[FolderImage]:
    """Every (image, labels[, instances]) triple of ``folder``, matched by file stem.

    Parameters
    ----------
    folder
        A directory laid out as in the module docstring.
    class_names
        Names of the class ids; default ``folder/classes.txt``, else ``class_0..class_K`` for
        the largest id found. Given, they override ``folder/classes.txt``, unless
        ``names_from`` is given too.
    names_from
        The folder ``class_names`` are those of (a validation folder's training folder):
        ``folder/classes.txt``, when there is one, must then name the same classes in the
        same order, else the same id would mean two classes.

    Raises
    ------
    FileNotFoundError
        No ``images``/``labels`` directory, or an image without its label file.
    ValueError
        Shapes that differ, a label id beyond the class names, a negative or non-integer id,
        more than 256 classes (uint8 labels), an object id beyond int32, masks with several
        channels, a ``classes.txt`` that differs from the ``class_names`` of ``names_from``.
    """
    root = Path(folder)
    images_dir, labels_dir, instances_dir = (root / d for d in ("images", "labels", "instances"))
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise FileNotFoundError(
                f"{root} has no {d.name}/ directory; expected images/, labels/ and optionally "
                "instances/ with files of the same names"
            )
    images, labels = _by_stem(images_dir), _by_stem(labels_dir)
    instances = _by_stem(instances_dir) if instances_dir.is_dir() else {}
    if not images:
        raise FileNotFoundError(f"{images_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    missing = sorted(set(images) - set(labels))
    if missing:
        raise FileNotFoundError(f"{labels_dir} lacks label files for the images {missing}")
    # A label whose image was renamed or never copied would leave its example out unseen.
    if orphans := sorted((set(labels) | set(instances)) - set(images)):
        raise FileNotFoundError(
            f"{images_dir} lacks the images of the label or instance files {orphans}; add "
            "them, or move those files out"
        )
    # Given names override the folder's file, which is then not read (a damaged one too)
    own = class_names_of(root) if class_names is None or names_from is not None else None
    names = tuple(class_names) if class_names is not None else own
    if names_from is not None and own is not None and names is not None and names != own:
        # Read with the other folder's names, this folder's id 1 would be scored as another
        # class (per-class Dice swapped), without a word.
        raise ValueError(_names_differ(root, own, names, names_from))
    planes = {stem: _read_plane(labels[stem], "labels") for stem in images}
    top = max(int(p.max()) for p in planes.values())
    if names is None:
        ids = np.unique(np.concatenate([np.unique(p) for p in planes.values()]))
        if len(ids) < top + 1:  # a 0/255 mask would train 256 classes, 254 never seen
            raise ValueError(
                f"{labels_dir}: its labels hold the ids {reprlib.repr(ids.tolist())}, none of "
                f"{reprlib.repr(sorted(set(range(top)) - set(ids.tolist())))}: number the "
                "classes 0, 1, 2... (a 0/255 mask: map 255 to 1), or name every class in "
                "classes.txt"
            )
        names = tuple(f"class_{k}" for k in range(max(top + 1, 2)))
    if top >= len(names):
        stem = next(k for k, p in planes.items() if int(p.max()) >= len(names))
        raise ValueError(
            f"{labels[stem]}: label id {int(planes[stem].max())} found but only {len(names)} "
            f"class names {names}; fix the labels, or name every class (classes.txt)"
        )
    if len(names) > MAX_CLASSES:  # the labels are kept as uint8: id 300 would read as 44
        raise ValueError(
            f"{root}: {len(names)} classes, but segpipe's masks are uint8 and hold at most "
            f"{MAX_CLASSES}: merge classes"
        )
    out = []
    for stem, path in images.items():
        inst = _read_plane(instances[stem], "instances") if stem in instances else None
        image, pixel_size_um = _read_image(path)
        for other, plane in ((labels[stem], planes[stem]), (instances.get(stem), inst)):
            if plane is not None and plane.shape != image.shape[:2]:
                raise ValueError(
                    f"{other}: {plane.shape[0]}x{plane.shape[1]} pixels, its image {path} "
                    f"{image.shape[0]}x{image.shape[1]}; masks must match their image pixel "
                    "for pixel"
                )
        if inst is not None and inst.size and int(inst.max()) > np.iinfo(np.int32).max:
            raise ValueError(  # kept as int32: a larger id would wrap to a negative one
                f"{instances[stem]}: object id {int(inst.max())} is larger than "
                f"{np.iinfo(np.int32).max}; number the objects from 1"
            )
        out.append(
            FolderImage(
                image=image,
                labels=planes[stem].astype(np.uint8),
                instances=None if inst is None else inst.astype(np.int32),
                class_names=names,
                name=stem,
                pixel_size_um=pixel_size_um,
                path=path,
            )
        )
    _check_alike(out, root)
    return out
