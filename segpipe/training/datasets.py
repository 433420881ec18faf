"""Labelled images for training and evaluation: what a training loop needs of an example.

A :class:`LabelledImage` is an image with its class labels and, optionally, object instances.
:class:`segpipe.synthetic.SyntheticSlide` is one; :func:`read_folder` makes them from files::

    folder/
      images/     a.png  b.tif  ...      RGB (or grey) images
      labels/     a.png  b.tif  ...      one channel, class id per pixel, same stem and shape
      instances/  a.png  b.tif  ...      optional: object id per pixel, 0 outside objects
      classes.txt                        optional: one class name per line, in id order

Files are read with :func:`segpipe.open_image`, so PNG, TIFF (also OME-TIFF) and Zarr work.
Images are read whole into memory: this is for training-sized images, not slides.

Training draws (input window, label crop) pairs from such images with :func:`sample_pairs`,
shaped by the model's geometry, and augments them (:class:`Augmentation`): elastic
deformation, flips and 90° rotations, intensity jitter, always the same on image, labels and
loss weights. :mod:`segpipe.training` re-exports these.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple, Protocol, TypeVar

import numpy as np
from scipy import ndimage

from segpipe.geometry.pixels import to_float01
from segpipe.geometry.tiling import Geometry, mirror_indices
from segpipe.io.readers import open_image

__all__ = [
    "Augmentation",
    "Batch",
    "FolderImage",
    "LabelledImage",
    "as_list",
    "augment",
    "class_names_of",
    "elastic_deformation",
    "intensity_jitter",
    "patch_pair",
    "read_folder",
    "sample_batch",
    "sample_pairs",
    "separate_touching",
    "touching_borders",
]

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".ome.tif", ".ome.tiff", ".jpg", ".jpeg", ".zarr")


T = TypeVar("T", bound="LabelledImage")


class LabelledImage(Protocol):
    """What training and evaluation need of one example."""

    @property
    def image(self) -> np.ndarray:
        """``(Y, X, C)`` uint8 pixels."""
        ...

    @property
    def labels(self) -> np.ndarray:
        """``(Y, X)`` integer class ids."""
        ...

    @property
    def instances(self) -> np.ndarray | None:
        """``(Y, X)`` integer object ids (0 outside objects), or None when not known."""
        ...

    @property
    def class_names(self) -> tuple[str, ...]: ...

    @property
    def shape(self) -> tuple[int, int]: ...


@dataclass(frozen=True)
class FolderImage:
    """One (image, labels[, instances]) triple read from a folder; a :class:`LabelledImage`."""

    image: np.ndarray
    labels: np.ndarray
    instances: np.ndarray | None
    class_names: tuple[str, ...]
    name: str
    pixel_size_um: float | None = None

    def __post_init__(self) -> None:
        shape = self.labels.shape
        if self.image.shape[:2] != shape or (
            self.instances is not None and self.instances.shape != shape
        ):
            raise ValueError(
                f"{self.name}: image {self.image.shape[:2]}, labels {shape} and instances "
                f"{None if self.instances is None else self.instances.shape} differ in shape"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.labels.shape[0]), int(self.labels.shape[1]))


def as_list(data: LabelledImage | Sequence[LabelledImage]) -> list[LabelledImage]:
    """One labelled image or several, as a list."""
    return list(data) if isinstance(data, Sequence) else [data]


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
        raise ValueError("separate_touching needs instance labels")
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
    return {
        _stem(p): p
        for p in sorted(directory.iterdir())
        if p.name.lower().endswith(IMAGE_SUFFIXES) and not p.name.startswith(".")
    }


def _read_plane(path: Path, what: str) -> np.ndarray:
    reader = open_image(path)
    if reader.shape[2] != 1:
        raise ValueError(
            f"{path}: {what} must be a one-channel image of integer ids, got "
            f"{reader.shape[2]} channels (save masks as single-channel PNG/TIFF)"
        )
    plane = reader.read(0, reader.shape[0], 0, reader.shape[1])[..., 0]
    if not np.issubdtype(plane.dtype, np.integer) and plane.dtype != bool:
        raise ValueError(f"{path}: {what} must hold integer ids, got dtype {plane.dtype}")
    return plane


def _read_rgb(path: Path) -> np.ndarray:
    reader = open_image(path)
    image = reader.read(0, reader.shape[0], 0, reader.shape[1])
    if image.dtype != np.uint8:
        raise ValueError(f"{path}: images must be 8-bit (uint8), got {image.dtype}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.shape[2] == 4:  # RGBA: drop alpha
        image = image[..., :3]
    return np.ascontiguousarray(image)


def class_names_of(folder: str | os.PathLike[str]) -> tuple[str, ...] | None:
    """The names in ``folder/classes.txt`` (one per line, blank lines skipped), or None."""
    path = Path(folder) / "classes.txt"
    if not path.is_file():
        return None
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"{path}: class names must be distinct and at least one, got {names}")
    return names


def read_folder(
    folder: str | os.PathLike[str], *, class_names: Sequence[str] | None = None
) -> list[FolderImage]:
    """Every (image, labels[, instances]) triple of ``folder``, matched by file stem.

    Parameters
    ----------
    folder
        A directory laid out as in the module docstring.
    class_names
        Names of the class ids; default ``folder/classes.txt``, else ``class_0..class_K`` for
        the largest id found.

    Raises
    ------
    FileNotFoundError
        No ``images``/``labels`` directory, or an image without its label file.
    ValueError
        Shapes that differ, a label id beyond the class names, masks with several channels.
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
    names = tuple(class_names) if class_names is not None else class_names_of(root)
    planes = {stem: _read_plane(labels[stem], "labels") for stem in images}
    top = max(int(p.max()) for p in planes.values())
    if names is None:
        names = tuple(f"class_{k}" for k in range(max(top + 1, 2)))
    if top >= len(names):
        raise ValueError(
            f"{labels_dir}: label id {top} found but only {len(names)} class names {names}"
        )
    out = []
    for stem, path in images.items():
        inst = _read_plane(instances[stem], "instances") if stem in instances else None
        out.append(
            FolderImage(
                image=_read_rgb(path),
                labels=planes[stem].astype(np.uint8),
                instances=None if inst is None else inst.astype(np.int32),
                class_names=names,
                name=stem,
                pixel_size_um=open_image(path).pixel_size_um,
            )
        )
    return out


@dataclass(frozen=True)
class Augmentation:
    """What :func:`sample_pairs` does to each pair, in this order; the defaults are the
    loop's original flips and rotations only.

    Parameters
    ----------
    elastic_std_px, elastic_grid
        :func:`elastic_deformation`; 0 px turns it off.
    flips
        A random one of the 8 flips/rotations of the square (:func:`augment`).
    jitter
        :func:`intensity_jitter` strength; 0 turns it off.
    """

    elastic_std_px: float = 0.0
    elastic_grid: int = 3
    flips: bool = True
    jitter: float = 0.0


def _window_sides(geometry: Geometry, patch: int) -> tuple[int, int]:
    """(input side, label side) in pixels for a requested label side of ``patch``."""
    n = geometry.input_size(patch)
    return n, geometry.output_size(n)


def _window(
    slide: LabelledImage,
    y: int,
    x: int,
    geometry: Geometry,
    patch: int,
    weights: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int, int]:
    """Image ``(3, n, n)``, labels and weights over the **whole** input window, margin, o."""
    n, o = _window_sides(geometry, patch)
    margin = (n - o) // 2  # the halo for valid convolutions, 0 for same padding
    ny, nx = slide.shape
    index = np.ix_(
        mirror_indices(y - margin, y - margin + n, ny),
        mirror_indices(x - margin, x - margin + n, nx),
    )
    image = slide.image[index]  # (n, n, 3), the image's own dtype
    # The one dtype rule (pixels.to_float01): uint8 / 255, uint16 / 65535, floats as they are.
    image = np.ascontiguousarray(to_float01(image).transpose(2, 0, 1))
    labels = slide.labels[index].astype(np.int64)
    return image, labels, None if weights is None else weights[index], margin, o


def patch_pair(
    slide: LabelledImage, y: int, x: int, geometry: Geometry, patch: int
) -> tuple[np.ndarray, np.ndarray]:
    """One training pair whose label crop has its top-left corner at ``(y, x)``.

    The input window is the label crop grown by the model's context, centred on it::

        input window, n = geometry.input_size(patch) a side
        +----------------------+
        |  (n - o) / 2         |      mirrored where it leaves the slide
        |   +--------------+   |
        |   | labels, o a  |   |      o = geometry.output_size(n) >= patch
        |   | side         |   |
        |   +--------------+   |
        +----------------------+

    Parameters
    ----------
    slide
        Source of image and labels.
    y, x
        Top-left of the label crop in slide pixels; the crop may run past the slide's
        bottom/right edge, where it is mirrored like the context.
    geometry, patch
        The model's geometry and the requested label side (pixels).

    Returns
    -------
    image
        ``(3, n, n)`` float32 in ``[0, 1]``.
    labels
        ``(o, o)`` int64 class ids.
    """
    image, labels, _, m, o = _window(slide, y, x, geometry, patch, None)
    return image, np.ascontiguousarray(labels[m : m + o, m : m + o])


def augment(
    image: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A random one of the 8 flips/rotations of the square, the same on image and labels.

    ``image`` is ``(C, n, n)``, ``labels`` ``(o, o)`` centred in it; both turn about their
    centres, so they stay aligned. Returns contiguous copies.
    """
    image, labels = _flip_rotate(rng, image, labels)
    return image, labels


def _flip_rotate(rng: np.random.Generator, *arrays: np.ndarray) -> list[np.ndarray]:
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    out = []
    for a in arrays:
        a = np.rot90(a, k, axes=(-2, -1))
        out.append(np.ascontiguousarray(a[..., ::-1] if flip else a))
    return out


def elastic_deformation(
    image: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    *,
    std_px: float,
    grid: int = 3,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A random smooth deformation of the window, the same field on every array.

    As in the U-Net paper: displacement vectors drawn from ``N(0, std_px**2)`` on a coarse
    ``grid`` x ``grid`` grid, interpolated to every pixel with a cubic spline. Each output pixel
    samples the input at its position plus the displacement: the image (``(C, n, n)``) and
    ``weights`` bilinearly, ``labels`` (``(n, n)``) at the nearest pixel (a class id cannot be
    interpolated). Positions outside the window are mirrored.
    """
    n = labels.shape[-1]
    coarse = rng.normal(0.0, std_px, size=(2, grid, grid))
    field = np.stack([ndimage.zoom(c, n / grid, order=3, mode="nearest")[:n, :n] for c in coarse])
    ys, xs = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    coords = np.stack([ys + field[0], xs + field[1]])
    # Nearest for labels as map_coordinates does it: sample at the rounded position.
    warped = [ndimage.map_coordinates(c, coords, order=1, mode="mirror") for c in image]
    out_labels = ndimage.map_coordinates(labels, np.rint(coords), order=0, mode="mirror")
    out_weights = (
        None
        if weights is None
        else ndimage.map_coordinates(weights, coords, order=1, mode="mirror")
    )
    return np.stack(warped).astype(np.float32), out_labels, out_weights


def intensity_jitter(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Random grey-value change of a ``(C, n, n)`` [0, 1] image: per-channel gain within
    ``±strength / 2``, contrast about the mean and brightness within ``±strength``, clipped."""
    c = image.shape[0]
    gain = 1 + rng.uniform(-strength / 2, strength / 2, size=(c, 1, 1))
    contrast = 1 + rng.uniform(-strength, strength)
    brightness = rng.uniform(-strength, strength) * 0.5
    out = image * gain
    mean = out.mean()
    out = (out - mean) * contrast + mean + brightness
    return np.clip(out, 0, 1).astype(np.float32)


class Batch(NamedTuple):
    """A training batch: ``(B, 3, n, n)`` float32 images, ``(B, o, o)`` int64 labels and,
    with loss weights, ``(B, o, o)`` float32 weights."""

    images: np.ndarray
    labels: np.ndarray
    weights: np.ndarray | None


def sample_pairs(
    slides: Sequence[LabelledImage],
    geometry: Geometry,
    patch: int,
    batch_size: int,
    rng: np.random.Generator,
    *,
    augmentation: Augmentation | None = Augmentation(),
    weight_maps: Sequence[np.ndarray] | None = None,
) -> Batch:
    """A batch of pairs at uniformly random positions of randomly chosen images, each pair
    augmented as ``augmentation`` says (None: not at all); ``weight_maps[i]`` (per-pixel loss
    weights of ``slides[i]``) travel with the labels.

    Images and labels are shaped as in :func:`patch_pair`.
    """
    o = _window_sides(geometry, patch)[1]
    images, labels, weights = [], [], []  # weights: None or (o, o) each
    for _ in range(batch_size):
        index = int(rng.integers(len(slides)))
        slide = slides[index]
        # Label crops inside the slide (true labels only); the context is mirrored at the
        # borders as it is at inference. A slide smaller than a crop gets mirrored labels too.
        y = int(rng.integers(max(slide.shape[0] - o, 0) + 1))
        x = int(rng.integers(max(slide.shape[1] - o, 0) + 1))
        w_map = None if weight_maps is None else weight_maps[index]
        image, label, weight, m, o = _window(slide, y, x, geometry, patch, w_map)
        if augmentation is not None and augmentation.elastic_std_px > 0:
            # On the whole window, so that the labels' surroundings deform with them.
            image, label, weight = elastic_deformation(
                image,
                label,
                rng,
                std_px=augmentation.elastic_std_px,
                grid=augmentation.elastic_grid,
                weights=weight,
            )
        label = label[m : m + o, m : m + o]
        weight = None if weight is None else weight[m : m + o, m : m + o]
        if augmentation is not None and augmentation.flips:
            image, label, *rest = _flip_rotate(
                rng, image, label, *([] if weight is None else [weight])
            )
            weight = rest[0] if rest else None
        if augmentation is not None and augmentation.jitter > 0:
            image = intensity_jitter(image, rng, augmentation.jitter)
        images.append(image)
        labels.append(np.ascontiguousarray(label))
        weights.append(weight)
    return Batch(
        np.stack(images),
        np.stack(labels),
        None if weight_maps is None else np.stack(weights).astype(np.float32),  # type: ignore[arg-type]
    )


def sample_batch(
    slides: Sequence[LabelledImage],
    geometry: Geometry,
    patch: int,
    batch_size: int,
    rng: np.random.Generator,
    *,
    is_augmented: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`sample_pairs` with flips and rotations only (or nothing), as ``(images, labels)``.

    Returns ``(batch_size, 3, n, n)`` float32 images and ``(batch_size, o, o)`` int64 labels,
    ``n`` and ``o`` as in :func:`patch_pair`.
    """
    batch = sample_pairs(
        slides,
        geometry,
        patch,
        batch_size,
        rng,
        augmentation=Augmentation() if is_augmented else None,
    )
    return batch.images, batch.labels
