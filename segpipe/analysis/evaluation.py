"""Score a segmentation against ground truth: per-class IoU and Dice, and touching objects.

One answer, :class:`Evaluation`, whatever was scored: a class map in memory
(:func:`evaluate_labels`), a model over labelled images in memory (:func:`evaluate_model`:
training's validation, benchmarks), or a result store or a model run through the pipeline
(:func:`evaluate`: ``segpipe evaluate``).

Two kinds of score:

* **Pixels**: per-class IoU and Dice from one confusion matrix, computed chunk by chunk
  (:func:`~segpipe.analysis.summary.confusion_against`): a gigapixel result is never whole.
* **Objects**: the connected components of one predicted class, matched one-to-one to the
  ground-truth instances of that class (those whose pixels are mostly that class in the
  ground truth) at IoU >= 0.5, give precision, recall and F1. This is the score that
  sees whether touching objects were kept apart: two touching nuclei predicted as one blob are
  at most one match (and none if the blob's IoU with either is below 0.5), where pixel Dice
  would barely notice. The object class's mask is loaded whole for the labelling (one byte per
  pixel).

>>> truth = np.zeros((6, 9), dtype=np.uint8); truth[1:5, 1:4] = truth[1:5, 5:8] = 1
>>> inst = np.zeros((6, 9), dtype=np.int32); inst[1:5, 1:4] = 1; inst[1:5, 5:8] = 2
>>> pred = truth.copy(); pred[1:5, 4] = 1  # the gap filled in: one blob
>>> score = evaluate_labels(pred, truth, instances=inst, class_names=("bg", "cell")).objects
>>> score.true_positives, score.false_positives, score.false_negatives
(0, 1, 2)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import dask
import dask.array as da
import numpy as np

from segpipe.analysis.metrics import LabelError
from segpipe.analysis.scores import (
    Evaluation,
    InstancesError,
    ObjectClassError,
    ObjectScore,
    check_instance_dtype,
    check_instance_ids,
    check_object_class,
    check_scoring,
    match_objects,
    object_class_id,
    object_class_of,
    object_score,
)
from segpipe.analysis.summary import confusion_against
from segpipe.io.files import URLPath, is_url, location
from segpipe.io.labelfiles import label_plane
from segpipe.results import is_result, naming_damage, open_result, read_meta

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "Evaluation",
    "LabelledImage",
    "ObjectScore",
    "evaluate",
    "evaluate_labels",
    "evaluate_model",
    "match_objects",
]


class LabelledImage(Protocol):
    """One image with its ground truth: what evaluation (and training) need of an example.

    Structural: :class:`segpipe.synthetic.SyntheticSlide` and
    :class:`segpipe.training.datasets.FolderImage` are ones without naming this class.
    """

    @property
    def image(self) -> np.ndarray:
        """``(Y, X, C)`` pixels (uint8, or any dtype ``pixels.to_float01`` knows)."""
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
    def shape(self) -> tuple[int, int]:
        """``(Y, X)`` pixels."""
        ...


def evaluate_labels(
    prediction: np.ndarray | da.Array,
    ground_truth: np.ndarray | da.Array,
    *,
    class_names: Sequence[str],
    instances: np.ndarray | da.Array | None = None,
    object_class: int | str | None = None,
    iou_threshold: float = 0.5,
    connectivity: int = 1,
    min_size_px: int = 0,
) -> Evaluation:
    """Score a ``(Y, X)`` class map against a ``(Y, X)`` ground-truth class map.

    Parameters
    ----------
    prediction, ground_truth
        Integer class ids in ``[0, len(class_names))``; numpy or dask (scored chunk by chunk).
    class_names
        One per class id.
    instances
        ``(Y, X)`` ground-truth object ids (0 outside objects); turns on the object score.
        Only the instances whose pixels are mostly ``object_class`` in ``ground_truth`` are
        objects to find; the others are ignored.
    object_class
        The class (id or name) whose connected components are the predicted objects (refused
        without ``instances``); default the class most ground-truth instance pixels have.
    iou_threshold
        Minimum IoU for a predicted object to match a true one (0.5, as is usual).
    connectivity
        1: components join across edges (4-neighbours); 2: also across corners.
    min_size_px
        Predicted components smaller than this many pixels are dropped before matching (not
        counted as false positives): the usual clean-up of speckle; 0 keeps all.
    """
    check_scoring(iou_threshold, min_size_px, connectivity)
    check_object_class(object_class, instances is not None)
    names = tuple(str(c) for c in class_names)
    mask = prediction if isinstance(prediction, da.Array) else da.from_array(prediction, 2048)
    truth = da.asarray(ground_truth)
    confusion = confusion_against(mask, truth, len(names))
    objects = None
    if instances is not None:
        inst, truth_np = np.asarray(instances), np.asarray(truth)
        if inst.shape != truth_np.shape:
            raise ValueError(
                f"instances {inst.shape} and ground truth {truth_np.shape} differ in shape"
            )
        cls = object_class_of(inst, truth_np, object_class, names)
        objects = object_score(
            np.asarray(mask == cls),
            inst,
            truth_np,
            cls,
            names[cls],
            iou_threshold=iou_threshold,
            connectivity=connectivity,
            min_size_px=min_size_px,
        )
    return Evaluation(names, confusion, objects)


def evaluate_model(
    model: nn.Module,
    data: LabelledImage | Sequence[LabelledImage],
    *,
    tile: int = 256,
    batch_size: int = 4,
    object_class: int | str | None = None,
    iou_threshold: float = 0.5,
    min_size_px: int = 0,
) -> Evaluation:
    """Predict each labelled image with ``model`` and score all of them together.

    Prediction is in memory, in eval mode (the mode is restored after), by the pipeline's
    overlap-tile stitcher (:func:`segpipe.execution.stitching.predict_labels`; ``tile`` is the
    output tile side in pixels, a multiple of the model's size multiple, ``batch_size`` the
    windows per forward pass). Confusion matrices and object counts add up over the images.
    The object score needs instances, and is over the images that have them;
    ``object_class`` defaults to the class under most instance pixels (no object score when no
    image has an instance; refused when given and no image has instances).
    """
    # Imported here: scoring a result store must not pay for torch.
    from segpipe.execution.stitching import predict_labels

    items: list[LabelledImage] = list(data) if isinstance(data, Sequence) else [data]
    if not items:
        raise ValueError("evaluate_model needs at least one labelled image, got none")
    names = tuple(items[0].class_names)
    check_object_class(object_class, any(i.instances is not None for i in items))
    if object_class is None:
        # One object class for all images: the one under most instance pixels of the first
        # image that has any; no object score when none has.
        object_class = next(
            (
                int(np.bincount(i.labels[i.instances > 0].astype(np.int64)).argmax())
                for i in items
                if i.instances is not None and (i.instances > 0).any()
            ),
            None,
        )
    was_training = model.training
    model.eval()
    try:
        scores = [
            evaluate_labels(
                predict_labels(
                    model, item.image, tile=tile, batch_size=batch_size, num_classes=len(names)
                ),
                item.labels,
                class_names=names,
                instances=None if object_class is None else item.instances,
                object_class=None if item.instances is None else object_class,
                iou_threshold=iou_threshold,
                min_size_px=min_size_px,
            )
            for item in items
        ]
    finally:
        model.train(was_training)
    confusion = np.sum([e.confusion for e in scores], axis=0)
    found = [e.objects for e in scores if e.objects is not None]
    objects = None
    if found:
        objects = ObjectScore(
            found[0].class_name,
            iou_threshold,
            sum(o.true_positives for o in found),
            sum(o.false_positives for o in found),
            sum(o.false_negatives for o in found),
        )
    return Evaluation(names, confusion, objects)


def evaluate(
    prediction: str | os.PathLike[str] | nn.Module,
    ground_truth: str | os.PathLike[str] | np.ndarray,
    *,
    image: str | os.PathLike[str] | None = None,
    instances: str | os.PathLike[str] | np.ndarray | None = None,
    object_class: int | str | None = None,
    iou_threshold: float = 0.5,
    min_size_px: int = 0,
    output: str | os.PathLike[str] | None = None,
    tile: int = 256,
    scheduler: Any = "sync",
    overwrite: bool = False,
) -> Evaluation:
    """Score a result store, or a model run over an image, against ground truth.

    Parameters
    ----------
    prediction
        A complete segpipe result store (read lazily with :func:`segpipe.open_result`; a
        path, an fsspec URL or the :class:`~segpipe.io.files.URLPath` segment returns), or a
        model (shipped name, checkpoint path, or ``torch.nn.Module``) to run over ``image``
        with :func:`segpipe.segment` first.
    ground_truth
        ``(Y, X)`` class ids, an array or a label image read as stored
        (:func:`~segpipe.io.labelfiles.label_plane`). Same shape as the prediction: for a
        model, as the level of ``image`` it segments (checked before it runs).
    image
        The image to segment when ``prediction`` is a model (refused with a result store).
    instances
        Ground-truth object ids (image path or array), for the object score.
    object_class, iou_threshold, min_size_px
        As in :func:`evaluate_labels`; ``object_class`` needs ``instances``.
    output
        Where the model's result store goes, a path or URL (default: a temporary directory,
        removed after); one of other settings is refused unless ``overwrite``.
    tile, scheduler, overwrite
        Passed to :func:`segpipe.segment` when running a model (``"sync"``: in this process).
    """
    check_scoring(iou_threshold, min_size_px)
    check_object_class(object_class, instances is not None)
    net = None
    # A URLPath (what segment() returns for s3://...) is no os.PathLike at run time.
    if isinstance(prediction, str | os.PathLike | URLPath) and is_result(prediction):
        if image is not None:
            raise ValueError(
                f"{prediction} is a result store, already segmented: image= / --image "
                f"{image} is for a model; drop it, or give a model to run over the image"
            )
        result, where = prediction, f"the result {prediction}"
        shape = open_result(prediction)["mask"].shape  # refuses an incomplete result
    elif isinstance(prediction, str | os.PathLike) and not _model_exists(prediction):
        raise ValueError(
            f"no such result or checkpoint: {prediction} (nor a shipped model's name); give "
            "a finished result store, a checkpoint file or a shipped model's name"
        )
    elif image is None:
        raise ValueError(
            f"{prediction!r} is not a segpipe result store, so it is taken as a model; give the "
            "image to run it on (image= / --image), or pass a finished result store"
        )
    else:
        net, shape, where = _model_at_level(prediction, image, object_class)
    # Read lazily: a truth of the wrong size is refused before any segmenting or reading.
    truth = _plane(ground_truth, "ground truth", shape, where)
    inst = None
    if instances is not None:
        inst = _plane(instances, "instances", shape, where)
        _check_instances(inst, instances, object_class)  # evaluate_labels would, unnamed
    with tempfile.TemporaryDirectory(prefix="segpipe-evaluate-") as tmp:
        if net is not None:
            from segpipe import models
            from segpipe.execution.segment import segment

            result = location(output) if output is not None else Path(tmp) / "result.zarr"
            # The module loaded once; the result records the name, as segment(.., name) would.
            named = isinstance(prediction, str | os.PathLike)
            label = models.label_of(cast("str", prediction)) if named else None
            source = cast("str | os.PathLike[str]", image)  # given, with a model
            segment(
                source, result, net, model_name=label, tile=tile, scheduler=scheduler,
                overwrite=overwrite,
            )  # fmt: skip
        try:  # a damaged chunk of the result named (its zstd's RuntimeError came out raw)
            with naming_damage(result):
                return evaluate_labels(
                    open_result(result)["mask"].data,
                    truth,
                    class_names=read_meta(result).class_names,
                    instances=inst,
                    object_class=object_class,
                    iou_threshold=iou_threshold,
                    min_size_px=min_size_px,
                )
        except ValueError as exc:
            if isinstance(exc, ObjectClassError):  # the option's fault, not a file's
                raise ValueError(f"{exc} (those of {where})") from None
            name = _name(ground_truth, "ground truth")
            if isinstance(exc, LabelError) and exc.labels == "pred":  # not the truth's fault
                damaged = f"its mask {exc.problem}: damaged, segment it again"
                raise ValueError(f"{where}: {damaged}") from None
            if isinstance(exc, LabelError):  # class ids outside the result's
                fix = "map those pixels (ignored ones, e.g. 255) to one of the result's classes"
                raise ValueError(
                    f"{name} (ground truth of {where}): {exc.problem}; {fix}"
                ) from None
            # A read failed (a damaged chunk): the result's or the truth's, zarr does not say.
            raise ValueError(f"{where} or its ground truth {name} cannot be read: {exc}") from exc


def _model_exists(model: str | os.PathLike[str]) -> bool:
    """Whether ``model`` can name a model: a shipped one's name, or something at that path
    (a URL is left to the loader to judge)."""
    if is_url(model) or location(model).exists():
        return True
    from segpipe import models  # torch, only for a name that is no file

    return str(model) in models.shipped()


def _model_at_level(
    model: str | os.PathLike[str] | nn.Module,
    image: str | os.PathLike[str],
    object_class: int | str | None,
) -> tuple[nn.Module, tuple[int, ...], str]:
    """The model loaded, the ``(Y, X)`` of the level of ``image`` segment() will run it on
    (it is given no level: the one closest to the model's pixel size), and those in words.
    A mistyped ``object_class`` is refused here, before segmenting rather than after."""
    from segpipe import models
    from segpipe.io.readers import open_image

    named = isinstance(model, str | os.PathLike)
    net = models.load(model) if isinstance(model, str | os.PathLike) else model
    reader: Any = open_image(image)
    try:
        level = models.choose_level(models.pixel_contract_of(net), reader)
        shape = tuple(reader.level_shapes[level][:2])
    finally:
        reader.close()
    label = model if named else getattr(net, "name", type(net).__name__)
    where = f"{image} at level {level}, as model {label} segments it"
    try:
        if object_class is not None:
            object_class_id(object_class, models.class_names_of(net))
    except ObjectClassError as exc:
        raise ValueError(f"{exc} (those of {where})") from None
    return net, shape, where


def _plane(
    given: str | os.PathLike[str] | np.ndarray, what: str, shape: tuple[int, ...], where: str
) -> np.ndarray | da.Array:
    """``given`` (a label image, read lazily, or an array), refused unless its shape is
    ``shape``, that of what is scored (``where``)."""
    plane = given if isinstance(given, np.ndarray) else label_plane(given, what)
    if tuple(plane.shape) != tuple(shape):
        size = " x ".join(str(n) for n in plane.shape)
        raise ValueError(
            f"{_name(given, what)}: {what} of {size} px, but {where} is {shape[0]} x "
            f"{shape[1]} px; give the {what} of that image"
        )
    return plane


def _check_instances(
    plane: np.ndarray | da.Array,
    given: str | os.PathLike[str] | np.ndarray | None,
    object_class: int | str | None,
) -> None:
    """:func:`check_instance_ids` of ``given``'s ``plane``, chunk by chunk, naming them."""
    try:
        check_instance_dtype(plane.dtype)  # a float array's NaN is no id (int() failed raw)
        lowest, highest = (int(v) for v in dask.compute(da.min(plane), da.max(plane)))
        check_instance_ids(lowest, highest, need_object=object_class is None)
    except InstancesError as exc:
        raise ValueError(f"{_name(given, 'instances')}: {exc}") from None


def _name(given: object, what: str) -> object:
    """``given`` (``what``: ground truth, instances) as an error names it: path, or array."""
    return f"the {what} array" if isinstance(given, np.ndarray) else given
